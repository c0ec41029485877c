"""``comet-ray submit/status/logs/stop`` against a real single-node Ray cluster started by this module.

The cluster is private to the test: its own temp dir (short, for Unix socket paths), its own ports,
its dashboard on 127.0.0.1. ``ray stop`` is never used -- it kills every Ray process on the machine,
including other people's. Teardown ends exactly the processes this cluster started: the session of
its ``ray start --block`` process, their descendants and anything whose command line names its temp
dir (``support.cluster.stop_processes``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import comet_ray.cli
from comet_ray.cli import jobs as cli_jobs
from comet_ray.data.synthetic import make_texture_category
from comet_ray.distributed import job_client, submit
from comet_ray.distributed.placement import DRIVER_RESOURCE, DRIVER_SHARE, driver_resources
from comet_ray.errors import CometError

from support.cluster import free_port_range, stop_processes
from support.s3server import free_ports

TINY = [
    "--backbone",
    "mobilenet_v2",
    "--no-pretrained",
    "--image-size",
    "64",
    "--feature-dim",
    "32",
    "--epochs",
    "1",
    "--passes",
    "1",
    "--set",
    "discriminator_hidden=32",
    "--set",
    "noise_std=0.1",
    "--set",
    "inner_steps=1",
    "--set",
    "meta_tasks=2",
    "--device",
    "cpu",
]
START_TIMEOUT = 120.0

pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")


# --------------------------------------------------------------------------- the CLI, as cli.main runs it
def run_cli(argv: list[str]) -> int:
    """Parse ``argv`` with a parser holding only this module's commands and run it like ``cli.main``."""
    parser = argparse.ArgumentParser(prog="comet-ray")
    sub = parser.add_subparsers(dest="command_name", required=True)
    cli_jobs.register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CometError as exc:
        print(f"comet-ray: error: {exc}", file=sys.stderr)
        return 2


class RayHead:
    """``ray start --head --block`` on 127.0.0.1 with private ports and temp dir; ``close`` ends only it."""

    def __init__(self, token: str | None = None, resources: dict | None = None) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="crs", dir="/tmp"))  # short: Ray puts Unix sockets under it
        (
            gcs,
            dashboard,
            client,
            node_manager,
            object_manager,
            agent_listen,
            agent_grpc,
            runtime_env_agent,
            metrics,
        ) = free_ports(9)
        low = free_port_range(60)
        high = low + 59
        self.dashboard_port = dashboard
        self.url = f"http://127.0.0.1:{dashboard}"
        self.token = token
        env = dict(os.environ)
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(name, None)
        env.update(
            RAY_USAGE_STATS_ENABLED="0",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_AUTH_MODE="token" if token else "disabled",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        if token:
            env["RAY_AUTH_TOKEN"] = token
        ray_cli = Path(sys.executable).parent / "ray"
        command = [
            str(ray_cli),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp}",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env_agent}",
            f"--metrics-export-port={metrics}",
            f"--min-worker-port={low}",
            f"--max-worker-port={high}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
            *([f"--resources={json.dumps(resources)}"] if resources else []),
        ]
        self.log = open(self.temp / "ray-start.log", "wb")  # noqa: SIM115 - closed with the head
        self.process = subprocess.Popen(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        """Block until the dashboard's job API answers (heads start in parallel, then each is awaited)."""
        deadline = time.monotonic() + START_TIMEOUT
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited early:\n{self.output()}")
            try:
                request = urllib.request.Request(self.url + "/api/jobs/", headers=headers)
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        raise RuntimeError(
            f"the job API at {self.url} did not come up in {START_TIMEOUT:.0f}s:\n{self.output()}"
        )

    def output(self) -> str:
        try:
            return (self.temp / "ray-start.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM ``ray start --block``, which stops its children (heads side by side wind down together)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def close(self) -> None:
        """End whatever is left of this cluster, and only it (SIGTERM, then SIGKILL, by PID)."""
        survivors = stop_processes({self.process.pid}, marker=str(self.temp))
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)
        assert not survivors, f"processes of the test cluster survived teardown: {survivors}"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("submit-data")
    make_texture_category(root, "weave", n_train=8, n_test_good=4, defects={"spot": 4}, size=64, seed=3)
    return root


@pytest.fixture(scope="module")
def heads():
    """Two private heads started side by side: auth disabled, offering the job drivers' resource as the
    worker nodes of clusters/ do; and RAY_AUTH_MODE=token, offering none (as a head should)."""
    started: list[RayHead] = []
    try:
        started.append(RayHead(resources={DRIVER_RESOURCE: 1}))
        started.append(RayHead(token=secrets.token_hex(32)))
        for cluster in started:
            cluster.wait_ready()
        yield started[0], started[1]
    finally:
        errors = []
        for cluster in started:  # both heads wind down at the same time
            cluster.stop()
        for cluster in started:
            try:
                cluster.close()
            except AssertionError as exc:
                errors.append(str(exc))
        assert not errors, errors


@pytest.fixture()
def head(heads) -> RayHead:
    return heads[0]


@pytest.fixture()
def token_head(heads) -> RayHead:
    return heads[1]


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    """No address or token from the developer's environment; an empty home for ~/.ray/auth_token."""
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(job_client, "DEFAULT_TOKEN_FILE", tmp_path / "no-such-home" / ".ray" / "auth_token")
    return monkeypatch


# --------------------------------------------------------------------------- without a cluster
def test_plain_http_to_another_host_is_refused_in_one_line(clean_env, capsys) -> None:
    code = run_cli(
        [
            "submit",
            "--address",
            "http://10.1.2.3:8265",
            "--",
            "train",
            "data",
            "--category",
            "c",
            "--out",
            "o",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert (
        err.startswith("comet-ray: error: refusing plain-http address http://10.1.2.3:8265")
        and "\n" not in err
    )
    clean_env.setenv("RAY_ADDRESS", "http://ray-head.example.com:8265")
    with pytest.raises(CometError, match="refusing plain-http"):
        job_client.check_address(job_client.resolve_address(None), insecure=False)
    assert job_client.check_address("http://ray-head.example.com:8265", insecure=True)
    assert job_client.check_address("https://ray-head.example.com:8265", insecure=False)
    for loopback in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265"):
        assert job_client.check_address(loopback, insecure=False)


def test_unreachable_address_is_one_clear_line(clean_env, capsys) -> None:
    (port,) = free_ports(1)
    code = run_cli(["status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"cannot reach the Ray job API at http://127.0.0.1:{port}" in err and "port-forward" in err


def test_address_and_token_resolution(clean_env, tmp_path) -> None:
    assert job_client.resolve_address(None) == "http://127.0.0.1:8265"
    clean_env.setenv("RAY_ADDRESS", "127.0.0.1:9999")
    assert job_client.resolve_address(None) == "http://127.0.0.1:9999"
    assert job_client.resolve_address("https://h:1/") == "https://h:1"
    with pytest.raises(CometError, match="not the job API"):
        job_client.resolve_address("ray://head:10001")
    assert job_client.find_token() == (None, "")
    assert job_client.auth_headers() == {}
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert job_client.find_token() == ("file-token", str(token_file))
    clean_env.setenv("RAY_AUTH_TOKEN", "env-token")
    assert job_client.auth_headers() == {"Authorization": "Bearer env-token"}
    clean_env.delenv("RAY_AUTH_TOKEN")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(CometError, match="cannot read the token file"):
        job_client.find_token()


def test_entrypoint_runtime_env_and_results_line(tmp_path) -> None:
    args = submit.command_args(["--", "train", "/data root", "--category", "weave", "--out", "runs/w"])
    assert args[0] == "train"
    assert (
        submit.build_entrypoint(args)
        == "python -m comet_ray train '/data root' --category weave --out runs/w"
    )
    with_upload = submit.build_entrypoint(args, "s3://bucket/runs/")
    assert with_upload.endswith(
        "&& python -m comet_ray.distributed.submit push-results runs/w s3://bucket/runs/w"
    )
    assert "cluster's filesystem" in submit.where_results_go(args)
    assert submit.where_results_go(["train", "d", "--out=s3://b/r"]) == "results: s3://b/r"
    with pytest.raises(CometError, match="nothing to run"):
        submit.command_args(["--"])
    with pytest.raises(CometError, match="not a comet-ray command"):
        submit.command_args(["--", "trian", "d"], comet_ray.cli.build_parser().get_default("commands"))
    env = submit.build_runtime_env({"pip": ["x"], "excludes": ["big/"]})
    root = submit.project_root()
    assert root is not None and env["working_dir"] == str(root)
    assert env["excludes"][0] == "big/" and "/.venv/" in env["excludes"] and "/.git/" in env["excludes"]
    assert env["pip"] == ["x"] and env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    jobs_env = submit.load_runtime_env(str(root / "jobs" / "runtime_env.yaml"))
    assert jobs_env["working_dir"] == "." and any(p.startswith("torch") for p in jobs_env["pip"]["packages"])
    wheel_env = submit.build_runtime_env({}, root=None)  # a wheel install: ship the package itself
    assert "working_dir" not in wheel_env and wheel_env["py_modules"][0].endswith("comet_ray")
    (tmp_path / "env.yaml").write_text("- not a mapping\n")
    with pytest.raises(CometError, match="expected a mapping"):
        submit.load_runtime_env(str(tmp_path / "env.yaml"))


def test_the_driver_asks_for_a_worker_node_unless_told_otherwise(capsys) -> None:
    assert driver_resources(None) == {DRIVER_RESOURCE: DRIVER_SHARE} and 0 < DRIVER_SHARE < 1
    assert (
        driver_resources(None, num_gpus=1) == {} and driver_resources(None, num_cpus=2) == {}
    )  # not on a head
    assert driver_resources('{"job-driver": 1, "big": 2}') == {"job-driver": 1.0, "big": 2.0}
    assert driver_resources("{}") == {}
    for bad in ("[1]", '{"job-driver": 0}', '{"job-driver": true}', "job-driver"):
        with pytest.raises(
            CometError, match="--entrypoint-resources expects a JSON object of positive numbers"
        ):
            driver_resources(bad)
    with pytest.raises(SystemExit):
        run_cli(["submit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f'"{DRIVER_RESOURCE}" is offered by the worker node types of clusters/' in help_text
    assert "never by the head" in help_text and "'{}' lets Ray place it anywhere" in help_text


def test_the_job_package_holds_every_module_and_imports_without_an_install(tmp_path) -> None:
    """Build the job's package the way ``ray job submit`` does (Ray's own packaging code, Ray's default
    excludes plus ours, the project's .gitignore), unpack it, and import every ``comet_ray`` module from
    it in a Python that has the dependencies but not comet-ray (the cluster's Python)."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    from support.cluster import cluster_python

    root = submit.project_root()
    assert root is not None
    archive = tmp_path / "package.zip"

    def build(directory, excludes, is_file=False):
        create_package(directory, archive, include_gitignore=True, excludes=excludes)

    upload_working_dir_if_needed(submit.build_runtime_env({}), include_gitignore=True, upload_fn=build)
    unpacked = tmp_path / "job"
    with zipfile.ZipFile(archive) as package:
        package.extractall(unpacked)
    shipped = sorted(p.relative_to(unpacked).as_posix() for p in (unpacked / "comet_ray").rglob("*.py"))
    source = sorted(p.relative_to(root).as_posix() for p in (root / "comet_ray").rglob("*.py"))
    assert shipped == source  # comet_ray/data/ included: the excludes are anchored at the project root
    assert not (unpacked / ".venv").exists() and not (unpacked / ".git").exists()
    modules = [
        p.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for p in shipped
        if not p.endswith("__main__.py")
    ]
    python = cluster_python(tmp_path / "py")
    check = (
        "import importlib, os, sys\n"
        "for name in sys.argv[1:]:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.startswith(os.getcwd() + os.sep), (name, module.__file__)\n"
        "print('imported', len(sys.argv) - 1)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMET_RAY_CACHE")}
    result = subprocess.run(
        [str(python), "-c", check, *modules],
        cwd=unpacked,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"imported {len(modules)}"
    outside = subprocess.run(
        [str(python), "-c", "import comet_ray"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "No module named 'comet_ray'" in outside.stderr  # the modules above came from the package alone


def test_results_are_copied_to_s3_after_success_only(s3_env, tmp_path, monkeypatch) -> None:
    """``--results-uri`` / ``COMET_RAY_RESULTS_URI``: the --out folder lands at URI/<name> once the command
    succeeded (what the job entrypoint and jobs/*.py do on the cluster), and nothing is copied on failure."""

    s3_env.make_bucket("comet-results")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    monkeypatch.setenv(submit.RESULTS_URI_ENV, "s3://comet-results/runs/")
    run = tmp_path / "bottle"

    def fake_main(argv, code=0):
        run.mkdir(exist_ok=True)
        (run / "metrics.json").write_text('{"image_auroc": 1.0}')
        return code

    monkeypatch.setattr(comet_ray.cli, "main", lambda argv: fake_main(argv, code=2))
    assert comet_ray.cli.run_command(["train", "d", "--category", "c", "--out", str(run)]) == 2
    client = s3_env.client()
    assert client.list_objects_v2(Bucket="comet-results").get("KeyCount", 0) == 0
    monkeypatch.setattr(comet_ray.cli, "main", fake_main)
    assert comet_ray.cli.run_command(["train", "d", "--category", "c", "--out", str(run)]) == 0
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="comet-results")["Contents"]]
    assert keys == ["runs/bottle/metrics.json"]
    assert submit._main(["push-results", str(tmp_path / "missing"), "s3://comet-results/x"]) == 2


# --------------------------------------------------------------------------- against the cluster
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="comet-ray")
    cli_jobs.register(parser.add_subparsers(dest="command_name", required=True))
    return parser.parse_args(argv)


def test_submit_train_succeeds_and_a_bad_path_fails(heads, dataset, tmp_path, clean_env, capsys) -> None:
    """Two jobs side by side (this machine is small and shared): a tiny ``train`` on the auth-disabled head
    must SUCCEED (exit 0, metrics.json in --out, its output streamed); a ``train`` on a missing data root,
    on the token head with the token from a token file, must FAIL (exit 1, its one-line error streamed)."""
    head, token_head = heads
    token_file = tmp_path / "auth_token"
    token_file.write_text(token_head.token + "\n")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))  # sent to both; the auth-less head ignores it

    bad_out, bad_err, bad_result = io.StringIO(), io.StringIO(), {}
    # '{}': a driver that may run anywhere, here on the one node, which offers no job-driver resource
    bad_args = _parse(
        [
            "submit",
            "--address",
            token_head.url,
            "--submission-id",
            "comet-test-bad",
            "--entrypoint-resources",
            "{}",
            "--",
            "train",
            str(tmp_path / "no-such-data"),
            "--category",
            "weave",
            "--out",
            str(tmp_path / "bad-run"),
            *TINY,
        ]
    )

    def run_bad() -> None:
        try:
            bad_result["code"] = cli_jobs.cmd_submit(bad_args, out=bad_out, err=bad_err)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            bad_result["error"] = repr(exc)

    worker = threading.Thread(target=run_bad, daemon=True)
    worker.start()

    out = tmp_path / "run"
    code = run_cli(
        [
            "submit",
            "--address",
            head.url,
            "--submission-id",
            "comet-test-ok",
            "--",
            "train",
            str(dataset),
            "--category",
            "weave",
            "--out",
            str(out),
            *TINY,
        ]
    )
    captured = capsys.readouterr()
    worker.join(timeout=240)
    assert code == 0, captured.out[-3000:] + captured.err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"image_auroc", "pixel_auroc", "aupro"} <= set(metrics)
    assert "epoch   1/1" in captured.out  # the job's own output, streamed
    assert "[comet-ray] job comet-test-ok | SUCCEEDED |" in captured.err
    assert f"results: {out} on the cluster's filesystem" in captured.out
    assert f"driver: on a worker node offering {DRIVER_RESOURCE!r}" in captured.err
    assert "driver: wherever Ray places it" in bad_err.getvalue()

    assert not worker.is_alive() and "error" not in bad_result, bad_result
    assert bad_result["code"] == 1, bad_err.getvalue()[-3000:]
    assert "[comet-ray] job comet-test-bad | FAILED |" in bad_err.getvalue()
    assert "comet-ray: error: the dataset root" in bad_out.getvalue()  # the job's one-line error, streamed
    assert "exit code 2" in bad_err.getvalue()
    assert not (tmp_path / "bad-run").exists()
    assert token_head.token not in bad_out.getvalue() + bad_err.getvalue() + captured.out + captured.err

    # With the defaults, a driver never starts on a head that offers no job-driver resource: it waits.
    assert (
        run_cli(
            [
                "submit",
                "--no-wait",
                "--address",
                token_head.url,
                "--submission-id",
                "comet-test-pending",
                "--",
                "train",
                str(dataset),
                "--category",
                "weave",
                "--out",
                str(tmp_path / "pending"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    jobs = job_client.connect(token_head.url)
    statuses = set()
    for _ in range(10):
        statuses.add(str(jobs.get_job_status("comet-test-pending")))
        time.sleep(1.0)
    assert statuses == {"PENDING"}, statuses
    assert run_cli(["stop", "comet-test-pending", "--address", token_head.url]) == 0
    capsys.readouterr()

    # looking after finished jobs
    assert run_cli(["status", "comet-test-ok", "--address", head.url]) == 0
    status_out = capsys.readouterr().out
    assert "SUCCEEDED" in status_out and f"out:        {out}" in status_out
    assert run_cli(["logs", "comet-test-ok", "--address", head.url]) == 0
    assert "results in" in capsys.readouterr().out
    assert run_cli(["stop", "comet-test-ok", "--address", head.url]) == 0
    assert "already finished (SUCCEEDED)" in capsys.readouterr().out
    assert run_cli(["status", "no-such-job", "--address", head.url]) == 2
    assert "no job no-such-job" in capsys.readouterr().err
    assert run_cli(["logs", "comet-test-bad", "--follow", "--address", token_head.url]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_token_auth_needs_the_right_token(token_head, clean_env, capsys) -> None:
    assert run_cli(["status", "x", "--address", token_head.url]) == 2
    err = capsys.readouterr().err
    assert "requires a token (401)" in err and err.count("\n") == 1
    clean_env.setenv("RAY_AUTH_TOKEN", "wrong-" + token_head.token[:8])
    assert run_cli(["status", "x", "--address", token_head.url]) == 2
    err = capsys.readouterr().err
    assert "rejected the token from RAY_AUTH_TOKEN (403)" in err and token_head.token[:8] not in err
    clean_env.setenv("RAY_AUTH_TOKEN", token_head.token)
    assert run_cli(["status", "comet-test-bad", "--address", token_head.url]) == 0
    assert "FAILED" in capsys.readouterr().out
