"""The command line end to end on a small synthetic category, and its behaviour on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from comet_ray.cli import main

from support import TINY_TRAIN_ARGS, csv_rows

TINY = TINY_TRAIN_ARGS


def test_train_writes_results(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for key in (
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "f1_max",
        "strategy",
        "contamination",
        "achieved_contamination",
        "seed",
        "n_train",
        "n_test",
        "train_seconds",
        "f1_at_threshold",
        "precision_at_threshold",
        "recall_at_threshold",
    ):
        assert key in metrics
    # at the validation threshold: a real operating point, never above the report split's own best F1
    f1, p, r = (metrics[k] for k in ("f1_at_threshold", "precision_at_threshold", "recall_at_threshold"))
    assert 0.0 <= f1 <= metrics["f1_max"] + 1e-9 and f1 == pytest.approx(
        2 * p * r / (p + r) if p + r else 0.0
    )
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    moved = {m["sample_id"] for m in manifest["contamination"]["moved"]}
    assert len(moved) == 4  # round(0.2 * 16 / 0.8)
    assert not moved & set(manifest["report_ids"]) and not moved & set(manifest["validation_ids"])
    assert not set(manifest["validation_ids"]) & set(manifest["report_ids"])
    assert (tiny_run / "model.pt").exists()
    assert len(json.loads((tiny_run / "history.json").read_text())) == 2


def test_evaluate_reproduces_the_report_split(tiny_run: Path, tiny_category: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                str(tiny_run),
                str(tiny_category),
                "--category",
                "weave",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    evaluated = json.loads(out.read_text())
    trained = json.loads((tiny_run / "metrics.json").read_text())
    assert evaluated["n_images"] == trained["n_test"]
    assert evaluated["image_auroc"] == pytest.approx(trained["image_auroc"], abs=1e-6)


def test_evaluate_of_a_lone_checkpoint_never_scores_held_out_images(
    tiny_run: Path, tiny_category: Path, tmp_path: Path, capsys
) -> None:
    """model.pt carries the run's validation and training-moved ids; one without them and no manifest is refused."""
    import torch

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tiny_run / "model.pt", lone / "model.pt")
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                str(lone / "model.pt"),
                str(tiny_category),
                "--category",
                "weave",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    trained = json.loads((tiny_run / "metrics.json").read_text())
    assert json.loads(out.read_text())["n_images"] == trained["n_test"]
    payload = torch.load(lone / "model.pt", weights_only=True)
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert set(payload["extra"]["held_out_ids"]) == set(manifest["validation_ids"]) | {
        m["sample_id"] for m in manifest["contamination"]["moved"]
    }
    del payload["extra"]["held_out_ids"]
    torch.save(payload, lone / "model.pt")
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(lone / "model.pt"),
                str(tiny_category),
                "--category",
                "weave",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "refused.json"),
            ]
        )
        != 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot tell which test images" in err[0]
    assert not (tmp_path / "refused.json").exists()


def test_predict_scores_images_and_reports_unreadable_ones(
    tiny_run: Path, tiny_category: Path, tmp_path: Path
) -> None:
    images = tmp_path / "inbox"
    images.mkdir()
    for source in sorted((tiny_category / "weave" / "test" / "spot").glob("*.png"))[:2]:
        (images / source.name).write_bytes(source.read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert (
        main(
            [
                "predict",
                str(tiny_run / "model.pt"),
                str(images),
                "--out",
                str(tmp_path / "pred"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    rows = csv_rows(tmp_path / "pred" / "predictions.csv")
    assert len(rows) == 3
    broken = next(r for r in rows if r["path"].endswith("broken.png"))
    assert broken["error"] and broken["score"] == ""
    scored = [r for r in rows if not r["error"]]
    assert all(r["anomalous"] in ("0", "1") for r in scored)


def test_not_an_mvtec_tree_gives_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"")
    out = tmp_path / "out"
    code = main(["train", str(tmp_path), "--category", "photos", "--out", str(out), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("comet-ray: error:") and "train" in err[0]
    assert not out.exists()


def test_wrong_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert main(["predict", str(bogus), str(tmp_path)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_console_script_help_explains_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "comet_ray", "train", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    for option in (
        "--strategy",
        "--contamination",
        "--backbone",
        "--epochs",
        "--passes",
        "--image-size",
        "--out",
    ):
        assert option in result.stdout
