"""Files and folders that are either the old version or the new one, never half written.

Every local file comet-ray writes for a user (run folders, reports, exported graphs, checkpoints,
predictions) goes through here: written beside its target under a temporary name, then renamed.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """A temporary path beside ``target``; moved onto it when the block succeeds, removed otherwise.

    The file gets the permissions a plain ``open`` would give it (not ``mkstemp``'s 0600) and is flushed to
    disk before the rename (``fsync``), so a crash right after never leaves an empty file. The temporary name
    carries the writer's pid: temporaries of a killed writer are removed by the next write of ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    for stale in _dead_owned(target.parent, prefix):
        stale.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: str | os.PathLike, text: str, newline: str | None = None) -> Path:
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as handle:
        handle.write(text)
    return Path(target)


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_csv(target: str | os.PathLike, fieldnames: Sequence[str], rows: Iterable[dict]) -> Path:
    """A CSV file with a header of ``fieldnames`` and one line per row (rows are streamed: a row that fails
    midway leaves the old file as it was)."""
    with atomic_path(target) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)
    return Path(target)


COMPLETION_MARKER = "metrics.json"


def publish_folder(staging: Path, target: Path, marker: str = COMPLETION_MARKER) -> None:
    """Move every item of ``staging`` into ``target`` (a folder already there under the same name is replaced).

    ``marker`` (the file a reader takes as "this folder is complete") is withdrawn from ``target`` first
    and moved in last, so a kill between two moves leaves a folder without it, never a new marker beside
    old files or an old marker beside new ones.
    """
    target.mkdir(parents=True, exist_ok=True)
    items = sorted(staging.iterdir(), key=lambda item: item.name == marker)  # the marker last
    if any(item.name == marker for item in items):
        (target / marker).unlink(missing_ok=True)
    for item in items:
        if (target / item.name).is_dir() and not (target / item.name).is_symlink():
            shutil.rmtree(target / item.name)
        os.replace(item, target / item.name)



def owned_staging(parent: str | os.PathLike | None, prefix: str) -> Path:
    """A private (0700) folder ``<prefix><pid>-<random>`` under ``parent`` (default: the temp directory)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _dead_owned(parent: str | os.PathLike | None, prefix: str) -> list[Path]:
    """Entries ``<prefix><pid>-...`` under ``parent`` whose owning process has exited."""
    base = Path(parent or tempfile.gettempdir())
    owned = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    return [entry for entry in entries
            if (match := owned.match(entry.name)) and not entry.is_symlink() and not _alive(int(match.group(1)))]


def orphaned_staging(parent: str | os.PathLike | None, prefix: str) -> list[Path]:
    """:func:`owned_staging` folders under ``parent`` whose owning process has exited (never a live writer's)."""
    return [entry for entry in _dead_owned(parent, prefix) if entry.is_dir()]
