"""comet_ray.atomic: a process killed at any step of publishing a run folder leaves the old complete folder,
the new complete one, or one the completeness check refuses; never a mix that it accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from comet_ray.distributed.train import _complete_outputs

EPOCHS = 2

# Publishes STAGING into TARGET, killing itself (os._exit) just before filesystem change number KILL_AT.
_PUBLISH = """
import os, sys
from pathlib import Path
from comet_ray import atomic

kill_at, steps = int(sys.argv[3]), [0]
def step(real):
    def wrapped(*args, **kwargs):
        if steps[0] == kill_at:
            os._exit(9)
        steps[0] += 1
        return real(*args, **kwargs)
    return wrapped
os.replace, os.unlink, os.rmdir = step(os.replace), step(os.unlink), step(os.rmdir)
atomic.publish_folder(Path(sys.argv[1]), Path(sys.argv[2]))
print(steps[0])
"""


def _run_folder(folder: Path, version: str) -> None:
    folder.mkdir(parents=True)
    (folder / "history.json").write_text(json.dumps([{"version": version}] * EPOCHS))
    (folder / "model.pt").write_text(version)
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events").write_text(version)
    (folder / "metrics.json").write_text(json.dumps({"version": version}))


def _versions(folder: Path) -> set[str]:
    """The versions the folder's files come from (one element for a consistent folder)."""
    found = set()
    for path in folder.rglob("*"):
        if path.is_file():
            text = path.read_text()
            found.add(json.loads(text)["version"] if path.name == "metrics.json" else
                      json.loads(text)[0]["version"] if path.name == "history.json" else text)
    return found


def _publish(tmp: Path, kill_at: int) -> subprocess.CompletedProcess:
    target, staging = tmp / "run", tmp / ".run.staging"
    _run_folder(target, "old")
    _run_folder(staging, "new")
    return subprocess.run([sys.executable, "-c", _PUBLISH, str(staging), str(target), str(kill_at)],
                          check=False, capture_output=True, text=True, timeout=60)


def test_a_kill_between_any_two_moves_never_leaves_a_mixed_folder_that_counts_as_complete(tmp_path: Path) -> None:
    whole = _publish(tmp_path / "whole", -1)
    assert whole.returncode == 0, whole.stderr
    steps = int(whole.stdout)
    assert steps >= 5  # the marker withdrawn, four items moved
    assert _versions(tmp_path / "whole" / "run") == {"new"}
    outcomes = []
    for kill_at in range(steps + 1):
        done = _publish(tmp_path / str(kill_at), kill_at)
        target = tmp_path / str(kill_at) / "run"
        assert done.returncode == (9 if kill_at < steps else 0), done.stderr
        metrics = _complete_outputs(str(target), EPOCHS)
        if metrics is not None:
            assert _versions(target) == {metrics["version"]}, (kill_at, _versions(target))
        outcomes.append(None if metrics is None else metrics["version"])
    assert outcomes[0] == "old" and outcomes[-1] == "new"  # killed before anything / not killed at all
    assert set(outcomes[1:-1]) == {None}  # in between: the check refuses the folder

