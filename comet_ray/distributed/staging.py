"""Local staging folders for Ray Train checkpoints, and the sweep that removes orphaned ones.

Rank 0 writes each epoch's checkpoint into a temporary folder that ``ray.train.report`` copies to
storage; the folder is removed when the ``with`` block ends. A worker killed inside that block (the
OOM killer, a preempted node, ``kill -9`` of the driver's process group) never reaches the cleanup,
and each such kill left a ``comet-ckpt-*`` folder of weights in the node's temp directory. The
folder name carries the owner's PID, so the next worker on the node removes every folder whose
owner is gone. A folder of a live process is never touched; a reused PID only delays the cleanup.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from comet_ray import atomic

PREFIX = "comet-ckpt-"


def checkpoint_staging(root: str | os.PathLike | None = None) -> tempfile.TemporaryDirectory:
    """A temporary folder named after this process (``comet-ckpt-<pid>-<random>``)."""
    return tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-", dir=root)


def orphaned_staging(root: str | os.PathLike | None = None) -> list[Path]:
    """Staging folders under ``root`` (default: the temp directory) whose owning process has exited."""
    return atomic.orphaned_staging(root, PREFIX)


def remove_orphaned_staging(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove :func:`orphaned_staging` folders; returns those that are gone."""
    removed = []
    for entry in orphaned_staging(root):
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    return removed
