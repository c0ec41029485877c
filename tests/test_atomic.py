"""comet_ray.atomic: a process killed at any step of publishing a run folder leaves the old complete folder
or the new complete one, as the next reader sees it; a file write that fails or is killed leaves the old file."""

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
for name in ("replace", "rename", "unlink", "rmdir", "link", "mkdir", "symlink"):
    setattr(os, name, step(getattr(os, name)))
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
    if version == "old":  # an item only the old folder has (a rerun keeps it, as it keeps .resume/)
        (folder / ".resume").mkdir()
        (folder / ".resume" / "state").write_text("old")


def _versions(folder: Path) -> set[str]:
    """The versions the folder's files come from (one element for a consistent folder)."""
    found = set()
    for path in folder.rglob("*"):
        if path.is_file() and path.parent.name != ".resume":
            text = path.read_text()
            found.add(
                json.loads(text)["version"]
                if path.name == "metrics.json"
                else json.loads(text)[0]["version"]
                if path.name == "history.json"
                else text
            )
    return found


def _publish(tmp: Path, kill_at: int) -> subprocess.CompletedProcess:
    target, staging = tmp / "run", tmp / ".run.staging"
    _run_folder(target, "old")
    _run_folder(staging, "new")
    return subprocess.run(
        [sys.executable, "-c", _PUBLISH, str(staging), str(target), str(kill_at)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_kill_at_any_step_of_publishing_leaves_the_old_complete_folder_or_the_new_one(
    tmp_path: Path,
) -> None:
    whole = _publish(tmp_path / "whole", -1)
    assert whole.returncode == 0, whole.stderr
    steps = int(whole.stdout)
    assert steps >= 8  # folders made, five items moved, the old one renamed aside, the new one in, cleanup
    outcomes = []
    for kill_at in range(steps + 1):
        done = _publish(tmp_path / str(kill_at), kill_at)
        target = tmp_path / str(kill_at) / "run"
        assert done.returncode == (9 if kill_at < steps else 0), done.stderr
        metrics = _complete_outputs(str(target), EPOCHS)  # a reader: recovers a folder set aside first
        assert metrics is not None, (kill_at, sorted(p.name for p in target.parent.iterdir()))
        assert _versions(target) == {metrics["version"]}, (kill_at, _versions(target))
        # the old folder's item the new one lacks is kept in the new folder too
        assert (target / ".resume" / "state").read_text() == "old"
        outcomes.append(metrics["version"])
        published = _publish_into(target, tmp_path / str(kill_at) / ".again")  # a later writer
        assert _versions(target) == {"again"}
        litter = [p.name for p in target.parent.iterdir() if p.name.startswith((".run.new-", ".run.old-"))]
        assert litter == [], published  # a dead writer's leftovers are removed by the next one
    assert outcomes[0] == "old" and outcomes[-1] == "new"  # killed before anything / not killed at all
    assert set(outcomes) == {"old", "new"}


def _publish_into(target: Path, staging: Path) -> list[str]:
    from comet_ray import atomic

    _run_folder(staging, "again")
    atomic.publish_folder(staging, target)
    staging.rmdir()
    return sorted(p.name for p in target.iterdir())


# Starts writing TARGET through atomic.write_csv and is killed (os._exit) after the first rows.
_KILLED_WRITER = """
import os, sys
from comet_ray import atomic

def rows():
    for i in range(1000):
        if i == 500:
            os._exit(9)
        yield {"id": i}
atomic.write_csv(sys.argv[1], ["id"], rows())
"""


def test_a_file_write_that_fails_midway_or_is_killed_leaves_the_old_file_and_no_temporary(
    tmp_path: Path,
) -> None:
    from comet_ray import atomic, jsonfile

    target = tmp_path / "results.csv"
    atomic.write_csv(target, ["id"], [{"id": "old"}])
    old = target.read_text()

    def failing_rows():
        yield {"id": 1}
        raise RuntimeError("serialiser failed midway")

    try:
        atomic.write_csv(target, ["id"], failing_rows())
    except RuntimeError:
        pass
    else:
        raise AssertionError("the failing rows did not raise")
    assert target.read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temporary left behind

    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], check=False, timeout=60)
    assert killed.returncode == 9
    assert target.read_text() == old
    assert len(list(tmp_path.iterdir())) == 2  # the dead writer's temporary, named with its pid
    atomic.write_csv(target, ["id"], [{"id": "new"}])  # the next write of the file removes it
    assert target.read_text().splitlines() == ["id", "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]

    summary = tmp_path / "summary.json"
    jsonfile.write(summary, {"version": "old"})
    try:
        jsonfile.write(summary, {"version": object()})  # not serialisable
    except TypeError:
        pass
    assert json.loads(summary.read_text()) == {"version": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "summary.json"]
