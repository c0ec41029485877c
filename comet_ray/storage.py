"""Where results, checkpoints and feature caches live: a local folder or an ``s3://`` prefix.

On a cluster the nodes share no disk: what one node writes to its own folders the others (and the
driver, on the head) never see. Every location a command writes for others to read (``--out``,
``--storage-path``, ``--cache-dir``) may therefore be ``s3://bucket/prefix``, and code that reads or
writes one goes through this module, so local folders and S3 behave alike:

* :func:`staged` gives a command a local folder for a destination and, only when the command
  succeeded, publishes it there (an S3 prefix gets every file uploaded, the ``last`` ones after the
  rest, so a reader that waits for ``metrics.json`` sees complete results); a failed command leaves
  the destination untouched. A local destination is used in place.
* :func:`read_text`, :func:`write_text`, :func:`exists`, :func:`list_names` and :func:`download`
  read and write single objects through one pyarrow filesystem, with the endpoint, credential and
  retry rules of :mod:`comet_ray.data.s3` and its one-line errors.
* :func:`require_shared` refuses a local folder on a cluster of several nodes, before any work starts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from comet_ray import atomic
from comet_ray.data.s3 import is_s3_uri, open_s3, public_s3_uri, storage_error
from comet_ray.errors import CometError

STAGING_DIR = "comet-ray-staging"


def is_remote(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def check_location(location: str, flag: str) -> str:
    """``location`` as every later call wants it: an absolute local path, or an ``s3://`` URI as given."""
    text = str(location)
    if is_remote(text) and not is_s3_uri(text):
        raise CometError(
            f"{flag} {public_s3_uri(text)}: only local folders and s3://bucket/prefix are supported"
        )
    return text if is_remote(text) else os.path.abspath(os.path.expanduser(text))


def public(location: str) -> str:
    """``location`` safe to print: no credentials or query string."""
    return public_s3_uri(location)


def join(location: str, *parts: str) -> str:
    if is_remote(location):
        return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(location, *parts)


def filesystem(location: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or an ``s3://`` URI."""
    if is_s3_uri(location):
        return open_s3(location, s3_endpoint)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def failed(exc: OSError, location: str) -> Exception:
    """The exception to raise for ``exc`` at ``location``: a one-line StorageError for S3, ``exc`` itself locally."""
    return storage_error(exc, location) if is_remote(location) else exc


def exists(location: str, s3_endpoint: str | None = None) -> bool:
    fs, path = filesystem(location, s3_endpoint)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise failed(exc, location) from None


def read_text(location: str, s3_endpoint: str | None = None) -> str | None:
    """The text of the file at ``location``, or None when there is none."""
    fs, path = filesystem(location, s3_endpoint)
    try:
        with fs.open_input_stream(path) as handle:
            return handle.readall().decode()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise failed(exc, location) from None


def write_text(location: str, text: str, s3_endpoint: str | None = None) -> None:
    """Write one file (locally through a temporary file and a rename: never half written)."""
    if not is_remote(location):
        atomic.write_text(location, text)
        return
    fs, path = filesystem(location, s3_endpoint)
    try:
        with fs.open_output_stream(path) as handle:
            handle.write(text.encode())
    except OSError as exc:
        raise failed(exc, location) from None


def list_names(location: str, s3_endpoint: str | None = None) -> list[str]:
    """Names of the entries directly under ``location`` (empty when it does not exist)."""
    fs, path = filesystem(location, s3_endpoint)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise failed(exc, location) from None
    return sorted(info.base_name for info in infos)


def download(location: str, local_dir: str | os.PathLike, s3_endpoint: str | None = None) -> Path:
    """Copy every file under ``location`` into ``local_dir`` (relative paths kept)."""
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    fs, path = filesystem(location, s3_endpoint)
    try:
        pafs.copy_files(
            path,
            str(local),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
            use_threads=True,
        )
    except OSError as exc:
        raise failed(exc, location) from None
    return local


def download_file(location: str, local_file: str | os.PathLike, s3_endpoint: str | None = None) -> Path:
    """Copy the single file at ``location`` to ``local_file``."""
    local = Path(local_file)
    local.parent.mkdir(parents=True, exist_ok=True)
    fs, path = filesystem(location, s3_endpoint)
    try:
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except OSError as exc:
        raise failed(exc, location) from None
    return local


def upload(
    local_dir: str | os.PathLike, location: str, last: Sequence[str] = (), s3_endpoint: str | None = None
) -> None:
    """Copy the files of ``local_dir`` to the ``s3://`` prefix ``location``; the ``last`` ones after the rest."""
    from comet_ray.upload import upload_tree

    upload_tree(local_dir, location, s3_endpoint, create_bucket=False, progress=False, last=last)


def staging_folder(destination: str) -> Path:
    """The local folder where results bound for ``destination`` (``s3://...``) are put together.

    The same path for the same destination and user on this machine, so a command killed and run again
    finds what it had saved (``comet-ray train`` resumes from its per-epoch state there). It lives in a
    folder of this user's only (mode 0700, owner checked): another user cannot plant or read files there.
    """
    root = Path(tempfile.gettempdir()) / f"{STAGING_DIR}-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != 0o700:
        raise CometError(f"{root} is not a private folder of this user (mode 0700); remove it and run again")
    local = root / hashlib.sha256(destination.encode()).hexdigest()[:16]
    local.mkdir(mode=0o700, exist_ok=True)
    return local


@contextmanager
def staged(
    destination: str, last: Sequence[str] = ("metrics.json",), s3_endpoint: str | None = None
) -> Iterator[Path]:
    """A local folder for ``destination``, published there only if the block succeeds (module docstring)."""
    if not is_remote(destination):
        yield Path(destination)  # created by whoever writes into it: a failed command leaves nothing
        return
    local = staging_folder(destination)
    try:
        yield local
    except BaseException:
        if not any(local.iterdir()):  # nothing to resume from: leave no trace
            local.rmdir()
        raise
    upload(local, destination, last=last, s3_endpoint=s3_endpoint)
    shutil.rmtree(local, ignore_errors=True)


@contextmanager
def staged_file(destination: str, s3_endpoint: str | None = None) -> Iterator[Path]:
    """A local path for the single file ``destination``, uploaded there if the block succeeds."""
    if not is_remote(destination):
        yield Path(destination)
        return
    with tempfile.TemporaryDirectory(prefix="comet-file-") as tmp:
        local = Path(tmp) / destination.rstrip("/").rsplit("/", 1)[-1]
        yield local
        fs, path = filesystem(destination, s3_endpoint)
        try:
            pafs.copy_files(
                str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
            )
        except OSError as exc:
            raise failed(exc, destination) from None


# --------------------------------------------------------------------------- clusters of several nodes
_NETWORK_FILESYSTEMS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "lustre",
    "ceph",
    "glusterfs",
    "gpfs",
    "beegfs",
    "efs",
    "fuse.s3fs",
    "fuse.mountpoint-s3",
    "fuse.gcsfuse",
    "fuse.juicefs",
    "fuse.sshfs",
)


def _filesystem_type(path: str) -> str:
    """The type of the filesystem ``path`` lives on, from /proc/mounts ("" when unknown)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    real = os.path.realpath(path)
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def require_shared(location: str, flag: str, nodes: int) -> None:
    """Refuse a local ``location`` on a cluster of ``nodes`` > 1 nodes (one line naming ``flag``).

    A folder on a network filesystem that every node mounts (NFS, EFS, Lustre, ...) is accepted.
    """
    if is_remote(location):
        return
    if nodes <= 1 or _filesystem_type(location) in _NETWORK_FILESYSTEMS:
        return
    raise CometError(
        f"{flag} {location} is a local folder, but this Ray cluster has {nodes} nodes that share no "
        f"disk: what one node writes there the others never see; pass {flag} s3://bucket/prefix "
        "(or a folder on a filesystem that every node mounts)"
    )
