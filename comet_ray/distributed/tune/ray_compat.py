"""Ray 2.60 workarounds for Tune (each says what it works around): resuming a Tuner cut off before\nits first snapshot, and the scheduler without the state API."""

from __future__ import annotations

import json
import logging

from comet_ray.errors import CometError

log = logging.getLogger(__name__)
from comet_ray.distributed.tune.settings import SweepSettings


def _restorable(path: str) -> bool:
    """Whether the Tune experiment at ``path`` can be resumed; clears one that cannot be.

    ``Tuner.can_restore`` only looks for ``tuner.pkl``, which the ``Tuner`` writes when it is built,
    before its first experiment-state snapshot. A driver killed in between leaves a folder that
    ``Tuner.restore`` accepts but cannot resume: Ray 2.60 then logs "Failed to restore the run state",
    "restarts" the experiment and, since ``num_samples`` is passed to fresh runs only, runs ONE
    trial instead of ``--trials``. Nothing in such a folder was ever recorded, so its contents
    (``tuner.pkl``, folders of trials that had just started) are removed and the level starts over.
    A newest snapshot that is not valid JSON (a kill during its upload) would end the same way, so
    it stops the sweep with the file to remove instead.
    """
    import fnmatch

    import pyarrow.fs
    from ray.train._internal.storage import get_fs_and_path

    fs, fs_path = get_fs_and_path(path)
    if fs.get_file_info(fs_path).type != pyarrow.fs.FileType.Directory:
        return False
    names = [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(fs_path))]
    if "tuner.pkl" not in names:
        return False
    states = sorted(fnmatch.filter(names, "experiment_state-*.json"))
    if not states:
        fs.delete_dir_contents(fs_path)
        return False
    newest = f"{path.rstrip('/')}/{states[-1]}"
    try:
        with fs.open_input_stream(f"{fs_path.rstrip('/')}/{states[-1]}") as handle:
            json.loads(handle.readall())
    except (OSError, ValueError):
        raise CometError(
            f"the Tune experiment state {newest} is unreadable (cut off by a kill?); "
            "remove that file to resume from the previous one"
        ) from None
    return True


def _state_api_available() -> bool:
    """Whether Ray's state API answers (it is served by the dashboard: not with include_dashboard=False)."""
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    try:
        list_actors(limit=1, timeout=10, raise_on_missing_output=False)
    except (RayStateApiException, ConnectionError):
        return False
    return True


def _scheduler(settings: SweepSettings, epochs: int):
    """ASHA early stopping, except for Ray Train trials on a Ray without the state API: FIFO.

    Stopping a trial kills the Train controller it owns. Ray Train then relies on a detached
    PlacementGroupCleaner that asks the state API whether the controller is alive; without the
    dashboard it cannot tell, so the run's placement group (its workers' CPUs) stays reserved until
    the driver exits and the cleaner process lives on: bench/soak.py measured 0.5 CPU and ~190 MiB per
    early-stopped trial (on two CPUs, two stopped trials leave no room for the next trial's worker).
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.workers > 0 and not _state_api_available():
        log.warning(
            "Ray's state API (dashboard) is not available: trials with Ray Train workers run "
            "without ASHA early stopping, whose stopped trials would leak their placement groups"
        )
        return FIFOScheduler()
    return ASHAScheduler(max_t=epochs + 1, grace_period=min(settings.grace_period, epochs))
