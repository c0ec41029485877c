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


def publish_folder(staging: Path, target: Path) -> None:
    """Make ``target`` hold ``staging``'s items, plus the items of the old ``target`` that staging lacks
    (hard-linked, else copied), in one rename: a kill at any point leaves the old complete folder or the
    new one (see :func:`recover_folder`).

    The new folder is built as a sibling; the old one is renamed aside (``.<name>.old-<pid>-...``), the new
    one renamed into place, then the old one removed. (An S3 run folder has no rename: uploads put the
    completion marker ``metrics.json`` last, :func:`comet_ray.upload.upload_tree`'s ``last``.)
    """
    target = Path(target)
    recover_folder(target)
    for stale in _dead_owned(target.parent, f".{target.name}.new-"):
        shutil.rmtree(stale, ignore_errors=True)
    new = owned_staging(target.parent, f".{target.name}.new-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(new, 0o777 & ~umask)  # mkdtemp's 0700 is for the staging, not the published folder
        for item in staging.iterdir():
            shutil.move(item, new / item.name)  # a rename when staging is on the same filesystem
        if target.is_dir():
            for item in target.iterdir():
                if not (new / item.name).exists() and not (new / item.name).is_symlink():
                    _link_copy(item, new / item.name)
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.replace(target, aside)  # aside is an empty folder: a rename onto it replaces it
            os.replace(new, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(new, target)
    finally:
        shutil.rmtree(new, ignore_errors=True)


def _link_copy(source: Path, dest: Path) -> None:
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, dest, symlinks=True, copy_function=link)
    elif source.is_symlink():
        os.symlink(os.readlink(source), dest)
    else:
        link(str(source), str(dest))


def recover_folder(target: str | os.PathLike) -> None:
    """Undo a :func:`publish_folder` killed between its two renames: a missing ``target`` gets back the old
    folder a dead writer set aside; once ``target`` is there, dead writers' leftovers are removed. Every
    reader of a local run folder calls this first."""
    target = Path(target)
    asides = _dead_owned(target.parent, f".{target.name}.old-")
    if not target.exists() and asides:
        os.replace(asides[-1], target)
        asides = asides[:-1]
    if target.exists():
        for stale in asides:
            shutil.rmtree(stale, ignore_errors=True)


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
    return [
        entry
        for entry in entries
        if (match := owned.match(entry.name)) and not entry.is_symlink() and not _alive(int(match.group(1)))
    ]


def orphaned_staging(parent: str | os.PathLike | None, prefix: str) -> list[Path]:
    """:func:`owned_staging` folders under ``parent`` whose owning process has exited (never a live writer's)."""
    return [entry for entry in _dead_owned(parent, prefix) if entry.is_dir()]
