"""``predict --maps``: per-image anomaly maps and their panel PNGs, on a tiny synthetic category."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comet_ray.cli import build_parser, main
from comet_ray.data.images import preprocess_image, resize_size
from comet_ray.inference import predict_images
from comet_ray.visualize import denormalise, map_file_names, map_panel

from support import TINY_TRAIN_ARGS

TINY = TINY_TRAIN_ARGS


@pytest.fixture
def inbox(tiny_category: Path, tmp_path: Path) -> Path:
    """Two good and two spot images, with the same file names in two folders, plus a broken file."""
    folder = tmp_path / "inbox"
    for defect in ("good", "spot"):
        (folder / defect).mkdir(parents=True)
        for source in sorted((tiny_category / "weave" / "test" / defect).glob("*.png"))[:2]:
            (folder / defect / source.name).write_bytes(source.read_bytes())
    (folder / "spot" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def test_maps_are_returned_and_written_for_readable_images_only(
    tiny_run: Path, inbox: Path, tmp_path: Path
) -> None:
    maps_dir = tmp_path / "pred" / "maps"
    rows, maps = predict_images(str(tiny_run), [str(inbox)], "cpu", maps_dir=maps_dir, return_maps=True)
    scored = [r for r in rows if not r["error"]]
    broken = [r for r in rows if r["error"]]
    assert len(scored) == 4 and len(broken) == 1 and broken[0]["path"].endswith("broken.png")
    assert set(maps) == {r["path"] for r in scored}
    for row in scored:
        amap = maps[row["path"]]
        assert amap.shape == (64, 64) and amap.dtype == np.float32 and np.isfinite(amap).all()
        # Bilinear upsampling and a normalised blur only average patch scores: the map never exceeds
        # the image score (= the maximum patch score), so one threshold serves both.
        assert float(amap.max()) <= row["score"] + 1e-5
    written = sorted(p.name for p in maps_dir.iterdir())
    assert written == [
        "good__000.png",
        "good__001.png",
        "spot__000.png",
        "spot__001.png",
    ]  # no name collision
    for name in written:
        width, height = _png_size(maps_dir / name)
        assert width > 2.5 * height  # three panels side by side
    # The columns predictions.csv gets are unchanged by maps.
    assert all(set(r) == {"path", "score", "normalised_score", "anomalous", "error"} for r in rows)


def test_maps_without_return_keep_the_plain_row_list(tiny_run: Path, inbox: Path) -> None:
    rows = predict_images(str(tiny_run), [str(inbox / "good")], "cpu")
    assert isinstance(rows, list) and len(rows) == 2


def _outline_pixels(png: bytes) -> int:
    """Pixels of the region outline colour (#ff2d2d) in a panel."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((((pixels - [255, 45, 45]) ** 2).sum(-1) < 900).sum())


def test_map_panel_outlines_the_region_at_or_above_the_threshold() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    amap = np.zeros((64, 64), np.float32)
    amap[20:30, 20:30] = 2.0
    crossed = _outline_pixels(map_panel(image, amap, threshold=1.0, nominal=0.0, score=2.0, title="x"))
    never = _outline_pixels(map_panel(image, amap, threshold=3.0, nominal=0.0, score=2.0, title="x"))
    assert crossed > never + 50


def test_denormalise_recovers_the_crop_the_model_saw() -> None:
    rng = np.random.default_rng(0)
    side = resize_size(64)  # already at the resize size: preprocessing only crops the middle
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    tensor = preprocess_image(Image.fromarray(pixels), 64)
    restored = denormalise(tensor)
    offset = round((side - 64) / 2)
    assert restored.shape == (64, 64, 3) and restored.dtype == np.uint8
    assert (
        np.abs(restored.astype(int) - pixels[offset : offset + 64, offset : offset + 64].astype(int)).max()
        <= 1
    )


def test_map_file_names_are_unique_and_readable() -> None:
    names = map_file_names(["/d/a/good/000.png", "/d/a/crack/000.png", "/d/a/crack/000.jpg", "/d/a/x y.png"])
    assert names == ["good__000.png", "crack__000.png", "crack__000-2.png", "x_y.png"]
    assert map_file_names(["s3://bucket/p/q/001.png"]) == ["001.png"]


def _cli_has_maps() -> bool:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return any("--maps" in a.option_strings for a in sub.choices["predict"]._actions)


def test_cli_predict_maps(tiny_run: Path, inbox: Path, tmp_path: Path) -> None:
    assert _cli_has_maps()
    out = tmp_path / "pred"
    assert main(["predict", str(tiny_run), str(inbox), "--out", str(out), "--device", "cpu", "--maps"]) == 0
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5
    assert len(list((out / "maps").glob("*.png"))) == 4


def test_maps_match_a_direct_forward_pass(tiny_run: Path, inbox: Path) -> None:
    from comet_ray.checkpoint import load_detector
    from comet_ray.data.images import decode_image
    from comet_ray.model import extractor_for
    from comet_ray.models.anomaly_map import anomaly_maps

    path = str(inbox / "spot" / "000.png")
    _, maps = predict_images(str(tiny_run), [path], "cpu", return_maps=True)
    model, meta = load_detector(tiny_run, "cpu")
    extractor = extractor_for(meta, torch.device("cpu"))
    image = preprocess_image(decode_image(Path(path).read_bytes(), path), 64)[None]
    with torch.no_grad():  # features as the (float16) cache holds them: what the detector was trained on
        features = extractor(image).half().float()
        expected = anomaly_maps(model.patch_scores(features), tuple(meta["grid"]), 64)[0]
    np.testing.assert_allclose(maps[path], expected.numpy(), atol=1e-6)


def test_saved_pixel_threshold_is_the_validation_f1_cut_recomputed_from_scratch(tiny_run: Path) -> None:
    """Training reuses the validation split's patch scores for the outline threshold instead of
    scoring the split twice; the saved cut must equal one computed afresh from the saved model."""
    import json

    from comet_ray.checkpoint import load_detector
    from comet_ray.config import TrainConfig
    from comet_ray.pipeline import pixel_threshold
    from comet_ray.prepare import prepare_data

    model, meta = load_detector(tiny_run, "cpu")
    config = TrainConfig.from_dict(json.loads((tiny_run / "config.json").read_text()))
    data = prepare_data(config, torch.device("cpu"))
    fresh = pixel_threshold(
        model, data.validation, config.features.image_size, torch.device("cpu"), config.precision
    )
    assert fresh is not None and meta["pixel_threshold"] == pytest.approx(fresh, rel=1e-6)


def test_predict_scores_an_image_as_training_and_evaluate_did(tiny_run: Path, tiny_category: Path) -> None:
    """One scoring path: ``predict`` on the report images gives the scores training wrote for them
    (validation and ``evaluate`` score the float16-cached features; predict rounds its fresh features
    the same way), and on the validation images it reproduces the saved F1-optimal threshold.

    Tolerances are 1e-5 of the scores' spread (this tiny model's scores span ~1e-4): scoring float32
    features instead of the cached float16 ones moves them by ~3e-4 of it."""
    import json

    from comet_ray.checkpoint import load_detector
    from comet_ray.pipeline import decision_threshold

    manifest = json.loads((tiny_run / "manifest.json").read_text())
    with open(tiny_run / "scores.csv", newline="") as handle:
        saved = {row["sample_id"]: float(row["score"]) for row in csv.DictReader(handle)}
    tolerance = 1e-5 * (max(saved.values()) - min(saved.values()))
    paths = {str(tiny_category / sample_id): sample_id for sample_id in manifest["report_ids"]}
    rows = predict_images(str(tiny_run), list(paths), "cpu")
    assert len(rows) == len(saved) > 0 and tolerance > 0
    for row in rows:
        assert abs(row["score"] - saved[paths[row["path"]]]) <= tolerance, row

    _, meta = load_detector(tiny_run, "cpu")
    validation = [str(tiny_category / sample_id) for sample_id in manifest["validation_ids"]]
    rows = predict_images(str(tiny_run), validation, "cpu")
    scores = torch.tensor([row["score"] for row in rows])
    labels = torch.tensor(["/good/" not in row["path"] for row in rows])
    assert labels.any() and not labels.all()
    threshold, nominal = decision_threshold(scores, labels)
    assert (
        abs(threshold - meta["threshold"]) <= tolerance and abs(nominal - meta["nominal_score"]) <= tolerance
    )
    at_cut = min(rows, key=lambda row: abs(row["score"] - meta["threshold"]))
    assert at_cut["anomalous"] == 1  # the image that set the cut is flagged by it
