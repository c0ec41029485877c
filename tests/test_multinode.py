"""The multi-node tier: comet-ray jobs on a Ray cluster that behaves like several machines.

One cluster for the module (:class:`support.cluster.LocalCluster`): a head with no CPUs and
no job-driver resource (no training, no job driver) and two worker nodes with one CPU each, offering
the job-driver resource that ``comet-ray submit`` asks for by default (so the drivers run there),
every worker node in its own mount namespace with a private disk (temp, Ray and home folders; where
``unshare`` is not allowed, private through TMPDIR, HOME and Ray's temp dir instead, with a warning), all
of them on a Python that has the dependencies but not comet-ray, token authentication on, and the
SeaweedFS S3 server of the test session as the only shared storage. Jobs go through the real
``comet-ray submit`` (Ray Jobs), so their code comes only from the uploaded package.

The ``submit`` commands are read from README.md's "Clusters and jobs" section and run as they are
there, with the options of a tiny model appended (``support.TINY_TRAIN_ARGS``): the README
shows what this tier runs.

Where work ran is read from the nodes' own disks: a Ray worker's log lines land in the session
folder of the node that ran it, so "features: embedded ..." (a Ray Data backbone actor's part) and
"features: read ..." (a training worker's shard) lines there show which node embedded and which read
what from the shared cache, and that the head trained and embedded nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from comet_ray.data.synthetic import make_texture_category

from support import TINY_TRAIN_ARGS
from support.cluster import LocalCluster

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.ray,
    pytest.mark.kill,
    pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "comet-cluster"
JOB_TIMEOUT_S = 600
EXTRACTED = "features: extracted"
EMBEDDED = "features: embedded"
CACHE_HIT = "features: read"
ROW_BYTES = 8 * 8 * 32 * 2  # one image's features under TINY_TRAIN_ARGS: 8x8 patches of 32 fp16 values


# --------------------------------------------------------------------------- the README's commands
def readme_commands() -> dict[str, list[str]]:
    """``comet-ray submit -- COMMAND ...`` lines of README's "Clusters and jobs" block, by COMMAND."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Clusters and jobs", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = {}
    for line in block.splitlines():
        if line.startswith("comet-ray submit -- "):
            argv = shlex.split(line.replace("$BUCKET", BUCKET))[1:]
            commands[argv[2]] = argv
    return commands


def test_the_readme_shows_the_commands_this_tier_runs() -> None:
    commands = readme_commands()
    assert set(commands) == {"train", "tune"}
    assert commands["train"][:4] == ["submit", "--", "train", f"s3://{BUCKET}/mvtec"]
    assert "--workers" in commands["train"] and f"s3://{BUCKET}/runs/bottle" in commands["train"]
    assert commands["tune"][commands["tune"].index("--trials") + 1] == "2"
    assert commands["tune"][commands["tune"].index("--seeds") + 1] == "2"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3(s3_env, tmp_path_factory):
    """A synthetic ``bottle`` category at s3://comet-cluster/mvtec (the README's data path)."""
    root = tmp_path_factory.mktemp("cluster-data") / "mvtec"
    make_texture_category(root, "bottle", n_train=16, n_test_good=6, defects={"spot": 8}, size=64, seed=3)
    s3_env.make_bucket(BUCKET)
    s3_env.upload_tree(root, BUCKET, "mvtec")
    return s3_env


@pytest.fixture(scope="module")
def cluster(s3):
    # What a cloud cluster's nodes get from their instance role and config: S3 credentials and endpoint.
    # COMET_RAY_CLUSTER_NAMESPACES=0 tries the fallback used where `unshare` is not allowed.
    namespaces = os.environ.get("COMET_RAY_CLUSTER_NAMESPACES", "1") != "0"
    cluster = LocalCluster(env={**s3.env(), "AWS_ENDPOINT_URL": s3.endpoint}, namespaces=namespaces)
    if cluster.unshare is None:
        warnings.warn(
            f"no mount namespaces here: the worker nodes' disks are private through {cluster.isolation}",
            stacklevel=1,
        )
    try:
        cluster.start_head()
        cluster.add_node("worker-a", num_cpus=1)
        cluster.add_node("worker-b", num_cpus=1)
        yield cluster
    finally:
        cluster.close()


class Submit:
    """``comet-ray submit ...`` from "the user's terminal" (this machine, comet-ray installed), as a process."""

    def __init__(self, cluster: LocalCluster, argv: list[str], log: Path) -> None:
        env = {
            k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS")
        }
        env.update(cluster.client_env())
        self.log = log
        self.handle = open(log, "w")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "comet_ray", *argv],
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=log.parent,
        )
        self.started = time.monotonic()

    @property
    def output(self) -> str:
        if not self.handle.closed:
            self.handle.flush()
        return self.log.read_text(errors="replace")

    @property
    def job_id(self) -> str:
        """The submission id ``comet-ray submit`` printed ("[comet-ray] submitted job ID: ...")."""
        for line in self.output.splitlines():
            if line.startswith("[comet-ray] submitted job "):
                return line.split()[3].rstrip(":")
        return ""

    def wait(self, timeout: float = JOB_TIMEOUT_S) -> int:
        try:
            code = self.process.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the job did not end in {timeout}s:\n{self.output[-6000:]}")
        finally:
            self.handle.close()
        return code


def submit(cluster: LocalCluster, argv: list[str], tmp_path: Path) -> tuple[int, str, str]:
    """Run ``comet-ray submit ARGV`` to its end: exit code, output, and the job's id."""
    run = Submit(cluster, argv, tmp_path / "submit.log")
    code = run.wait()
    return code, run.output, run.job_id


def driver_node(cluster: LocalCluster, job_id: str, finished: bool = True) -> str:
    """The worker node that ran the job's driver (its name), from Ray's job record and the nodes' disks:
    Ray's driver_node_id is a worker node's, and the command's own output ("results in ...") is in the
    driver log on that node's disk, not in the head's (where the job manager logs only its own lines);
    while the job runs (``finished=False``), that the driver log is on that node's disk."""
    assert job_id, "no job id in the output of comet-ray submit"
    node_id = cluster.api(f"/api/jobs/{job_id}")["driver_node_id"]
    names = [name for name, node in cluster.nodes.items() if node.node_id == node_id]
    head = cluster.alive_node_ids() - {node.node_id for node in cluster.nodes.values()}
    assert len(head) == 1 and node_id not in head, (node_id, head)  # the head is the one other alive node
    assert names, (
        f"the driver ran on {node_id}, none of the worker nodes {[n.node_id for n in cluster.nodes.values()]}"
    )

    def printed(ray_dir: Path) -> list[Path]:
        return [
            p
            for p in ray_dir.glob(f"session_*/logs/job-driver-{job_id}.log")
            if not finished or "results in " in p.read_text(errors="replace")
        ]

    assert printed(cluster.nodes[names[0]].disk / "tmp" / "ray")
    assert not finished or not printed(cluster.ray_temp)
    return names[0]


def keys(s3, prefix: str) -> list[str]:
    client, found, token = s3.client(), [], None
    while True:
        page = client.list_objects_v2(
            Bucket=BUCKET, Prefix=prefix, **({"ContinuationToken": token} if token else {})
        )
        found += [item["Key"][len(prefix) :] for item in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return found
        token = page["NextContinuationToken"]


def read(s3, key: str) -> str:
    return s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def log_lines(cluster: LocalCluster, text: str, also: str = "") -> dict[str, int]:
    """Per node ("head" included), how many lines Ray workers printed there contain ``text`` (and ``also``)."""
    disks = {"head": cluster.ray_temp}
    disks.update(
        {node.disk.name: node.disk / "tmp" / "ray" for node in [*cluster.retired, *cluster.nodes.values()]}
    )
    counts = {}
    for name, ray_dir in disks.items():
        sessions = [p for p in ray_dir.glob("session_*") if not p.is_symlink()]  # not session_latest
        lines = [
            line
            for session in sessions
            for path in session.glob("logs/worker-*.out")  # stdout
            for line in path.read_text(errors="replace").splitlines()
            if text in line and also in line
        ]
        counts[name] = len(lines)
    return counts


# --------------------------------------------------------------------------- the cluster itself
def test_worker_nodes_lack_comet_ray_and_keep_their_files_private(cluster: LocalCluster) -> None:
    """Outside any job, the nodes' Python has no comet_ray; a file a task writes to its temp folder
    lands on that node's private disk only (not the head's, not the other node's)."""
    targets = {name: node.node_id for name, node in cluster.nodes.items()}
    code = textwrap.dedent(f"""
        import json, os, tempfile, ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ray.init()

        @ray.remote(num_cpus=1)
        def probe(name):
            try:
                import comet_ray
                found = comet_ray.__file__
            except ModuleNotFoundError as exc:
                found = str(exc)
            with open(os.path.join(tempfile.gettempdir(), name), "w") as handle:
                handle.write(name)
            return found

        targets = {targets!r}
        print(json.dumps({{name: ray.get(probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                                        .remote("probe-" + name)) for name, node in targets.items()}}))
    """)
    result = cluster.run_driver(code)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == {name: "No module named 'comet_ray'" for name in targets}
    for name, node in cluster.nodes.items():
        assert (node.disk / "tmp" / f"probe-{name}").read_text() == f"probe-{name}"
        others = [n for n in cluster.nodes.values() if n is not node]
        assert not any((other.disk / "tmp" / f"probe-{name}").exists() for other in others)
        assert not (cluster.shared["tmp"] / f"probe-{name}").exists()  # the head's view of the same path


# --------------------------------------------------------------------------- train
def test_submit_train_with_both_workers_on_private_disk_nodes(
    cluster: LocalCluster, s3, tmp_path: Path
) -> None:
    """The README's train command with a per-worker feature budget the category (30 images) exceeds: the
    features are embedded on both nodes at once into the S3 cache, and each worker, one per node, holds
    and trains on its half."""
    budget = 20 * ROW_BYTES
    code, output, job_id = submit(
        cluster,
        readme_commands()["train"] + TINY_TRAIN_ARGS + ["--worker-feature-memory", str(budget)],
        tmp_path,
    )
    assert code == 0, output[-6000:]
    assert driver_node(cluster, job_id) in cluster.nodes  # with the README's (default) options: not the head
    assert f"results in s3://{BUCKET}/runs/bottle" in output
    assert "State API" not in output and "Traceback" not in output  # no log floods, no swallowed errors

    names = set(keys(s3, "runs/bottle/"))
    assert {
        "metrics.json",
        "model.pt",
        "manifest.json",
        "history.json",
        "weights.json",
        "config.json",
        "attempts.jsonl",
    } <= names
    metrics = json.loads(read(s3, "runs/bottle/metrics.json"))
    assert metrics["epochs"] == 2 and metrics["category"] == "bottle" and 0.0 <= metrics["image_auroc"] <= 1.0
    assert (
        f"{metrics['image_auroc']:.4f}" in output
    )  # the driver's table: Ray's Result, not a file on the head
    assert len(json.loads(read(s3, "runs/bottle/history.json"))) == 2
    assert any(n.startswith(".ray/bottle-comet-seed0/epoch_0001/") for n in names)  # checkpoints in S3

    # The driver's Ray Data job embedded the category on both worker nodes at once, into the S3 cache.
    cache = f"s3://{BUCKET}/runs/bottle/.ray/feature_cache/"
    assert f"features: extracted 30 images into the cache {cache}" in output and "on 2 node(s)" in output
    index_key = next(n for n in names if n.startswith(".ray/feature_cache/") and n.endswith("/index.json"))
    parts = json.loads(read(s3, "runs/bottle/" + index_key))["parts"]
    workers = {node.node_id: name for name, node in cluster.nodes.items()}
    by_node = {name: [p for p in parts if p["node"] == node_id] for node_id, name in workers.items()}
    assert {p["node"] for p in parts} == set(workers) and all(by_node.values()), (
        parts
    )  # every node, not the head
    a, b = by_node.values()
    assert any(x["started"] < y["finished"] and y["started"] < x["finished"] for x in a for y in b), parts
    embedded = log_lines(cluster, EMBEDDED, cache)
    assert embedded["head"] == 0 and sum(embedded.values()) == len(parts)
    assert all(embedded[node.disk.name] == len(by_node[name]) for name, node in cluster.nodes.items())

    # One worker per worker node, each reading its own half of every split from S3 (none extracted).
    hits = log_lines(cluster, CACHE_HIT, cache)
    assert hits["head"] == 0 and all(hits[node.disk.name] == 1 for node in cluster.nodes.values()), hits
    assert sum(log_lines(cluster, CACHE_HIT, "(shard 1 of 2)").values()) == 1
    assert sum(log_lines(cluster, CACHE_HIT, "(shard 2 of 2)").values()) == 1
    assert sum(log_lines(cluster, EXTRACTED, cache).values()) == 0
    # The category does not fit one worker's budget; each worker's half does.
    attempts = [json.loads(line) for line in read(s3, "runs/bottle/attempts.jsonl").splitlines()]
    assert sorted((a["rank"], a["world_size"], a["start_epoch"]) for a in attempts) == [(0, 2, 0), (1, 2, 0)]
    held = [a["feature_bytes"] for a in attempts]
    assert sum(held) == 30 * ROW_BYTES > budget and max(held) <= budget, held
    # Nothing of the run stayed on a node's disk (rank 0 uploaded its staging folder, then removed it).
    for node in cluster.nodes.values():
        assert not list((node.disk / "tmp").glob("comet-ray-staging/*"))


def test_a_local_storage_path_is_refused_before_any_worker_starts(
    cluster: LocalCluster, s3, tmp_path: Path
) -> None:
    argv = (
        readme_commands()["train"]
        + TINY_TRAIN_ARGS
        + ["--storage-path", "/tmp/checkpoints", "--out", f"s3://{BUCKET}/refused"]
    )
    code, output, _ = submit(cluster, argv, tmp_path)
    assert code == 1, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("comet-ray: error: ")]
    assert len(errors) == 1 and "--storage-path /tmp/checkpoints is a local folder" in errors[0]
    assert "pass --storage-path s3://bucket/prefix" in errors[0] and "3 nodes" in errors[0]
    assert "Traceback" not in output and "TrainController" not in output and "RayTrainWorker" not in output
    assert keys(s3, "refused/") == []


# --------------------------------------------------------------------------- tune
def test_submit_tune_runs_trials_and_repeats_on_worker_nodes(
    cluster: LocalCluster, s3, tmp_path: Path
) -> None:
    code, output, job_id = submit(cluster, readme_commands()["tune"] + TINY_TRAIN_ARGS, tmp_path)
    assert code == 0, output[-6000:]
    assert driver_node(cluster, job_id) in cluster.nodes  # Tune's driver too: not the head
    names = set(keys(s3, "sweeps/bottle/"))
    assert {"results.csv", "rho_0.1/best.json", "seeds.csv", "contamination.png", "summary.json"} <= names
    trials = list(csv.DictReader(io.StringIO(read(s3, "sweeps/bottle/results.csv"))))
    # --trials 2 for the baseline's base knobs, then 2 for CoMet's own (ASHA may stop one)
    assert sorted(t["strategy"] for t in trials) == ["baseline", "baseline", "comet", "comet"]
    assert all(t["objective"] or t["stopped_early_objective"] for t in trials)
    repeats = list(csv.DictReader(io.StringIO(read(s3, "sweeps/bottle/seeds.csv"))))
    assert sorted((r["seed"], r["strategy"]) for r in repeats) == [
        ("0", "baseline"),
        ("0", "comet"),
        ("1", "baseline"),
        ("1", "comet"),
    ]
    assert json.loads(read(s3, "sweeps/bottle/rho_0.1/best.json"))["trial_id"] in {
        t["trial_id"] for t in trials
    }

    # One task filled the shared cache before the trials; 4 trials + 4 repeats read it, on the worker
    # nodes only: nothing trained or extracted on the head.
    cache = f"s3://{BUCKET}/sweeps/bottle/.ray/feature_cache/"
    extracted, hits = log_lines(cluster, EXTRACTED, cache), log_lines(cluster, CACHE_HIT, cache)
    assert sum(extracted.values()) == 1 and sum(hits.values()) == len(trials) + 4, (extracted, hits)
    assert extracted["head"] == hits["head"] == 0
    assert all(hits[node.disk.name] or extracted[node.disk.name] for node in cluster.nodes.values())


# --------------------------------------------------------------------------- faults
def wait_for(condition, what: str, run: Submit, timeout: float = 300.0, poll: float = 0.25):
    """Poll ``condition()`` until it returns something truthy (returned); fail if the job ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if run.process.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{run.output[-6000:]}")
        time.sleep(poll)
    pytest.fail(f"no {what} after {timeout:.0f}s:\n{run.output[-6000:]}")


def test_a_killed_worker_and_a_replaced_node_resume_from_s3_checkpoints(
    cluster: LocalCluster, s3, tmp_path: Path
) -> None:
    """The README's train command, 10 epochs: once the first checkpoint is in S3 one Ray Train worker
    process is SIGKILLed; once the restarted group has checkpointed, the worker node that does not run
    the job's driver is taken away (every process SIGKILLed, as a reclaimed spot instance) and a fresh
    node with an empty disk joins. The run resumes both times from its newest S3 checkpoint and finishes with every epoch
    once; the fresh node reads its shard from the S3 cache instead of extracting anything."""
    epochs = 10
    run = Submit(
        cluster,
        readme_commands()["train"]
        + TINY_TRAIN_ARGS
        + ["--epochs", str(epochs), "--out", f"s3://{BUCKET}/runs/faults"],
        tmp_path / "submit.log",
    )
    run_prefix = "runs/faults/.ray/bottle-comet-seed0/"

    def epochs_checkpointed() -> int:
        """Epochs covered by the newest checkpoint Ray Train has registered (its snapshot in S3), else 0."""
        snapshot = run_prefix + "checkpoint_manager_snapshot.json"
        if not keys(s3, snapshot):
            return 0
        latest = json.loads(read(s3, snapshot)).get("latest_checkpoint_result")
        return int(latest["checkpoint_dir_name"].removeprefix("epoch_")) + 1 if latest else 0

    def starts() -> list[dict]:
        names = sorted(keys(s3, run_prefix + "attempts/"))
        return [json.loads(read(s3, run_prefix + "attempts/" + name)) for name in names]

    try:
        # 1. One worker process killed once Ray Train has registered a checkpoint (in S3).
        at_kill = wait_for(epochs_checkpointed, "a first registered checkpoint", run)
        victims = {
            name: cluster.processes_named(node, "RayTrainWorker") for name, node in cluster.nodes.items()
        }
        name, pids = next((n, p) for n, p in victims.items() if p)
        os.kill(pids[0], signal.SIGKILL)
        # 2. The group restarted from a checkpoint; once it registered one of its own, the node without the
        # driver goes away (on AWS the drivers' node type is on demand, never reclaimed; the spot GPU nodes are).
        second = wait_for(
            lambda: starts()[2:4] if len(starts()) >= 4 else None, "a restarted worker group", run
        )
        resumed = second[0]["start_epoch"]
        at_stop = (
            wait_for(
                lambda: max(epochs_checkpointed() - resumed, 0), "a checkpoint of the restarted group", run
            )
            + resumed
        )
        driver = driver_node(cluster, run.job_id, finished=False)
        reclaimed = next(n for n in cluster.nodes if n != driver)
        gone = cluster.stop_node(reclaimed)
        fresh = cluster.add_node(reclaimed, num_cpus=1)
        code = run.wait()
    finally:
        if run.process.poll() is None:
            run.process.kill()
    output = run.output
    assert code == 0, output[-6000:]
    assert driver_node(cluster, run.job_id) == driver  # the driver stayed on its node all along

    attempts = [json.loads(line) for line in read(s3, "runs/faults/attempts.jsonl").splitlines()]
    groups = [
        sorted((a["start_epoch"], a["rank"]) for a in attempts[i : i + 2]) for i in range(0, len(attempts), 2)
    ]
    assert len(attempts) == 6, attempts
    assert groups[0] == [(0, 0), (0, 1)]
    first_resume, second_resume = groups[1][0][0], groups[2][0][0]
    assert groups[1] == [(first_resume, 0), (first_resume, 1)] and groups[2] == [
        (second_resume, 0),
        (second_resume, 1),
    ]
    # each restart began from the newest registered checkpoint, not from scratch
    assert 0 < at_kill <= first_resume < at_stop <= second_resume < epochs, (
        at_kill,
        first_resume,
        at_stop,
        second_resume,
    )
    metrics = json.loads(read(s3, "runs/faults/metrics.json"))
    assert metrics["resumed_from_epoch"] == second_resume and metrics["epochs"] == epochs
    history = json.loads(read(s3, "runs/faults/history.json"))
    assert [e["epoch"] for e in history] == list(range(epochs))  # every epoch once

    # The fresh node started on an empty disk and read its shard from the S3 cache; nothing was embedded
    # again after a fault (every part once, by the driver's Ray Data job before the first worker started).
    cache = f"s3://{BUCKET}/runs/faults/.ray/feature_cache/"
    assert log_lines(cluster, CACHE_HIT, cache)[fresh.disk.name] >= 1
    assert log_lines(cluster, EMBEDDED, cache)[fresh.disk.name] == 0
    index_key = next(n for n in keys(s3, "runs/faults/.ray/feature_cache/") if n.endswith("/index.json"))
    parts = json.loads(read(s3, "runs/faults/.ray/feature_cache/" + index_key))["parts"]
    assert sum(log_lines(cluster, EMBEDDED, cache).values()) == len(parts)
    assert fresh.disk != gone.disk
    assert name in cluster.nodes and reclaimed in cluster.nodes
