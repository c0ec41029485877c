"""``comet-ray report`` and the TensorBoard writer, on tiny synthetic runs (three seeds/levels)."""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comet_ray.cli import main
from comet_ray.cli.report import register
from comet_ray.comet.trainer import EpochLog
from comet_ray.data.synthetic import make_texture_category
from comet_ray.errors import CheckpointError, CometError
from comet_ray.metrics import auroc
from comet_ray.report import build_report, collect, roc_curve, summarise
from comet_ray.runfolder import TensorBoardLogger, read_scores, write_scores, write_tensorboard

from support import TINY_TRAIN_ARGS

TINY = TINY_TRAIN_ARGS
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report-data")
    make_texture_category(root, "weave", n_train=16, n_test_good=8, defects={"spot": 10}, size=64, seed=4)
    return root


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory) -> dict[str, Path]:
    """comet at 20 % contamination with seeds 0 and 1, and at 10 % with seed 0."""
    base = tmp_path_factory.mktemp("report-runs")
    out = {}
    for name, contamination, seed in (("c20s0", "0.2", "0"), ("c20s1", "0.2", "1"), ("c10s0", "0.1", "0")):
        out[name] = base / name
        assert (
            main(
                [
                    "train",
                    str(dataset),
                    "--category",
                    "weave",
                    "--contamination",
                    contamination,
                    "--seed",
                    seed,
                    "--out",
                    str(out[name]),
                    *TINY,
                ]
            )
            == 0
        )
    return out


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    return build_report(list(runs.values()), tmp_path_factory.mktemp("report") / "report.html", device="cpu")


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs.get("src") or "")
        for key in ("href", "src"):
            if key in attrs and tag in ("link", "script", "iframe") and attrs[key]:
                self.external.append(attrs[key])


def _decoded_pngs(page: str) -> list[Image.Image]:
    parser = _Images()
    parser.feed(page)
    assert not parser.external, f"report links to external resources: {parser.external}"
    images = []
    for source in parser.sources:
        assert source.startswith("data:image/png;base64,"), source[:60]
        data = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        Image.open(io.BytesIO(data)).verify()
        image = Image.open(io.BytesIO(data))
        image.load()
        images.append(image)
    return images


def test_every_image_is_an_inline_png(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    images = _decoded_pngs(page)
    # 2 contamination charts + 2 ROC charts + per run (3): weight histogram, history, 3 FP + 3 FN panels,
    # and the training-set audit's weight trajectories and 6 top suspects.
    assert len(images) == 2 + 2 + 3 * (2 + 6 + 1 + 6)
    assert all(min(i.size) > 100 for i in images)
    assert "http://" not in page and "https://" not in page


def test_report_sections(report: Path, runs) -> None:
    page = report.read_text(encoding="utf-8")
    for text in (
        "Metrics",
        "Contamination curve",
        "ROC curves",
        "SCL weight histogram",
        "Worst false positives",
        "Worst false negatives",
        "±",
        "seeds",
    ):
        assert text in page
    assert "differs from metrics.json" not in page  # recomputed scores reproduce the run's AUROC
    assert str(runs["c20s1"]) in page


def test_table_is_mean_and_sample_std_over_seeds(runs) -> None:
    records = collect(list(runs.values()), device="cpu", recompute=False)
    table = summarise(records)["weave"]
    assert [(r["contamination"], r["seeds"]) for r in table] == [(0.1, [0]), (0.2, [0, 1])]
    values = [json.loads((runs[n] / "metrics.json").read_text())["image_auroc"] for n in ("c20s0", "c20s1")]
    mean, std, n = table[1]["image_auroc"]
    assert n == 2 and mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert table[0]["image_auroc"][1] is None  # one seed: no spread


def test_train_writes_scores_csv_matching_metrics(runs) -> None:
    table = read_scores(runs["c20s0"])
    metrics = json.loads((runs["c20s0"] / "metrics.json").read_text())
    assert len(table.ids) == metrics["n_test"]
    assert auroc(torch.tensor(table.scores), torch.tensor(table.labels)) == pytest.approx(
        metrics["image_auroc"], abs=1e-6
    )


def test_recomputed_scores_reproduce_the_run(runs, tmp_path: Path) -> None:
    run = tmp_path / "no-scores"
    shutil.copytree(runs["c20s0"], run)
    (run / "scores.csv").unlink()  # a run folder from before scores.csv existed
    record = collect([run], device="cpu", examples=0)[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert record.scores.source == "recomputed"
    assert len(record.scores.ids) == metrics["n_test"]
    assert auroc(torch.tensor(record.scores.scores), torch.tensor(record.scores.labels)) == pytest.approx(
        metrics["image_auroc"], abs=1e-6
    )


def test_roc_curve_auc_equals_auroc_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=200), 1)  # many ties
    labels = rng.random(200) < 0.3
    scores[labels] += 0.5
    fpr, tpr = roc_curve(scores, labels)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(
        np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    )  # the curve the report draws: its area is AUROC
    assert area == pytest.approx(auroc(torch.tensor(scores), torch.tensor(labels)), abs=1e-9)


def test_scores_csv_round_trip_and_use_without_data(runs, tmp_path: Path) -> None:
    """A run whose data root is gone: ROC from scores.csv, worst images listed without maps."""
    run = tmp_path / "moved"
    shutil.copytree(runs["c20s0"], run)
    config = json.loads((run / "config.json").read_text())
    config["data_root"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(config))
    ids = ["weave/test/good/000.png", "weave/test/spot/000.png", "weave/test/spot/001.png"]
    write_scores(run, ids, torch.tensor([0.1, 0.9, 0.05]), torch.tensor([False, True, True]))
    table = read_scores(run)
    assert table.ids == ids and table.scores.tolist() == pytest.approx([0.1, 0.9, 0.05])
    assert table.labels.tolist() == [False, True, True]
    page = build_report([run], tmp_path / "r.html", device="cpu").read_text()
    assert "scores.csv" in page and "no anomaly maps" in page
    assert "weave/test/spot/001.png" in page  # the worst false negative, listed
    assert len(_decoded_pngs(page)) == 4  # ROC, weights, history, the audit's weight trajectories
    assert "no anomaly maps of the training-set suspects" in page


def test_unreachable_data_and_no_scores_is_a_note_not_a_failure(runs, tmp_path: Path) -> None:
    run = tmp_path / "orphan"
    shutil.copytree(runs["c10s0"], run)
    (run / "scores.csv").unlink()
    config = json.loads((run / "config.json").read_text())
    config["data_root"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(config))
    page = build_report([run], tmp_path / "r.html", device="cpu").read_text()
    assert "no ROC curve and anomaly maps" in page and "gone" in page
    assert len(_decoded_pngs(page)) == 3  # weights, history, the audit's weight trajectories


def test_checkpoint_of_another_version_is_a_clear_error(runs, tmp_path: Path) -> None:
    run = tmp_path / "future"
    shutil.copytree(runs["c20s0"], run)
    payload = torch.load(run / "model.pt", weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, run / "model.pt")
    with pytest.raises(CheckpointError, match=r"future.*format version 99"):
        build_report([run], tmp_path / "r.html", device="cpu")
    assert not (tmp_path / "r.html").exists()


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(CometError, match="not a comet-ray run folder"):
        build_report([tmp_path], tmp_path / "r.html")
    with pytest.raises(CometError, match="run folder not found"):
        build_report([tmp_path / "nope"], tmp_path / "r.html")


def test_register_and_parent_folder_expansion(runs, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli.html"
    args = parser.parse_args(
        ["report", str(runs["c20s0"].parent), "--out", str(out), "--no-recompute", "--examples", "0"]
    )
    assert args.func(args) == 0
    page = out.read_text()
    assert all(str(p) in page for p in runs.values())  # the parent folder expanded to its three runs
    assert str(out) in capsys.readouterr().out


def test_report_renders_in_chromium(report: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium) - cannot check rendering")
    shot = tmp_path / "shot.png"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        report.resolve().as_uri(),
    ]
    subprocess.run(command, capture_output=True, timeout=180, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (2000, 1280, 3)
    # A rendered page: mostly white background with text, tables and charts, not a blank or error page.
    white = (pixels > 245).all(-1).mean()
    colourful = (pixels.max(-1).astype(int) - pixels.min(-1) > 60).mean()
    assert 0.3 < white < 0.98 and colourful > 0.01


def _events(log_dir: Path) -> list:
    """Every Event of the TFRecord event files in ``log_dir`` (length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
    return events


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    for event in _events(log_dir):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_write_tensorboard_from_history(runs, tmp_path: Path) -> None:
    history = json.loads((runs["c20s0"] / "history.json").read_text())
    write_tensorboard(tmp_path / "tb", history)
    scalars = _scalars(tmp_path / "tb")
    for tag in (
        "train/loss",
        "comet/lambda",
        "comet/det_sigma",
        "scl/mean_weight",
        "scl/mean_weight_injected",
        "scl/mean_weight_nominal",
    ):
        assert [s for s, _ in scalars[tag]] == [1, 2], tag
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert [v for _, v in scalars["comet/lambda"]] == pytest.approx([h["lam"] for h in history], rel=1e-6)
    tags = {v.tag for e in _events(tmp_path / "tb") for v in e.summary.value}
    assert "scl/weights" in tags  # the weight histogram


def test_tensorboard_logger_as_epoch_callback(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path / "tb")
    for epoch in range(3):
        log = EpochLog(
            epoch=epoch,
            loss=1.0 / (epoch + 1),
            lam=0.005 * (epoch + 1),
            det_sigma=1e-6,
            fence=0.2,
            mean_weight=0.9,
            low_confidence=2,
            weight_histogram=[0, 0, 1, 0, 0, 0, 0, 0, 0, 9],
            mean_weight_injected=None,
            mean_weight_nominal=None,
            meta_l_tr=None,
            meta_l_val=None,
            seconds=0.1,
        )
        logger(None, log)
    logger.close()
    scalars = _scalars(tmp_path / "tb")
    assert [v for _, v in scalars["comet/lambda"]] == pytest.approx([0.005, 0.010, 0.015])
    assert "scl/mean_weight_injected" not in scalars  # None values are left out, not written as NaN
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1


def test_write_tensorboard_takes_one_epoch_log(tmp_path: Path) -> None:
    log = EpochLog(
        epoch=4,
        loss=0.5,
        lam=0.01,
        det_sigma=2e-6,
        fence=0.3,
        mean_weight=0.8,
        low_confidence=3,
        weight_histogram=[1] * 10,
        mean_weight_injected=0.4,
        mean_weight_nominal=0.95,
        meta_l_tr=0.6,
        meta_l_val=0.7,
        seconds=1.0,
    )
    write_tensorboard(tmp_path / "tb", log)
    scalars = _scalars(tmp_path / "tb")
    assert scalars["scl/mean_weight_injected"] == [(5, pytest.approx(0.4))]
    assert scalars["comet/det_sigma"] == [(5, pytest.approx(2e-6))]


def test_run_folder_values_are_escaped(runs, tmp_path: Path) -> None:
    run = tmp_path / "crafted"
    shutil.copytree(runs["c10s0"], run)
    metrics = json.loads((run / "metrics.json").read_text())
    attack = "<script>alert(1)</script>"
    metrics.update(
        category=attack,
        strategy=attack,
        n_train=attack,
        n_test="<img src=x onerror=alert(2)>",
        epochs="<b>3</b>",
    )
    (run / "metrics.json").write_text(json.dumps(metrics))
    page = build_report([run], tmp_path / "r.html", device="cpu").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for raw in (attack, "<img src=x", "<b>3</b>"):
        assert raw not in page
