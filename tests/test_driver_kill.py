"""The driver killed with SIGKILL mid-run, then the same command re-run: it resumes, nothing is doubled.

Each scenario runs the real CLI (``python -m comet_ray``) in its own session, so the driver and the
Ray node it starts (GCS, raylet, ...) share one process group; that group is SIGKILLed as a user's
``kill -9`` or an OOM killer would. Ray's worker processes put themselves in their own process
groups but stay in the session, so after the group kill every process left in the session is
SIGKILLed by PID before the rerun (an orphaned worker must not race the rerun) and at the end.

Ray runs with a private ``RAY_TMPDIR``, so the CLI's ``ray.init()`` starts its own local node
and never attaches to another Ray instance on the machine.

- ``tune``: killed as soon as the first contamination level's rows are in results.csv; the rerun
  restores the finished level (its trials are not re-run: same trial folders, same result files)
  and completes the second; results.csv has one row per (level, trial).
- ``train --workers 1`` (Ray Train): killed once a checkpoint is registered; the rerun starts at the
  epoch after the newest registered checkpoint (attempts.jsonl), and history.json holds each epoch once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from comet_ray.data.synthetic import make_texture_category
from comet_ray.distributed.staging import orphaned_staging

from support import LOCAL_ENV, TINY_TRAIN_ARGS

pytest.importorskip("ray")
pytestmark = pytest.mark.kill

ENV = {**LOCAL_ENV, "PYTHONUNBUFFERED": "1"}
RUN_TIMEOUT_S = 300  # one CLI run on two (shared) CPU cores
POLL_S = 0.1


def _tiny_args(epochs: int) -> list[str]:
    args = list(TINY_TRAIN_ARGS)
    args[args.index("--epochs") + 1] = str(epochs)
    return [*args, "--batch-size", "4"]


def _session_pids(sid: int) -> list[int]:
    """PIDs of the live processes in session ``sid`` (the driver's session: it was started with setsid)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                pids.append(int(entry))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


class CliRun:
    """One ``python -m comet_ray ...`` in a new session (process group == session == its PID)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str], cwd: Path) -> None:
        self.log = log
        self.handle = open(log, "w")  # noqa: SIM115 - open for the run's life, closed by reap()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "comet_ray", *args],
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def tail(self, chars: int = 4000) -> str:
        if not self.handle.closed:
            self.handle.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def wait_for(self, condition, what: str, timeout: float = RUN_TIMEOUT_S) -> float:
        """Poll ``condition()`` until true; fail (with the log) if the run exits or time runs out first."""
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the run exited ({self.process.returncode}) before {what}:\n{self.tail()}")
            if self.elapsed > timeout:
                pytest.fail(f"no {what} after {timeout}s:\n{self.tail()}")
            time.sleep(POLL_S)
        return self.elapsed

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            code = self.process.wait(timeout=max(1.0, timeout - self.elapsed))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the run did not finish in {timeout}s:\n{self.tail()}")
        self.reap()
        return code

    def kill(self) -> None:
        """SIGKILL the driver's process group (driver, GCS, raylet, ...), then what is left in its session."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.reap()

    def reap(self, timeout: float = 60.0) -> None:
        """SIGKILL, PID by PID, every process still in the run's session and wait until none is left."""
        deadline = time.monotonic() + timeout
        while True:
            left = _session_pids(self.process.pid)
            if not left:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of the killed run survive SIGKILL: {left}")
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.handle.close()


@pytest.fixture
def cli(tmp_path: Path):
    """Start CLI runs with the tests' environment and a private Ray temp dir; reap them all at the end."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="crk-", dir="/tmp"))  # short: Ray's socket paths need < 108 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(ENV)
    env["RAY_TMPDIR"] = str(ray_tmp)
    env["TMPDIR"] = str(tmp_path / "tmp")  # the runs' own temp dir: what they leave there is checked
    (tmp_path / "tmp").mkdir()
    runs: list[CliRun] = []

    def start(args: list[str], name: str) -> CliRun:
        run = CliRun(args, tmp_path / f"{name}.log", env, tmp_path)
        runs.append(run)
        return run

    try:
        yield start
    finally:
        for run in runs:
            if run.process.poll() is None:
                run.kill()
            else:
                run.reap()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_texture_category(root, "weave", n_train=16, n_test_good=8, defects={"spot": 10}, size=64, seed=3)
    return root


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _by_trial(rows) -> list[dict]:
    return sorted(rows, key=lambda r: r["trial_id"])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trial_files(experiment: Path) -> dict[str, str]:
    """Trial folder -> digest of its result.json (the rows Tune appended for that trial)."""
    return {p.name: _digest(p / "result.json") for p in sorted(experiment.glob("trial-*")) if p.is_dir()}


@pytest.mark.ray
def test_tune_driver_killed_after_first_level_resumes_without_duplicates(
    cli, dataset: Path, tmp_path: Path
) -> None:
    trials, levels = 2, ("0", "0.2")
    store, out = tmp_path / "store", tmp_path / "out"
    command = [
        "tune",
        str(dataset),
        "--category",
        "weave",
        "--contamination",
        ",".join(levels),
        "--trials",
        str(trials),
        "--seeds",
        "0",
        "--cpus-per-trial",
        "1",
        *_tiny_args(epochs=2),
        "--storage-path",
        str(store),
        "--out",
        str(out),
    ]
    results = out / "results.csv"

    level0, level2 = store / "tune-weave-simplenet-rho0", store / "tune-weave-simplenet-rho0.2"
    first = cli(command, "tune-1")
    killed_at = first.wait_for(lambda: results.exists(), "results.csv with the first level's rows")
    first.kill()
    before = _rows(results)
    # Each level searches the baseline's knobs, then CoMet's: ``trials`` rows each.
    per_level = 2 * trials
    assert {r["level"] for r in before} == {"0.0"} and len(before) == per_level, before
    done_before = _trial_files(level0)
    assert len(done_before) == trials
    cut = sorted(p.name for p in level2.iterdir()) if level2.exists() else "not started"

    second = cli(command, "tune-2")
    assert second.finish() == 0, second.tail()
    after = _rows(results)
    keys = [(r["level"], r["trial_id"]) for r in after]
    assert len(keys) == len(set(keys)) == per_level * len(levels), after
    assert sorted(k[0] for k in keys) == ["0.0"] * per_level + ["0.2"] * per_level
    # The finished level was restored, not re-run: same trials, same result files, same rows.
    assert _trial_files(level0) == done_before
    assert {r["trial_id"] for r in after if r["level"] == "0.0"} == {r["trial_id"] for r in before}
    # (a later level may add a column, e.g. stopped_early_objective when ASHA stops one of its trials:
    # the restored rows carry it empty)
    restored = _by_trial(r for r in after if r["level"] == "0.0")
    assert [{k: r[k] for k in before[0]} for r in restored] == _by_trial(before)
    assert all(not r[k] for r in restored for k in r.keys() - before[0].keys())
    # The level cut short ends with exactly its trials (no orphaned extra trials in its folder).
    assert set(_trial_files(level2)) == {
        f"trial-{r['trial_id']}" for r in after if r["level"] == "0.2" and r["strategy"] == "comet"
    }
    for level in levels:
        best = json.loads((out / f"rho_{level}" / "best.json").read_text())
        assert best["objective"] is not None and str(best["level"]) == str(float(level))
    print(
        f"tune: killed at {killed_at:.1f}s (second level's folder: {cut}); "
        f"rerun finished in {second.elapsed:.1f}s"
    )


@pytest.mark.ray
def test_ray_train_driver_killed_after_checkpoint_resumes_from_it(cli, dataset: Path, tmp_path: Path) -> None:
    epochs = 3
    store, out = tmp_path / "store", tmp_path / "run"
    command = [
        "train",
        str(dataset),
        "--category",
        "weave",
        "--workers",
        "1",
        "--cpus-per-worker",
        "1",
        *_tiny_args(epochs),
        "--storage-path",
        str(store),
        "--out",
        str(out),
    ]
    run_dir = store / "weave-comet-seed0"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"

    def registered() -> list[str]:
        """Checkpoint folders the Ray Train controller has registered (what a restart can resume from)."""
        try:
            state = json.loads(snapshot.read_text())
        except (OSError, ValueError):
            return []
        return sorted(r["checkpoint_dir_name"] for r in state.get("checkpoint_results", []))

    first = cli(command, "train-1")
    killed_at = first.wait_for(lambda: bool(registered()), "a registered checkpoint")
    first.kill()
    newest = registered()[-1]  # read after the kill: whatever was registered until the very end
    resume_epoch = int(newest.removeprefix("epoch_")) + 1
    assert resume_epoch < epochs, f"the kill came after the last epoch ({newest}); nothing left to resume"
    assert not (out / "metrics.json").exists()

    # What a worker killed inside its checkpoint write leaves (the kill above may or may not hit that
    # window): a staging folder named after a process that is gone. The rerun's worker removes it.
    orphan = tmp_path / "tmp" / f"comet-ckpt-{first.process.pid}-killed"
    (orphan / "sub").mkdir(parents=True, exist_ok=True)
    (orphan / "sub" / "trainer_state.pt").write_bytes(b"weights")
    second = cli(command, "train-2")
    assert second.finish() == 0, second.tail()
    # The local Ray runs with the dashboard, so Ray Train's placement-group cleaner reaches the state API
    # instead of logging "State API may be temporarily unavailable" once a second.
    assert "State API" not in second.log.read_text(errors="replace")
    assert not orphan.exists() and not orphaned_staging(tmp_path / "tmp")
    lines = (out / "attempts.jsonl").read_text().splitlines()
    attempts = [json.loads(line) for line in lines if line.strip()]
    assert [(a["rank"], a["start_epoch"]) for a in attempts] == [(0, 0), (0, resume_epoch)], attempts
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == resume_epoch
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history] == list(range(epochs)), history
    # One run folder, one result: no second Ray run beside the first, no half-written output folder.
    assert [p.name for p in store.iterdir() if p.is_dir() and p.name != "feature_cache"] == [run_dir.name]
    assert not list(out.parent.glob(f".{out.name}.staging-*"))
    checkpoints = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("epoch_"))
    assert checkpoints[-1] == f"epoch_{epochs - 1:04d}" and len(checkpoints) <= 2  # --num-to-keep 2
    print(
        f"train: killed at {killed_at:.1f}s after {newest}; rerun resumed at epoch {resume_epoch}, "
        f"finished in {second.elapsed:.1f}s"
    )


def test_a_tune_folder_killed_before_its_first_snapshot_starts_over(tmp_path: Path) -> None:
    """The window the tune rerun above may hit, made deterministic: ``tuner.pkl`` and no experiment state.

    ``Tuner.restore`` would accept that folder and then run one trial instead of ``--trials``
    (Ray 2.60 "restarts" a failed restore with ``num_samples=1``); it must start over instead.
    """
    from comet_ray.distributed.tune import _restorable
    from comet_ray.errors import CometError

    experiment = tmp_path / "tune-weave-simplenet-rho0.2"
    assert not _restorable(str(experiment))
    (experiment / "trial-0001").mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"pickled tuner")
    assert not _restorable(str(experiment)) and not any(experiment.iterdir())  # cleared: nothing was recorded
    (experiment / "tuner.pkl").write_bytes(b"pickled tuner")
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    assert _restorable(str(experiment))
    (experiment / "experiment_state-2026-01-02_00-00-00.json").write_text('{"trial_da')  # upload cut off
    with pytest.raises(CometError, match="experiment_state-2026-01-02_00-00-00.json is unreadable"):
        _restorable(str(experiment))


def test_in_process_train_killed_after_an_epoch_resumes_and_matches_an_uninterrupted_run(
    cli, dataset: Path, tmp_path: Path
) -> None:
    """No Ray: ``comet-ray train`` saves its state after every epoch in OUT/.resume (comet_ray.resume)."""
    epochs = 10
    out, reference = tmp_path / "run", tmp_path / "reference"
    args = _tiny_args(epochs)
    args[args.index("--passes") + 1] = "8"  # epochs long enough (~0.5 s) for the kill to land between them
    base = ["train", str(dataset), "--category", "weave", "--contamination", "0.2", *args]
    saved, state = out / ".resume" / "history.json", out / ".resume" / "trainer_state.pt"

    def epochs_saved() -> int:
        """Epochs a rerun can resume from: the log is written before the state (comet_ray.resume), and
        a kill between the first two writes rightly leaves nothing to resume, so count only with both."""
        try:
            return len(json.loads(saved.read_text())["epochs"]) if state.exists() else 0
        except (OSError, ValueError, KeyError):
            return 0

    first = cli([*base, "--out", str(out)], "inproc-1")
    first.wait_for(lambda: epochs_saved() >= 1, "a saved epoch")
    first.kill()
    done = epochs_saved()
    print(f"in-process train: killed after {done} of {epochs} epochs")
    assert 1 <= done < epochs and not (out / "metrics.json").exists()

    second = cli([*base, "--out", str(out)], "inproc-2")
    assert second.finish() == 0, second.tail()
    assert "resuming from epoch" in second.tail()
    metrics = json.loads((out / "metrics.json").read_text())
    assert 1 <= metrics["resumed_from_epoch"] < epochs
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history] == list(range(epochs))
    assert not (out / ".resume").exists()

    # Every random draw is a function of (seed, epoch, ...) and the state holds the rest: the resumed
    # run ends where an uninterrupted one does.
    third = cli([*base, "--out", str(reference)], "inproc-reference")
    assert third.finish() == 0, third.tail()
    resumed = json.loads((out / "weights.json").read_text())["weights"]
    uninterrupted = json.loads((reference / "weights.json").read_text())["weights"]
    assert resumed.keys() == uninterrupted.keys()
    assert max(abs(resumed[k] - uninterrupted[k]) for k in resumed) < 1e-5
    assert metrics["image_auroc"] == pytest.approx(
        json.loads((reference / "metrics.json").read_text())["image_auroc"], abs=1e-6
    )
