"""The generated bad-input corpus (tests/support/corpus.py) through every command that reads images.

Each command must either use the rest and name exactly what it left out, or stop with one clear
line and write nothing. Assertions compare against the corpus's own account of every entry, so a
file silently dropped, silently used, or listed twice fails here.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from comet_ray.cli import main
from comet_ray.data.images import load_samples
from comet_ray.data.layout import scan_category

from support import TINY_TRAIN_ARGS
from support.corpus import BadInputCorpus, write_bad_input_corpus

TINY = TINY_TRAIN_ARGS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> BadInputCorpus:
    return write_bad_input_corpus(tmp_path_factory.mktemp("corpus") / "factory")


@pytest.fixture(scope="module")
def messy_run(corpus: BadInputCorpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus-run") / "messy"
    assert main(["train", str(corpus.root), "--category", "messy", "--out", str(out), *TINY]) == 0
    return out


def _ids(records: list[dict]) -> set[str]:
    return {r["sample_id"] for r in records}


def test_corpus_size(corpus: BadInputCorpus) -> None:
    assert corpus.size >= 24  # the closing note quotes this figure


# --- listing and decoding ------------------------------------------------------------------------


def test_listing_leaves_out_bad_names_loops_and_broken_links(corpus: BadInputCorpus) -> None:
    scan = scan_category(str(corpus.root), "messy")
    assert _ids(scan.unlisted) == corpus.left_out_at_listing
    ids = [s.sample_id for s in scan.samples]
    assert len(ids) == len(set(ids)), "a link loop listed images twice"
    assert not any("loop_to_train" in i for i in ids)
    assert corpus.skipped_at_decode | corpus.decoded_odd <= set(ids)
    for record in scan.unlisted:  # printable: safe for JSON, CSV and terminals
        record["uri"].encode("utf-8")
        assert record["reason"]


def test_odd_masks_are_read_and_bad_ones_reported(corpus: BadInputCorpus) -> None:
    spot = [s for s in scan_category(str(corpus.root), "messy").samples if "/test/spot/" in s.sample_id]
    loaded = load_samples(spot, 64, None, with_masks=True)
    issues = _ids(loaded.mask_issues)
    assert issues == corpus.mask_issues
    for sample_id in corpus.masks_ok:  # 0/1-valued and JPEG-compressed masks: read, not empty
        index = loaded.sample_ids.index(sample_id)
        assert bool(loaded.mask_available[index]) and int(loaded.masks[index].sum()) > 20


# --- train, evaluate, predict, export, report on the usable category -------------------------------


def test_train_uses_the_rest_and_lists_every_left_out_file(corpus: BadInputCorpus, messy_run: Path) -> None:
    manifest = json.loads((messy_run / "manifest.json").read_text(encoding="utf-8"))
    assert _ids(manifest["skipped"]) == corpus.skipped_at_decode | corpus.left_out_at_listing
    assert _ids(manifest["mask_issues"]) == corpus.mask_issues
    weights = json.loads((messy_run / "weights.json").read_text(encoding="utf-8"))
    trained_on = set(weights["weights"])
    odd_train = {i for i in corpus.decoded_odd if "/train/" in i}
    assert odd_train <= trained_on, "odd but valid images must be used"
    assert not trained_on & (corpus.skipped_at_decode | corpus.left_out_at_listing)
    metrics = json.loads((messy_run / "metrics.json").read_text())
    assert metrics["n_skipped"] == len(corpus.skipped_at_decode | corpus.left_out_at_listing)
    assert metrics["n_train"] == 14 + len(odd_train)
    assert math.isfinite(metrics["image_auroc"]) and math.isfinite(metrics["pixel_auroc"])


def test_evaluate_reports_the_test_images_it_skipped(
    corpus: BadInputCorpus, messy_run: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                str(messy_run),
                str(corpus.root),
                "--category",
                "messy",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    evaluated = json.loads(out.read_text())
    manifest = json.loads((messy_run / "manifest.json").read_text())
    expected = {i for i in corpus.skipped_at_decode if "/test/" in i} - set(manifest["validation_ids"])
    assert _ids(evaluated["skipped"]) == expected and evaluated["n_skipped"] == len(expected)
    err = capsys.readouterr().err
    for sample_id in expected:
        assert sample_id.split("/")[-1] in err


def test_predict_scores_the_rest_and_gives_each_bad_file_a_row(
    corpus: BadInputCorpus, messy_run: Path, tmp_path: Path
) -> None:
    category = corpus.root / "messy"
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                str(messy_run),
                str(category / "train"),
                str(category / "test"),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--maps",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "predictions.csv").read_text(encoding="utf-8").splitlines()))
    prefix = str(corpus.root) + "/"
    errors = {r["path"].removeprefix(prefix) for r in rows if r["error"]}
    assert errors == corpus.skipped_at_decode | corpus.left_out_at_listing
    scored = [r for r in rows if not r["error"]]
    assert len(scored) == len({r["path"] for r in scored}), "an image was scored twice"
    assert {i for i in corpus.decoded_odd} <= {r["path"].removeprefix(prefix) for r in scored}
    assert len(list((out / "maps").glob("*.png"))) == len(scored)


def test_export_and_report_work_on_the_messy_run(messy_run: Path, tmp_path: Path) -> None:
    assert main(["export", str(messy_run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    assert (tmp_path / "m.pt").stat().st_size > 0
    assert main(["report", str(messy_run), "--out", str(tmp_path / "report.html"), "--device", "cpu"]) == 0
    assert "messy" in (tmp_path / "report.html").read_text(encoding="utf-8")


# --- broken categories: one line, nothing written -----------------------------------------------------


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize(
    "category, expected",
    [
        ("empty", "contains no images"),
        ("only_anomalies", "no good test images"),
        ("no_train", "has no train/ folder"),
    ],
)
def test_untrainable_categories_stop_with_one_line(
    corpus: BadInputCorpus, tmp_path: Path, one_line_error, command: str, category: str, expected: str
) -> None:
    out = tmp_path / "out"
    extra = (
        ["--trials", "2", "--seeds", "0", "--contamination", "0", "--storage-path", str(tmp_path / "tune")]
        if command == "tune"
        else []
    )
    assert main([command, str(corpus.root), "--category", category, "--out", str(out), *extra, *TINY]) == 2
    assert expected in one_line_error()
    assert not out.exists() and not (tmp_path / "tune").exists()


def _refuse_non_json(token: str) -> None:
    raise AssertionError(f"{token} written into a JSON file: not JSON, strict parsers refuse the file")


def test_evaluate_on_anomalies_only_gives_pixel_metrics_and_says_why_image_ones_are_missing(
    corpus: BadInputCorpus, messy_run: Path, tmp_path: Path, capsys, one_line_error
) -> None:
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                str(messy_run),
                str(corpus.root),
                "--category",
                "only_anomalies",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    evaluated = json.loads(out.read_text(), parse_constant=_refuse_non_json)  # undefined is null, not NaN
    assert evaluated["image_auroc"] is None and evaluated["f1_max"] is None
    assert math.isfinite(evaluated["pixel_auroc"])
    assert (
        "image AUROC and F1 are undefined: all 6 evaluated test images are anomalous"
        in capsys.readouterr().err
    )
    assert main(["evaluate", str(messy_run), str(corpus.root), "--category", "empty", "--device", "cpu"]) == 2
    assert "contains no images" in one_line_error()


# --- the same corpus through Ray: Data streaming, Train over several categories, Tune ---------------


@pytest.mark.ray
def test_ray_data_engine_skips_exactly_what_the_local_engine_skips(
    corpus: BadInputCorpus, messy_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ray-engine"
    assert (
        main(["train", str(corpus.root), "--category", "messy", "--engine", "ray", "--out", str(out), *TINY])
        == 0
    )
    streamed = json.loads((out / "manifest.json").read_text())
    local = json.loads((messy_run / "manifest.json").read_text())
    assert _ids(streamed["skipped"]) == _ids(local["skipped"])
    assert _ids(streamed["mask_issues"]) == _ids(local["mask_issues"])
    assert (
        json.loads((out / "metrics.json").read_text())["n_train"]
        == json.loads((messy_run / "metrics.json").read_text())["n_train"]
    )


@pytest.mark.ray
def test_ray_train_over_categories_reports_broken_ones_in_their_row(
    corpus: BadInputCorpus, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "many"
    code = main(
        [
            "train",
            str(corpus.root),
            "--category",
            "messy,empty,only_anomalies",
            "--workers",
            "1",
            "--cpus-per-worker",
            "0.5",
            "--max-failures",
            "0",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert code == 1  # some categories failed; the others' results are kept
    rows = {r["category"]: r for r in json.loads((out / "summary.json").read_text())}
    assert "error" not in rows["messy"] and math.isfinite(rows["messy"]["image_auroc"])
    assert (out / "messy" / "model.pt").exists()
    assert "contains no images" in rows["empty"]["error"] and "\n" not in rows["empty"]["error"]
    assert "no good test images" in rows["only_anomalies"]["error"]
    assert "Traceback" not in capsys.readouterr().out


@pytest.mark.ray
def test_tune_runs_on_the_messy_category(corpus: BadInputCorpus, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "tune",
                str(corpus.root),
                "--category",
                "messy",
                "--contamination",
                "0",
                "--trials",
                "2",
                "--seeds",
                "0",
                "--storage-path",
                str(tmp_path / "tune-runs"),
                "--out",
                str(out),
                "--cpus-per-trial",
                "0.5",
                *TINY,
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    # 2 trials for the baseline's knobs, then 2 for CoMet's; ASHA may stop one trial of each early.
    assert sorted(r["strategy"] for r in rows) == ["baseline"] * 2 + ["comet"] * 2
    assert any(r["objective"] for r in rows if r["strategy"] == "comet")
    assert json.loads((out / "rho_0" / "best.json").read_text())["objective"] > 0


# --- upload, then train from the bucket ------------------------------------------------------------------


def test_upload_leaves_out_what_cannot_be_named_and_s3_training_skips_the_rest(
    corpus: BadInputCorpus, s3_env, tmp_path: Path, capsys
) -> None:
    endpoint = s3_env.endpoint
    s3_env.make_bucket("corpus")
    assert (
        main(["upload", str(corpus.root), "s3://corpus/factory", "--s3-endpoint", endpoint, "--quiet"]) == 0
    )
    printed = capsys.readouterr()
    assert "3 left out" in printed.out
    for name in ("caf\\xe9_latin1.png", "loop_to_train", "broken_link.png"):
        assert name in printed.err
    run = tmp_path / "from-s3"
    assert (
        main(
            [
                "train",
                "s3://corpus/factory",
                "--category",
                "messy",
                "--out",
                str(run),
                "--s3-endpoint",
                endpoint,
                *TINY,
            ]
        )
        == 0
    )
    manifest = json.loads((run / "manifest.json").read_text())
    assert _ids(manifest["skipped"]) == corpus.skipped_at_decode  # the rest never reached the bucket
    assert _ids(manifest["mask_issues"]) == corpus.mask_issues
