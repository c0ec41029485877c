"""``comet-ray audit``: a tiny synthetic run with known injected anomalies, audited locally and on s3://.

One contaminated run is trained once for the module (TINY settings with the fence at Q3, so about a
quarter of the 20 training images is flagged and every path has work); the tests read it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comet_ray.audit import (
    audit_metrics,
    first_below_one,
    load_audit,
    precision_at_k,
    rank_order,
    read_csv,
)
from comet_ray.cli import main
from comet_ray.weights_file import read_training_weights, weights_document

from support import TINY_TRAIN_ARGS

# Fence at Q3 (k = 0) and no warm-up: SCL flags a quarter of the set from the first epoch.
AUDIT_TRAIN = [*TINY_TRAIN_ARGS, "--set", "fence_k=0", "--set", "warmup_epochs=0"]


@pytest.fixture(scope="module")
def dataset(tiny_category: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit-data") / "mvtec"
    shutil.copytree(tiny_category, root)  # the shared category, plus a file that is not an image
    (root / "weave" / "license.txt").write_text("synthetic, no licence needed\n")
    return root


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit-run") / "run"
    assert (
        main(
            [
                "train",
                str(dataset),
                "--category",
                "weave",
                "--contamination",
                "0.2",
                "--out",
                str(out),
                *AUDIT_TRAIN,
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def audited(run) -> Path:
    assert main(["audit", str(run), "--device", "cpu", "--gallery", "3"]) == 0
    return run / "audit"


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- the plain functions -------------------------------------------------------------------------


def test_ranking_and_metrics_on_plain_arrays() -> None:
    ids = ["a", "b", "c", "d", "e"]
    weights = np.array([1.0, 0.4, 1.0, 0.4, 0.9])
    scores = np.array([5.0, 1.0, float("nan"), 2.0, 0.0])
    # Lowest weight first; equal weights by higher score; a NaN score ranks last among equals.
    assert rank_order(weights, scores).tolist() == [3, 1, 4, 0, 2]
    assert rank_order(np.ones(3), np.array([1.0, 3.0, 3.0])).tolist() == [1, 2, 0]  # ties keep row order
    metrics = audit_metrics(ids, weights, scores, {"b", "c"})
    assert metrics["n_flagged"] == 3 and metrics["flagged_share"] == pytest.approx(0.6)
    assert metrics["precision"] == pytest.approx(1 / 3) and metrics["recall"] == pytest.approx(0.5)
    assert metrics["k"] == 2 and metrics["precision_at_k"] == pytest.approx(0.5)  # top 2: d, b
    assert audit_metrics(ids, weights, scores, {"b", "c"}, k=4)["precision_at_k"] == pytest.approx(0.25)
    plain = audit_metrics(ids, weights, scores)  # nothing known: no precision claimed
    assert "precision" not in plain and plain["flagged_weight_min"] == pytest.approx(0.4)
    assert audit_metrics(ids, np.ones(5), None, {"a"})["precision"] is None  # nothing flagged: undefined
    assert precision_at_k([0, 1], np.array([True, False]), 0) is None
    per_epoch = np.array([[1.0, 1.0, np.nan], [0.5, 1.0, 0.9], [0.7, 1.0, 1.0]])
    assert first_below_one(per_epoch) == [2, None, 2]


def test_weights_file_round_trip_keeps_every_epoch_and_stays_sparse() -> None:
    ids = [f"img{i}" for i in range(6)]
    history = np.ones((3, 6))
    history[1, 2] = 0.25
    history[2, 2] = 0.9999999  # still below 1 after rounding
    history[0, :] = np.nan  # an epoch resumed from state that predates weight histories
    document = json.loads(json.dumps(weights_document(ids, history[-1], {"img2"}, history, np.arange(6.0))))
    assert list(document["per_epoch"]["below_one"]) == ["img2"]  # the others were 1 throughout
    assert document["per_epoch"]["unknown_epochs"] == [1]
    read = read_training_weights(document)
    assert read.ids == ids and read.injected == {"img2"}
    np.testing.assert_array_equal(read.scores, np.arange(6.0))
    assert np.isnan(read.per_epoch[0]).all()
    assert read.per_epoch[1, 2] == pytest.approx(0.25) and read.per_epoch[2, 2] < 1
    assert (read.per_epoch[1:, [0, 1, 3, 4, 5]] == 1).all()
    older = read_training_weights({"weights": {"a": 1.0}, "injected": []})
    assert older.per_epoch is None and older.scores is None


def test_trainer_weight_history_is_every_epoch_and_survives_resume() -> None:
    from comet_ray.comet.trainer import CometTrainer
    from comet_ray.config import TrainConfig
    from comet_ray.features.store import FeatureStore
    from comet_ray.models import build_detector

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(24, 9, 8, generator=generator)
    features[[2, 11]] += 3.0  # two clear outliers
    store = FeatureStore([f"s{i:02d}" for i in range(24)], features, (3, 3))
    config = TrainConfig(epochs=3, passes=1, batch_size=8, seed=0)
    config.model.discriminator_hidden, config.model.noise_std = 16, 0.1
    config.comet.meta_tasks, config.comet.task_size, config.comet.inner_steps = 2, 4, 1

    def trainer() -> CometTrainer:
        torch.manual_seed(0)
        return CometTrainer(build_detector("simplenet", 8, config.model), store, config)

    straight = trainer()
    logs = straight.fit(3)
    history = straight.weight_history_tensor()
    assert history.shape == (3, 24)
    assert [int((row < 1).sum()) for row in history] == [log.low_confidence for log in logs]
    torch.testing.assert_close(history[-1], straight.sample_weights)
    first = trainer()
    first.fit(2)
    resumed = trainer()
    resumed.load_state_dict(first.state_dict())
    resumed.fit(3)
    torch.testing.assert_close(resumed.weight_history_tensor(), history)
    # A state from before weight histories: earlier epochs are unknown (NaN), not invented.
    old_state = first.state_dict()
    del old_state["weight_history"]
    older = trainer()
    older.load_state_dict(old_state)
    assert torch.isnan(older.weight_history_tensor()).all() and older.weight_history_tensor().shape == (2, 24)


# --- the audit of a run --------------------------------------------------------------------------


def test_audit_ranks_every_training_image_and_scores_the_flagged_against_the_injected(
    run, audited, capsys
) -> None:
    weights = json.loads((run / "weights.json").read_text())
    rows = read_csv(audited / "audit.csv")
    assert [r["rank"] for r in rows] == list(range(1, len(weights["weights"]) + 1))
    assert {r["sample_id"] for r in rows} == set(weights["weights"])
    for row in rows:
        assert row["weight"] == pytest.approx(weights["weights"][row["sample_id"]])
        assert row["score"] == pytest.approx(weights["scores"][row["sample_id"]])
        assert row["flagged"] == int(row["weight"] < 1)
        assert row["injected"] == int(row["sample_id"] in weights["injected"])
        assert Path(row["path"]).is_file()
        epochs = weights["per_epoch"]["below_one"].get(row["sample_id"])
        expected = None if epochs is None else 1 + next(i for i, w in enumerate(epochs) if w < 1)
        assert row["first_below_one"] == expected
    keys = [(r["weight"], -r["score"]) for r in rows]
    assert keys == sorted(keys)  # most suspect first
    flagged = {r["sample_id"] for r in rows if r["flagged"]}
    injected = set(weights["injected"])
    assert flagged and injected and len(injected) == 4
    summary = json.loads((audited / "audit.json").read_text())
    assert summary["n_flagged"] == len(flagged)
    assert summary["flagged_share"] == pytest.approx(len(flagged) / len(rows))
    assert summary["precision"] == pytest.approx(len(flagged & injected) / len(flagged))
    assert summary["recall"] == pytest.approx(len(flagged & injected) / len(injected))
    top = {r["sample_id"] for r in rows[: len(injected)]}
    assert summary["precision_at_k"] == pytest.approx(len(top & injected) / len(injected))
    history = json.loads((run / "history.json").read_text())
    assert summary["fence"] == pytest.approx(history[-1]["fence"])
    # The gallery: the top suspects' panels (predict --maps' three-panel PNGs), rank first in the name.
    panels = sorted(p.name for p in (audited / "gallery").iterdir())
    assert len(panels) == 3 and [p[:3] for p in panels] == ["01-", "02-", "03-"]
    assert panels == summary["gallery"]
    for rank, name in enumerate(panels, start=1):
        assert name.endswith(Path(rows[rank - 1]["sample_id"]).name)
        with Image.open(audited / "gallery" / name) as image:
            assert image.width > 2.5 * image.height
    with Image.open(audited / "weights_trajectory.png") as chart:
        assert chart.format == "PNG"
    main(["audit", str(run), "--device", "cpu", "--gallery", "0", "--out", str(audited.parent / "again")])
    out = capsys.readouterr().out
    assert f"{len(flagged)} image(s)" in out and "injected" in out and "precision" in out


def test_audit_of_a_run_without_contamination_counts_and_does_not_claim_defects(
    dataset, tmp_path, capsys
) -> None:
    run = tmp_path / "clean-run"
    assert main(["train", str(dataset), "--category", "weave", "--out", str(run), *AUDIT_TRAIN]) == 0
    capsys.readouterr()
    assert main(["audit", str(run), "--device", "cpu", "--gallery", "0"]) == 0
    out = capsys.readouterr().out
    rows = read_csv(run / "audit" / "audit.csv")
    flagged = [r for r in rows if r["flagged"]]
    assert flagged, "the fence at Q3 always flags part of the set"
    assert f"{len(flagged)} image(s)" in out and "weights" in out
    assert "precision" not in out and "injected" not in out and "unusual is not defective" in out
    assert all(r["injected"] is None for r in rows)
    summary = json.loads((run / "audit" / "audit.json").read_text())
    assert "precision" not in summary and summary["injected_known"] is False


def test_older_run_folder_gets_one_line_and_nothing_is_written(run, tmp_path, one_line_error) -> None:
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("audit"))
    document = json.loads((old / "weights.json").read_text())
    (old / "weights.json").write_text(
        json.dumps({"weights": document["weights"], "injected": document["injected"]})
    )
    before = _tree(old)
    assert main(["audit", str(old), "--export-clean", str(tmp_path / "clean")]) == 2
    error = one_line_error()
    assert "older comet-ray" in error and "no per-epoch weights" in error and "train it again" in error
    assert _tree(old) == before and not (old / "audit").exists() and not (tmp_path / "clean").exists()


def test_export_clean_leaves_the_source_untouched_and_retrains(
    run, dataset, tmp_path, capsys, one_line_error
) -> None:
    source = _tree(dataset)
    clean = tmp_path / "clean"
    assert (
        main(
            [
                "audit",
                str(run),
                "--out",
                str(tmp_path / "audit"),
                "--gallery",
                "0",
                "--export-clean",
                str(clean),
            ]
        )
        == 0
    )
    assert _tree(dataset) == source
    rows = read_csv(tmp_path / "audit" / "audit.csv")
    manifest = json.loads((clean / "export_manifest.json").read_text())
    flagged = {r["sample_id"] for r in rows if r["flagged"]}
    assert {r["sample_id"] for r in manifest["left_out"]} == flagged
    assert all("weight" in r["reason"] for r in manifest["left_out"])
    run_manifest = json.loads((run / "manifest.json").read_text())
    moved = {m["sample_id"] for m in run_manifest["contamination"]["moved"]}
    exported = _tree(clean / "weave")

    def in_export(
        sample_id: str,
    ) -> str:  # weave/train/good/x.png -> train/good/x.png; injected -> train/spot/x.png
        relative = sample_id.split("/", 1)[1]
        return "train/" + relative.split("/", 1)[1] if sample_id in moved else relative

    # train/: the run's training set minus the flagged images, same bytes as at the source.
    kept = [r["sample_id"] for r in rows if r["sample_id"] not in flagged]
    assert {p for p in exported if p.startswith("train/")} == {in_export(i) for i in kept}
    assert all(exported[in_export(i)] == source[i] for i in kept)
    # The run moved injected test images into training: those not flagged are exported as training
    # anomalies (train/<defect>/), and they are the export's only non-"good" training images.
    assert moved and moved <= {r["sample_id"] for r in rows}, (
        "the contaminated run moved nothing into training"
    )
    assert {p for p in exported if p.startswith("train/") and not p.startswith("train/good/")} == {
        in_export(i) for i in moved - flagged
    }
    # test/: the source's, minus what the run moved into training; masks; the licence beside them.
    expected_test = {p for p in source if p.startswith("weave/test/") and p not in moved}
    assert {"weave/" + p for p in exported if p.startswith("test/")} == expected_test
    assert "license.txt" in exported and any(p.startswith("ground_truth/") for p in exported)
    nominal = min(in_export(i) for i in kept if i not in moved)
    assert (clean / "weave" / nominal).stat().st_ino == (
        dataset / "weave" / nominal
    ).stat().st_ino  # a hard link
    # A valid category: comet-ray train accepts it as it is.
    assert (
        main(
            [
                "train",
                str(clean),
                "--category",
                "weave",
                "--out",
                str(tmp_path / "retrained"),
                *TINY_TRAIN_ARGS,
            ]
        )
        == 0
    )
    retrained = json.loads((tmp_path / "retrained" / "metrics.json").read_text())
    assert retrained["n_train"] == len(kept) and math.isfinite(retrained["image_auroc"])
    # Never overwritten: a second export into the same folder is refused and changes nothing.
    before = _tree(clean)
    capsys.readouterr()
    assert main(["audit", str(run), "--out", str(tmp_path / "audit2"), "--export-clean", str(clean)]) == 2
    assert "not empty" in one_line_error()
    assert _tree(clean) == before and not (tmp_path / "audit2").exists()


def test_report_has_the_training_set_audit(run, audited, tmp_path) -> None:
    from comet_ray.report import build_report

    page = build_report([run], tmp_path / "report.html", device="cpu", suspects=2).read_text()
    assert "Training-set audit" in page and "Top suspects" in page
    section = page[page.index("Training-set audit") :]
    assert section.count("<img") == 3  # the trajectory chart and two panels
    assert "top-4 precision" in section


def test_load_audit_matches_the_cli(run, audited) -> None:
    audit = load_audit(run)
    assert [audit.ids[i] for i in audit.order] == [r["sample_id"] for r in read_csv(audited / "audit.csv")]


# --- s3:// ---------------------------------------------------------------------------------------


def _objects(client, bucket: str, prefix: str) -> dict[str, str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix) :]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def test_audit_of_an_s3_run_on_s3_data_and_an_s3_clean_copy(s3_server, s3_dataset, tmp_path) -> None:
    _, data = s3_dataset
    endpoint, client, bucket = s3_server.endpoint, s3_server.client(), "comet-test"
    local_run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                data,
                "--category",
                "weave",
                "--contamination",
                "0.2",
                "--out",
                str(local_run),
                "--s3-endpoint",
                endpoint,
                *AUDIT_TRAIN,
            ]
        )
        == 0
    )
    s3_server.upload_tree(local_run, bucket, "runs/audited")
    source = _objects(client, bucket, "datasets/mvtec/")
    run = f"s3://{bucket}/runs/audited"
    assert (
        main(
            [
                "audit",
                run,
                "--s3-endpoint",
                endpoint,
                "--device",
                "cpu",
                "--gallery",
                "2",
                "--export-clean",
                f"s3://{bucket}/clean",
            ]
        )
        == 0
    )
    assert _objects(client, bucket, "datasets/mvtec/") == source
    written = _objects(client, bucket, "runs/audited/audit/")
    assert {"audit.csv", "audit.json", "weights_trajectory.png"} <= set(written)
    assert sorted(k[:11] for k in written if k.startswith("gallery/")) == ["gallery/01-", "gallery/02-"]
    remote_csv = tmp_path / "remote.csv"
    remote_csv.write_bytes(
        client.get_object(Bucket=bucket, Key="runs/audited/audit/audit.csv")["Body"].read()
    )
    # The same audit as of the local copy of the run: same ranking, the images' s3:// locations.
    assert main(["audit", str(local_run), "--s3-endpoint", endpoint, "--gallery", "0"]) == 0
    rows = read_csv(remote_csv)
    assert rows == read_csv(local_run / "audit" / "audit.csv")
    assert all(r["path"].startswith(f"s3://{bucket}/datasets/mvtec/weave/") for r in rows)
    summary = json.loads(client.get_object(Bucket=bucket, Key="runs/audited/audit/audit.json")["Body"].read())
    assert summary["run"] == run and summary["n_injected"] == 4
    # The clean copy on s3: the flagged images left out, a category train accepts.
    exported = _objects(client, bucket, "clean/")
    flagged = {r["sample_id"] for r in rows if r["flagged"]}
    assert "export_manifest.json" in exported
    assert sum(k.startswith("weave/train/") for k in exported) == len(rows) - len(flagged)
    assert not any(("weave/" + k.split("/", 1)[1]) in flagged for k in exported if k.startswith("weave/"))
    assert (
        main(
            [
                "train",
                f"s3://{bucket}/clean",
                "--category",
                "weave",
                "--out",
                str(tmp_path / "retrained"),
                "--s3-endpoint",
                endpoint,
                *TINY_TRAIN_ARGS,
            ]
        )
        == 0
    )


def test_export_clean_between_local_and_s3(run, s3_env, s3_dataset, tmp_path) -> None:
    """A local run exported to s3://, and an s3:// data root exported to a local folder."""
    endpoint, client = s3_env.endpoint, s3_env.client()
    assert (
        main(
            [
                "audit",
                str(run),
                "--out",
                str(tmp_path / "a"),
                "--gallery",
                "0",
                "--s3-endpoint",
                endpoint,
                "--export-clean",
                "s3://comet-test/from-local",
            ]
        )
        == 0
    )
    rows = read_csv(tmp_path / "a" / "audit.csv")
    kept = sum(1 for r in rows if not r["flagged"])
    objects = _objects(client, "comet-test", "from-local/")
    assert sum(k.startswith("weave/train/") for k in objects) == kept and "export_manifest.json" in objects
    _, data = s3_dataset
    remote_run = tmp_path / "remote-data-run"
    assert (
        main(
            [
                "train",
                data,
                "--category",
                "weave",
                "--contamination",
                "0.2",
                "--out",
                str(remote_run),
                "--s3-endpoint",
                endpoint,
                *AUDIT_TRAIN,
            ]
        )
        == 0
    )
    clean = tmp_path / "clean"
    assert (
        main(
            [
                "audit",
                str(remote_run),
                "--gallery",
                "0",
                "--s3-endpoint",
                endpoint,
                "--export-clean",
                str(clean),
                "--copy",
            ]
        )
        == 0
    )
    manifest = json.loads((clean / "export_manifest.json").read_text())
    assert manifest["mode"] == "copy" and manifest["n_left_out"] > 0
    assert len(list((clean / "weave" / "train").rglob("*.png"))) == manifest["n_train_kept"]


def test_demo_ends_with_the_audit_of_its_comet_run(run, tmp_path) -> None:
    from comet_ray.demo import demo_audit

    shutil.copytree(run, tmp_path / "comet", ignore=shutil.ignore_patterns("audit"))
    lines = demo_audit(str(tmp_path), device="cpu")
    summary = json.loads((tmp_path / "comet" / "audit" / "audit.json").read_text())
    text = "\n".join(lines)
    assert f"{summary['n_flagged_injected']} of the {summary['n_injected']} injected anomalies" in text
    assert f"top-{summary['k']} precision {summary['precision_at_k']:.2f}" in text
    gallery = tmp_path / "comet" / "audit" / "gallery"
    assert str(gallery) in text and len(list(gallery.glob("*.png"))) == 8
