"""A secret in an ``s3://KEY:SECRET@bucket/...`` URI is written nowhere, printed nowhere, sent nowhere.

One run of each command that takes such URIs, against the session's SeaweedFS server with its own keys
(so the URIs work) and no keys in the environment: ``train --out/--cache-dir``, ``tune --storage-path/--out``
(a real Ray Tune experiment on S3: params.json, params.pkl, tuner.pkl) and ``submit`` of a ``train`` to the
Ray that ``tune`` started. Then every object in the bucket, every file they wrote here, the Ray session's
folder (logs, Tune's staging), everything printed and the job's entrypoint, metadata and runtime env are
searched for the secret.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from comet_ray.cli import main
from comet_ray.cli.credentials import SUBMIT_NOTICE, strip_value, uri_credentials_taken
from comet_ray.data.s3 import public_s3_uri
from comet_ray.errors import CometError

from support import TINY_TRAIN_ARGS

BUCKET = "comet-secrets"
REPO = Path(__file__).resolve().parents[1]
RUN = f"secrets-{uuid.uuid4().hex[:8]}"
TINY = [*TINY_TRAIN_ARGS, "--epochs", "1"]
AWS_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ENDPOINT_URL",
    "RAY_ADDRESS",
    "PATH",
)


def test_public_s3_uri_removes_user_info_of_any_scheme() -> None:
    assert public_s3_uri("s3://AK:se%2Fcret@bucket/runs/x?endpoint_override=h:1") == "s3://bucket/runs/x"
    assert public_s3_uri("s3://AK:se/cret@bucket/runs/x") == "s3://bucket/runs/x"  # a raw "/" in the secret
    assert public_s3_uri("https://user:pw@host:9000/a") == "https://host:9000/a"
    assert public_s3_uri("s3://bucket/a@b") == "s3://bucket/a@b" and public_s3_uri("/data/a@b") == "/data/a@b"
    assert strip_value("--out=s3://AK:se%2Fcret@bucket/x?scheme=http") == (
        "--out=s3://bucket/x?scheme=http",
        ("AK", "se/cret"),
    )


def test_uri_keys_reach_the_standard_chain_through_a_private_file(keys_only_in_uris) -> None:
    """Not through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, which Ray Tune copies into trial runtime envs."""
    args = argparse.Namespace(data_root="s3://AK:se%2Fcret@bucket/d", set=["x=1"], out="/tmp/x")
    with uri_credentials_taken(args) as found:
        keys_file = Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"])
        assert found and args.data_root == "s3://bucket/d" and "AWS_SECRET_ACCESS_KEY" not in os.environ
        assert "aws_secret_access_key = se/cret" in keys_file.read_text()
        assert keys_file.stat().st_mode & 0o777 == 0o600 and keys_file.parent.stat().st_mode & 0o777 == 0o700
    assert "AWS_SHARED_CREDENTIALS_FILE" not in os.environ and "AWS_PROFILE" not in os.environ
    two = argparse.Namespace(data_root="s3://AK:one@bucket/d", out="s3://AK:two@bucket/o")
    with pytest.raises(CometError, match="different credentials"), uri_credentials_taken(two):
        pass


def test_the_process_command_line_loses_the_secret_ray_would_record() -> None:
    """Ray stores a driver's /proc/self/cmdline as its job's entrypoint (on the cluster it joins)."""
    code = (
        "import sys; from comet_ray.cli.credentials import hide_process_arguments as hide; hide(sys.argv); "
        "print(sys.argv[1:]); print(open('/proc/self/cmdline', 'rb').read().replace(b'\\0', b' ').decode())"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code, "--out", "s3://AK:s3cretValue@bucket/x"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout
    assert "s3cretValue" not in shown and shown.count("s3://bucket/x") == 2, shown


def files_under(*roots: Path) -> list[Path]:
    return [
        p for root in roots if root.exists() for p in root.rglob("*") if p.is_file() and not p.is_symlink()
    ]


@pytest.fixture()
def keys_only_in_uris():
    """No AWS keys in the environment (restored afterwards, whatever the commands set); ``python`` on PATH
    is this interpreter (what a job runs)."""
    saved = {name: os.environ.get(name) for name in AWS_KEYS}
    for name in AWS_KEYS[:-1]:
        os.environ.pop(name, None)
    os.environ["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{saved['PATH'] or ''}"  # the job's `python`
    )
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.mark.ray
def test_no_secret_from_a_uri_reaches_any_output(
    s3_server, keys_only_in_uris, tiny_category, tmp_path, capfd, monkeypatch
) -> None:
    import ray
    from ray.job_submission import JobSubmissionClient

    os.environ["AWS_ENDPOINT_URL"] = (
        s3_server.endpoint
    )  # as a user of another store would (Ray Tune reads it)
    secret = s3_server.secret_key
    needles = {secret, quote(secret, safe=""), secret.split("/")[0]}
    s3_server.make_bucket(BUCKET)
    client = s3_server.client()
    base = f"s3://{s3_server.access_key}:{quote(secret, safe='')}@{BUCKET}/{RUN}"
    data = [str(tiny_category), "--category", "weave"]
    monkeypatch.chdir(tmp_path)

    assert main(["train", *data, "--out", f"{base}/run", "--cache-dir", f"{base}/cache", *TINY]) == 0
    assert not {"AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_SECRET_ACCESS_KEY"} & set(
        os.environ
    )  # restored
    assert (
        main(
            [
                "tune",
                *data,
                "--contamination",
                "0",
                "--trials",
                "1",
                "--seeds",
                "0",
                "--cpus-per-trial",
                "0.5",
                "--storage-path",
                f"{base}/ray",
                "--out",
                f"{base}/tune",
                *TINY,
            ]
        )
        == 0
    )
    node = ray._private.worker._global_node
    session, url = Path(node.get_session_dir_path()), f"http://{node.webui_url}"
    job = f"comet-secrets-{uuid.uuid4().hex[:6]}"
    # One local node, no worker node offering job-driver: '{}' lets the driver run on it.
    assert (
        main(
            [
                "submit",
                "--address",
                url,
                "--submission-id",
                job,
                "--entrypoint-resources",
                "{}",
                "--",
                "train",
                *data,
                "--out",
                f"{base}/job",
                *TINY,
            ]
        )
        == 0
    )
    printed = capfd.readouterr()
    assert SUBMIT_NOTICE in printed.err
    info = JobSubmissionClient(url).get_job_info(job)
    shown = json.dumps(
        {"entrypoint": info.entrypoint, "metadata": info.metadata, "runtime_env": info.runtime_env}
    )
    assert f"s3://{BUCKET}/{RUN}/job" in info.entrypoint

    objects = {
        item["Key"]: client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=RUN)
        for item in page.get("Contents", [])
    }
    names = set(objects)
    assert {f"{RUN}/run/metrics.json", f"{RUN}/run/model.pt", f"{RUN}/job/metrics.json"} <= names
    assert any(n.endswith("/params.json") for n in names) and any(n.endswith("/params.pkl") for n in names)
    assert any(n.startswith(f"{RUN}/cache/") for n in names) and any(
        n.startswith(f"{RUN}/tune/") for n in names
    )
    config = json.loads(objects[f"{RUN}/run/config.json"])
    assert config["out"] == f"s3://{BUCKET}/{RUN}/run" and s3_server.access_key not in json.dumps(config)

    # Ray's session folder, except the copy of this project a job runs from (its test helpers name the fake key).
    local = [p for p in files_under(tmp_path, session) if "runtime_resources" not in p.parts]
    assert any(p.name.startswith("job-driver-") for p in local)  # the submitted job's own log was searched
    texts = {f"s3://{key}": body for key, body in objects.items()}
    texts |= {str(p): p.read_bytes() for p in local}
    texts |= {"stdout": printed.out.encode(), "stderr": printed.err.encode(), "job info": shown.encode()}
    leaks = sorted(where for where, body in texts.items() for needle in needles if needle.encode() in body)
    assert not leaks, leaks
