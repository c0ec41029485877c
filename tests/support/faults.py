"""Faults that tests inject into Ray Train workers through ``fit_distributed(epoch_callbacks=...)``.

Production code has no fault knobs: a test passes one of these callbacks, which runs in every worker
after each epoch's report. This module is pickled by value, so a worker needs nothing from tests/.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillWorkerOnce:
    """SIGKILL the worker of rank ``rank`` at the end of epoch ``epoch``, once (``marker`` records it).

    It waits until Ray Train has registered the epoch's checkpoint, so the restarted group resumes from
    it (a report still queued in the dying process would be lost).
    """

    def __init__(self, epoch: int, rank: int, marker: str | os.PathLike) -> None:
        self.epoch, self.rank, self.marker = int(epoch), int(rank), str(marker)

    def __call__(self, _trainer, log) -> None:
        import ray.train

        if log.epoch != self.epoch or ray.train.get_context().get_world_rank() != self.rank:
            return
        if os.path.exists(self.marker):
            return
        ray.train.get_all_reported_checkpoints(timeout_s=120)
        Path(self.marker).write_text(f"killed rank {self.rank} at epoch {log.epoch}\n")
        os.kill(os.getpid(), signal.SIGKILL)
