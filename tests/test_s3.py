"""Datasets on a real S3-compatible server (SeaweedFS on 127.0.0.1): listing, the CLI end to end,
one-line errors for every way storage fails, retries with backoff, upload, and no leaked secrets."""

from __future__ import annotations

import argparse
import json
import threading
import time
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from comet_ray.cli import main
from comet_ray.cli.upload import register
from comet_ray.data.layout import (
    build_sample_table,
    list_categories,
    list_image_uris,
    open_dataset_filesystem,
    read_bytes,
)
from comet_ray.data.s3 import parse_s3_uri, public_s3_uri
from comet_ray.errors import DatasetLayoutError, StorageError
from comet_ray.features.streaming import StorageSpec
from comet_ray.upload import upload_tree

from support import TINY_TRAIN_ARGS, csv_rows
from support.s3server import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, FlakyProxy, free_ports

TINY = TINY_TRAIN_ARGS
WRONG_SECRET = "wrongWrongWrongWrongWrongWrongWrong00001"  # 40 characters


@pytest.fixture
def s3(s3_server, s3_dataset) -> SimpleNamespace:
    local, uri = s3_dataset
    return SimpleNamespace(server=s3_server, endpoint=s3_server.endpoint, local=local, uri=uri)


def _normalised(samples, root_prefix: str) -> list[tuple]:
    return [
        (
            s.sample_id,
            s.category,
            s.split,
            s.defect,
            s.uri.removeprefix(root_prefix),
            (s.mask_uri or "").removeprefix(root_prefix),
        )
        for s in samples
    ]


# --- URIs (no server) -----------------------------------------------------------------------------


def test_s3_uris_keep_credentials_out_of_sight() -> None:
    location = parse_s3_uri(
        f"s3://{FAKE_ACCESS_KEY}:{FAKE_SECRET_KEY.replace('/', '%2F')}@bucket/a/b/?region=eu-west-1"
    )
    assert (location.bucket, location.key, location.path, location.region) == (
        "bucket",
        "a/b",
        "bucket/a/b",
        "eu-west-1",
    )
    assert (location.access_key, location.secret_key) == (FAKE_ACCESS_KEY, FAKE_SECRET_KEY)
    assert FAKE_SECRET_KEY not in repr(location) and location.public == "s3://bucket/a/b"
    assert public_s3_uri(f"s3://{FAKE_ACCESS_KEY}:x@bucket/a?endpoint_override=h") == "s3://bucket/a"
    assert public_s3_uri("/local/path") == "/local/path"
    assert FAKE_SECRET_KEY not in repr(
        StorageSpec("http://h:1", access_key=FAKE_ACCESS_KEY, secret_key=FAKE_SECRET_KEY)
    )
    with pytest.raises(StorageError, match="no bucket"):
        parse_s3_uri("s3:///key")


# --- listing --------------------------------------------------------------------------------------


def test_listing_on_s3_equals_local(s3) -> None:
    local, uri = s3.local, s3.uri
    endpoint = s3.endpoint
    remote = build_sample_table(uri, "weave", open_dataset_filesystem(uri, endpoint)[0])
    expected = build_sample_table(str(local), "weave")
    assert len(remote) == len(expected) == 16 + 6 + 8
    assert _normalised(remote, uri) == _normalised(expected, str(local))
    assert all(s.uri.startswith(f"{uri}/weave/") for s in remote)
    assert list_categories(uri, open_dataset_filesystem(uri, endpoint)[0]) == ["weave"]
    # the category folder itself as the root works the same way
    assert len(build_sample_table(f"{uri}/weave/", None, open_dataset_filesystem(uri, endpoint)[0])) == 30


def test_endpoint_and_region_from_env_and_credentials_from_profile(s3, tmp_path, monkeypatch) -> None:
    local, uri = s3.local, s3.uri
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    fs, base = open_dataset_filesystem(uri)
    assert isinstance(fs, pafs.S3FileSystem) and fs.region == "eu-central-1"
    assert base == uri.removeprefix("s3://")
    assert len(build_sample_table(uri, "weave")) == 30
    # credentials from a named profile in a shared credentials file, none in the environment
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[comet]\naws_access_key_id = {FAKE_ACCESS_KEY}\naws_secret_access_key = {FAKE_SECRET_KEY}\n"
    )
    (tmp_path / "config").write_text("[profile comet]\nregion = eu-central-1\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "comet")
    samples = build_sample_table(uri, "weave")
    assert len(samples) == 30
    assert (
        read_bytes(samples[0].uri, open_dataset_filesystem(uri)[0])
        == (local / samples[0].sample_id).read_bytes()
    )


# --- one-line errors ------------------------------------------------------------------------------


def test_denied_credentials_give_one_line_without_secrets(s3, monkeypatch, one_line_error, tmp_path) -> None:
    uri = s3.uri
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    with pytest.raises(StorageError, match="access denied to s3://comet-test/datasets/mvtec") as err:
        build_sample_table(uri, "weave", open_dataset_filesystem(uri, s3.endpoint)[0])
    assert "AWS_ACCESS_KEY_ID" in str(err.value) and "\n" not in str(err.value)
    code = main(
        [
            "train",
            uri,
            "--category",
            "weave",
            "--out",
            str(tmp_path / "run"),
            "--s3-endpoint",
            s3.endpoint,
            *TINY,
        ]
    )
    assert code == 2
    line = one_line_error()
    assert "access denied" in line and WRONG_SECRET not in line and FAKE_SECRET_KEY not in line
    assert not (tmp_path / "run").exists()


def test_endpoint_down_gives_one_line_quickly(s3, monkeypatch, capsys, one_line_error, tmp_path) -> None:
    uri = s3.uri
    monkeypatch.setenv("COMET_RAY_S3_MAX_ATTEMPTS", "2")
    down = f"http://127.0.0.1:{free_ports(1)[0]}"
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the object store at {down}.*connection refused"):
        build_sample_table(uri, "weave", open_dataset_filesystem(uri, down)[0])
    code = main(
        [
            "evaluate",
            str(tmp_path / "model.pt"),
            uri,
            "--category",
            "weave",
            "--s3-endpoint",
            down,
            "--device",
            "cpu",
        ]
    )
    assert code == 2  # the checkpoint is missing: evaluate fails before touching storage
    capsys.readouterr()
    code = main(
        ["train", uri, "--category", "weave", "--out", str(tmp_path / "run"), "--s3-endpoint", down, *TINY]
    )
    assert code == 2 and "cannot reach the object store" in one_line_error()
    assert time.monotonic() - start < 30


def test_missing_bucket_and_wrong_prefix(s3, one_line_error, tmp_path) -> None:
    endpoint = s3.endpoint
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        build_sample_table(
            "s3://no-such-bucket/mvtec", "weave", open_dataset_filesystem("s3://x", endpoint)[0]
        )
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        list_categories("s3://no-such-bucket", open_dataset_filesystem("s3://x", endpoint)[0])
    with pytest.raises(DatasetLayoutError, match="s3://comet-test/datasets/nope does not exist: no object"):
        build_sample_table(
            "s3://comet-test/datasets/nope", "weave", open_dataset_filesystem("s3://x", endpoint)[0]
        )
    with pytest.raises(DatasetLayoutError, match="category 'gadget' not found.*available: \\['weave'\\]"):
        build_sample_table(s3.uri, "gadget", open_dataset_filesystem("s3://x", endpoint)[0])
    code = main(
        [
            "train",
            "s3://no-such-bucket/mvtec",
            "--category",
            "weave",
            "--out",
            str(tmp_path / "run"),
            "--s3-endpoint",
            endpoint,
            *TINY,
        ]
    )
    assert code == 2 and "bucket 'no-such-bucket' does not exist" in one_line_error()


def test_list_image_uris_for_predict(s3, monkeypatch) -> None:
    uris = list_image_uris(f"{s3.uri}/weave/test/spot/", s3.endpoint)
    assert len(uris) == 8 and all(u.startswith(f"{s3.uri}/weave/test/spot/") for u in uris)
    assert list_image_uris(uris[0], s3.endpoint) == [uris[0]]
    assert list_image_uris(f"{s3.uri}/nothing-here", s3.endpoint) == []
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        list_image_uris("s3://no-such-bucket/x", s3.endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    with pytest.raises(StorageError, match="access denied"):
        list_image_uris(f"{s3.uri}/weave/test/spot/", s3.endpoint)


# --- retries --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_transient_errors_are_retried(s3, mode: str) -> None:
    local, uri = s3.local, s3.uri
    with FlakyProxy(s3.server.port, fail_first=2, mode=mode) as proxy:
        fs, _ = open_dataset_filesystem(uri, proxy.endpoint)
        samples = build_sample_table(uri, "weave", fs)
        assert len(samples) == 30
        assert proxy.failed == 2 and proxy.connections >= 3  # two failed attempts, then success
        assert read_bytes(samples[0].uri, fs) == (local / samples[0].sample_id).read_bytes()


def test_server_coming_back_is_retried_with_backoff(s3, monkeypatch) -> None:
    uri = s3.uri
    monkeypatch.setenv("COMET_RAY_S3_MAX_ATTEMPTS", "10")
    with FlakyProxy(s3.server.port, down_for=1.5) as proxy:  # connection refused for 1.5 s
        fs, _ = open_dataset_filesystem(uri, proxy.endpoint)
        start = time.monotonic()
        samples = build_sample_table(uri, "weave", fs)
        assert time.monotonic() - start >= 1.4  # it waited for the "restart", retrying
        assert len(samples) == 30 and proxy.connections >= 1


def test_server_restarted_while_training_reads_images_loses_nothing(
    s3, tmp_path, monkeypatch, capsys
) -> None:
    """The real server process is stopped and started again while ``train`` is reading the category.

    A slow link (the proxy delays every answer) keeps the reads going long enough for the restart
    to land in the middle; the run must retry through it, skip nothing, and match a run without it.
    """
    monkeypatch.setenv("COMET_RAY_S3_MAX_ATTEMPTS", "12")
    reference = tmp_path / "reference"
    assert (
        main(
            [
                "train",
                s3.uri,
                "--category",
                "weave",
                "--out",
                str(reference),
                "--s3-endpoint",
                s3.endpoint,
                *TINY,
            ]
        )
        == 0
    )
    outage: dict[str, float] = {}

    def restart_mid_read(proxy: FlakyProxy) -> None:
        deadline = time.monotonic() + 120
        while proxy.bytes_down < 40_000 and time.monotonic() < deadline:  # listing done, a few images read
            time.sleep(0.02)
        outage["at_bytes"] = proxy.bytes_down
        s3.server.restart()
        outage["after_bytes"] = proxy.bytes_down

    run = tmp_path / "run"
    with FlakyProxy(s3.server.port, chunk_delay=0.05) as proxy:
        restarter = threading.Thread(target=restart_mid_read, args=(proxy,), daemon=True)
        restarter.start()
        code = main(
            [
                "train",
                s3.uri,
                "--category",
                "weave",
                "--out",
                str(run),
                "--s3-endpoint",
                proxy.endpoint,
                *TINY,
            ]
        )
        restarter.join(timeout=180)
        total = proxy.bytes_down
    assert code == 0, capsys.readouterr().err
    assert "at_bytes" in outage and outage["at_bytes"] < total, "the restart did not happen mid-read"
    assert total - outage["after_bytes"] > 50_000, "too little was read after the restart to prove a retry"
    assert json.loads((run / "manifest.json").read_text())["skipped"] == []
    ran, ref = (json.loads((p / "metrics.json").read_text()) for p in (run, reference))
    assert ran["n_train"] == ref["n_train"] and ran["image_auroc"] == pytest.approx(
        ref["image_auroc"], abs=1e-6
    )


# --- upload ---------------------------------------------------------------------------------------


def _upload_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="comet-ray")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_test_server_has_volumes_for_many_buckets_whatever_the_free_disk(s3) -> None:
    """Each bucket is a SeaweedFS collection with its own volumes. With the volume count left to
    SeaweedFS (free disk / volume size) a CI disk with a few GB free ran out after four buckets and
    a later PUT failed with InternalError; the server now asks for a fixed count."""
    import urllib.request

    master = f"http://127.0.0.1:{s3.server.ports['master']}/dir/status"
    with urllib.request.urlopen(master, timeout=10) as answer:
        topology = json.loads(answer.read())["Topology"]
    assert topology["Max"] >= 100, topology
    client = s3.server.client()
    for index in range(6):
        bucket = f"many-buckets-{index}"
        s3.server.make_bucket(bucket)
        client.put_object(Bucket=bucket, Key="k", Body=b"x" * 100)
        assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"x" * 100


def test_upload_command(s3, tmp_path, capsys) -> None:
    endpoint = s3.endpoint
    local = tmp_path / "tree"
    (local / "weave" / "train" / "good").mkdir(parents=True)
    (local / "weave" / "train" / "good" / "a.png").write_bytes(b"a" * 1000)
    (local / "weave" / "train" / "good" / "b.png").write_bytes(b"b" * 2000)
    (local / "weave" / ".DS_Store").write_bytes(b"x")
    (local / ".git").mkdir()
    (local / ".git" / "HEAD").write_bytes(b"ref")
    with pytest.raises(StorageError, match="bucket 'fresh-bucket' does not exist.*--create-bucket"):
        upload_tree(local, "s3://fresh-bucket/data", endpoint)
    assert (
        _upload_cli(
            [
                "upload",
                str(local),
                "s3://fresh-bucket/data/",
                "--s3-endpoint",
                endpoint,
                "--create-bucket",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "created bucket 'fresh-bucket'" in out
    assert "uploaded 2 file(s)" in out and "(3000 bytes)" in out and "2 hidden file(s) skipped" in out
    keys = sorted(o["Key"] for o in s3.server.client().list_objects_v2(Bucket="fresh-bucket")["Contents"])
    assert keys == ["data/weave/train/good/a.png", "data/weave/train/good/b.png"]


def test_upload_errors_and_retries(s3, tmp_path, monkeypatch) -> None:
    endpoint = s3.endpoint
    local = tmp_path / "one"
    local.mkdir()
    (local / "x.png").write_bytes(b"x" * 10)
    with FlakyProxy(s3.server.port, fail_first=2, mode="503") as proxy:
        summary = upload_tree(local, "s3://comet-test/retried", proxy.endpoint)
        assert summary.files == 1 and proxy.failed == 2
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    with pytest.raises(StorageError, match="access denied") as err:
        upload_tree(local, "s3://comet-test/denied", endpoint)
    assert WRONG_SECRET not in str(err.value)
    monkeypatch.setenv("COMET_RAY_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match="cannot reach the object store"):
        upload_tree(local, "s3://comet-test/down", f"http://127.0.0.1:{free_ports(1)[0]}")


# --- the CLI end to end on s3:// ------------------------------------------------------------------


def test_train_evaluate_predict_on_s3_skip_corrupt_and_leak_no_secret(s3, tmp_path, capsys) -> None:
    endpoint = s3.endpoint
    corrupt_root = "s3://comet-test/corrupt"
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                corrupt_root,
                "--category",
                "weave",
                "--contamination",
                "0.2",
                "--out",
                str(run),
                "--s3-endpoint",
                endpoint,
                "--cache-dir",
                str(tmp_path / "cache"),
                *TINY,
            ]
        )
        == 0
    )
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data_root"] == corrupt_root
    assert [s["sample_id"] for s in manifest["skipped"]] == ["weave/train/good/zz_corrupt.png"]
    assert manifest["skipped"][0]["uri"] == f"{corrupt_root}/weave/train/good/zz_corrupt.png"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_skipped"] == 1 and metrics["n_train"] == 16 + 4  # 4 moved in by contamination

    # evaluate with credentials in the URI (pyarrow's form): they work, and are written nowhere
    secret_uri = f"s3://{FAKE_ACCESS_KEY}:{FAKE_SECRET_KEY.replace('/', '%2F')}@comet-test/corrupt"
    assert (
        main(
            [
                "evaluate",
                str(run),
                secret_uri,
                "--category",
                "weave",
                "--device",
                "cpu",
                "--s3-endpoint",
                endpoint,
                "--out",
                str(tmp_path / "eval" / "eval.json"),
            ]
        )
        == 0
    )
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["n_images"] == metrics["n_test"]
    assert evaluated["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)

    assert (
        main(
            [
                "predict",
                str(run / "model.pt"),
                f"{corrupt_root}/weave/test/spot/",
                "s3://comet-test/corrupt/weave/train/good/zz_corrupt.png",
                "--out",
                str(tmp_path / "pred"),
                "--device",
                "cpu",
                "--s3-endpoint",
                endpoint,
            ]
        )
        == 0
    )
    rows = csv_rows(tmp_path / "pred" / "predictions.csv")
    assert len(rows) == 8 + 1 and all(r["path"].startswith(corrupt_root) for r in rows)
    broken = next(r for r in rows if r["path"].endswith("zz_corrupt.png"))
    assert broken["error"] and broken["score"] == ""

    printed = capsys.readouterr()
    for secret in (FAKE_SECRET_KEY, FAKE_SECRET_KEY.replace("/", "%2F")):
        assert secret not in printed.out and secret not in printed.err
        leaks = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not leaks, f"secret written to {leaks}"
    assert public_s3_uri(secret_uri) == corrupt_root
