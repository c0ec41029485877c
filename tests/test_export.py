"""``comet-ray export``: one ONNX / TorchScript graph equal to the unfused PyTorch path.

Tolerances: scores and maps within atol 1e-5 for the in-process wrapper and the TorchScript round
trip (same kernels, reordered sums only), atol 1e-4 for ONNX Runtime (different kernels).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comet_ray.checkpoint import load_detector
from comet_ray.cli.export import register
from comet_ray.errors import CheckpointError, CometError
from comet_ray.export import ExportedDetector, adaptive_pool_matrix, export_detector
from comet_ray.features.aggregation import aggregate_patches
from comet_ray.model import extractor_for
from comet_ray.models.anomaly_map import anomaly_maps, image_scores


@pytest.fixture(scope="module")
def reference(tiny_run: Path):
    """The unfused path predict uses: extractor -> float16 cache rounding -> detector.patch_scores ->
    image_scores / anomaly_maps."""
    model, meta = load_detector(tiny_run, "cpu")
    extractor = extractor_for(meta, torch.device("cpu"))

    def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            patch = model.patch_scores(extractor(images).half().float())
            return image_scores(patch).numpy(), anomaly_maps(patch, tuple(meta["grid"]), 64).numpy()

    return run


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length,size", [(288, 32), (288, 128), (864, 100), (64, 32), (7, 3), (5, 5)])
def test_pool_matrix_is_adaptive_average_pooling(length: int, size: int) -> None:
    x = torch.randn(4, length, generator=torch.Generator().manual_seed(length))
    expected = F.adaptive_avg_pool1d(x[:, None], size)[:, 0]
    torch.testing.assert_close(x @ adaptive_pool_matrix(length, size), expected, atol=1e-5, rtol=1e-5)


def test_fused_aggregation_equals_simplenet_aggregation() -> None:
    """The conv form of unfold + pooling holds for widths that do not divide C * 9 (here 288 -> 100)."""
    from comet_ray.features.backbone import build_backbone

    trunk, _ = build_backbone("mobilenet_v2", pretrained=False)
    images = _images(2, 1)
    for dim in (32, 100):
        wrapper = ExportedDetector(trunk, torch.nn.Identity(), dim, (32, 96), 64, (8, 8))
        with torch.no_grad():
            torch.testing.assert_close(
                wrapper.patch_features(images),
                aggregate_patches(trunk(images), dim, dim),
                atol=1e-5,
                rtol=1e-5,
            )


def test_wrapper_matches_predict_path(tiny_run: Path, reference) -> None:
    exported = ExportedDetector.from_checkpoint(tiny_run)
    images = _images(3, 2)
    with torch.no_grad():
        scores, maps = exported(images)
    ref_scores, ref_maps = reference(images)
    assert scores.shape == (3,) and maps.shape == (3, 64, 64)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-5)
    np.testing.assert_allclose(maps.numpy(), ref_maps, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip(tiny_run: Path, reference, tmp_path: Path) -> None:
    target = export_detector(tiny_run, tmp_path / "model.ts", "torchscript")
    extra = {"comet_ray.json": ""}
    loaded = torch.jit.load(str(target), _extra_files=extra)
    meta = json.loads(extra["comet_ray.json"])
    assert meta["image_size"] == 64 and meta["threshold"] == pytest.approx(
        load_detector(tiny_run)[1]["threshold"]
    )
    images = _images(5, 3)  # another batch size than the trace's example: the batch dimension is free
    with torch.no_grad():
        scores, maps = loaded(images)
    ref_scores, ref_maps = reference(images)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-5)
    np.testing.assert_allclose(maps.numpy(), ref_maps, atol=1e-5)


def test_onnx_matches_pytorch_in_onnxruntime(tiny_run: Path, reference, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (test dependency) is not installed")
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    target = export_detector(tiny_run, tmp_path / "model.onnx", "onnx")
    proto = onnx.load(str(target))
    onnx.checker.check_model(proto)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["comet_ray"])
    assert meta["grid"] == [8, 8] and meta["input"] == "images"
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["scores", "maps"]
    for batch in (1, 4):
        images = _images(batch, 10 + batch)
        scores, maps = session.run(None, {"images": images.numpy()})
        ref_scores, ref_maps = reference(images)
        assert scores.shape == (batch,) and maps.shape == (batch, 64, 64)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
        np.testing.assert_allclose(maps, ref_maps, atol=1e-4)


def _tampered(tiny_run: Path, tmp_path: Path, **changes) -> Path:
    payload = torch.load(tiny_run / "model.pt", weights_only=True)
    payload.update(changes)
    path = tmp_path / "tampered.pt"
    torch.save(payload, path)
    return path


def test_checkpoint_of_another_version_is_a_clear_error(tiny_run: Path, tmp_path: Path) -> None:
    bad = _tampered(tiny_run, tmp_path, format_version=99)
    with pytest.raises(CheckpointError, match="format version 99"):
        export_detector(bad, tmp_path / "out.onnx", "onnx")
    assert not any(tmp_path.glob("out.onnx*")) and not any(tmp_path.glob(".out.onnx*"))


def test_checkpoint_of_another_model_is_a_clear_error(tiny_run: Path, tmp_path: Path) -> None:
    bad = _tampered(tiny_run, tmp_path, model_name="resnet_patchcore")
    with pytest.raises(CometError, match="unknown model 'resnet_patchcore'"):
        export_detector(bad, tmp_path / "out.pt", "torchscript")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(CometError, match="cannot read checkpoint"):
        export_detector(bogus, tmp_path / "out.onnx")


def test_register_adds_the_export_command(tiny_run: Path, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "exported" / "model.pt"
    args = parser.parse_args(["export", str(tiny_run), "--format", "torchscript", "--out", str(out)])
    assert args.func(args) == 0
    assert out.exists() and str(out) in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # like any file the user writes, not mkstemp's 0600
    with pytest.raises(SystemExit):
        parser.parse_args(["export", str(tiny_run), "--format", "tflite", "--out", str(out)])
