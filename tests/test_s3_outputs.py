"""``--out s3://...`` and ``--cache-dir s3://...`` for the commands that run without a cluster.

On a cluster the nodes share no disk, so results and caches go to S3. Here the same commands run in
this process against the session's SeaweedFS server: ``train`` (results staged locally, uploaded once
complete, nothing uploaded when the run fails), the feature cache under an S3 prefix (one entry per
fingerprint, read back by the next run instead of re-extracting, never a local folder named
``s3:``), and ``evaluate`` / ``predict`` / ``report`` reading a run folder from S3 and writing their
outputs there.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from comet_ray.cli import main

from support import TINY_TRAIN_ARGS as TINY

BUCKET = "comet-test"
# A fresh prefix per run: nothing left from an earlier one.
RUN = f"outputs-{uuid.uuid4().hex[:8]}"


def keys(s3, prefix: str) -> list[str]:
    page = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"][len(prefix) :] for item in page.get("Contents", []))


@pytest.fixture(scope="module")
def trained(s3_dataset, s3_server, tmp_path_factory):
    """One in-process ``train`` with ``--out`` and ``--cache-dir`` in S3, run from an empty folder."""
    _, uri = s3_dataset
    cwd = tmp_path_factory.mktemp("cwd")
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(
            [
                "train",
                uri,
                "--category",
                "weave",
                "--out",
                f"s3://{BUCKET}/{RUN}/run",
                "--cache-dir",
                f"s3://{BUCKET}/{RUN}/cache",
                "--s3-endpoint",
                s3_server.endpoint,
                *TINY,
            ]
        )
    finally:
        os.chdir(previous)
    assert code == 0
    return cwd


def test_train_writes_its_results_to_s3_once_complete(trained: Path, s3_server, capsys) -> None:
    names = keys(s3_server, f"{RUN}/run/")
    assert {
        "metrics.json",
        "model.pt",
        "manifest.json",
        "history.json",
        "weights.json",
        "config.json",
        "scores.csv",
    } <= set(names)
    assert not [n for n in names if n.startswith(".resume")]  # the per-epoch resume state stays local
    metrics = json.loads(
        s3_server.client().get_object(Bucket=BUCKET, Key=f"{RUN}/run/metrics.json")["Body"].read()
    )
    assert metrics["epochs"] == 2 and metrics["category"] == "weave"
    entries = keys(s3_server, f"{RUN}/cache/")
    assert len({e.split("/")[0] for e in entries}) == 1 and any(e.endswith("/index.json") for e in entries)
    assert not (trained / "s3:").exists() and list(trained.iterdir()) == []  # nothing written where it ran


def test_the_s3_feature_cache_is_read_back_instead_of_extracting(
    trained, s3_dataset, s3_server, capsys
) -> None:
    _, uri = s3_dataset
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                uri,
                "--category",
                "weave",
                "--strategy",
                "baseline",
                "--out",
                f"s3://{BUCKET}/{RUN}/again",
                "--cache-dir",
                f"s3://{BUCKET}/{RUN}/cache",
                "--s3-endpoint",
                s3_server.endpoint,
                *TINY,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"features: read 30 images from the cache s3://{BUCKET}/{RUN}/cache/" in out
    assert "features: extracted" not in out


def test_a_failed_train_uploads_nothing(s3_dataset, s3_server, one_line_error) -> None:
    _, uri = s3_dataset
    code = main(
        [
            "train",
            uri,
            "--category",
            "no-such-category",
            "--out",
            f"s3://{BUCKET}/{RUN}/failed",
            "--s3-endpoint",
            s3_server.endpoint,
            *TINY,
        ]
    )
    assert code == 2 and "no-such-category" in one_line_error()
    assert keys(s3_server, f"{RUN}/failed") == []


def test_evaluate_predict_and_report_read_and_write_s3(trained, s3_dataset, s3_server, capsys) -> None:
    _, uri = s3_dataset
    endpoint = ["--s3-endpoint", s3_server.endpoint]
    run = f"s3://{BUCKET}/{RUN}/run"
    assert (
        main(
            [
                "evaluate",
                run,
                uri,
                "--category",
                "weave",
                "--device",
                "cpu",
                "--out",
                f"s3://{BUCKET}/{RUN}/eval/metrics.json",
                *endpoint,
            ]
        )
        == 0
    )
    evaluated = json.loads(
        s3_server.client().get_object(Bucket=BUCKET, Key=f"{RUN}/eval/metrics.json")["Body"].read()
    )
    # the run's manifest came along with model.pt: its validation and moved images are left out
    manifest = json.loads(
        s3_server.client().get_object(Bucket=BUCKET, Key=f"{RUN}/run/manifest.json")["Body"].read()
    )
    assert evaluated["n_images"] == len(manifest["report_ids"])

    assert (
        main(
            [
                "predict",
                f"{run}/model.pt",
                f"{uri}/weave/test/",
                "--device",
                "cpu",
                "--out",
                f"s3://{BUCKET}/{RUN}/predictions",
                *endpoint,
            ]
        )
        == 0
    )
    assert f"-> s3://{BUCKET}/{RUN}/predictions/predictions.csv" in capsys.readouterr().out
    rows = (
        s3_server.client().get_object(Bucket=BUCKET, Key=f"{RUN}/predictions/predictions.csv")["Body"].read()
    )
    assert rows.decode().count("\n") == 1 + 14  # header + every test image

    assert (
        main(["report", run, "--device", "cpu", "--out", f"s3://{BUCKET}/{RUN}/report.html", *endpoint]) == 0
    )
    page = s3_server.client().get_object(Bucket=BUCKET, Key=f"{RUN}/report.html")["Body"].read().decode()
    assert page.startswith("<!DOCTYPE html>") and "weave" in page
