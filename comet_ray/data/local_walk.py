"""Listing a local folder tree the way production folders need: safely, and saying what was left out.

Factory folders arrive from NAS shares and USB sticks: file names in Latin-1 or CP1252 rather than
UTF-8, symbolic links pointing back up the tree, links to files that are gone. ``pyarrow.fs`` (and
everything built on it) fails on the first non-UTF-8 name and follows a link loop until the kernel
stops it, listing every image dozens of times. This walker follows links to folders (users link
data in on purpose) but enters each real folder once, and reports instead of raising:

* names that are not valid UTF-8 (they could not be written to manifests, CSV or Parquet; rename),
* link loops and folders reached twice through links (listing them again would duplicate images),
* broken links, and folders that cannot be read (permissions).

Every command that reads a local tree (the sample table, ``predict``, ``upload``) lists through it,
so they agree on what counts and report the same problems.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LocalListing:
    """What :func:`walk_files` found under one root."""

    files: list[str] = field(default_factory=list)  # absolute paths, valid UTF-8, sorted
    problems: list[dict] = field(
        default_factory=list
    )  # {"path": printable path, "reason": why it was left out}
    hidden: int = 0  # files left out because they or a parent folder start with "." (see count_hidden)


def printable(path: bytes | str) -> str:
    """A path that is safe to print and to write as UTF-8: undecodable bytes become ``\\xNN``."""
    if isinstance(path, str):
        path = os.fsencode(path)
    return path.decode("utf-8", "backslashreplace")


def walk_files(
    root: str | os.PathLike, wanted: Callable[[str], bool] | None = None, count_hidden: bool = False
) -> LocalListing:
    """Every non-hidden file under ``root`` (recursive, following folder links once), sorted.

    ``wanted(name)`` filters by file name (for example by image extension); problems are reported
    only for entries it would have wanted, so a broken link to a text file does not clutter the
    report of an image listing. A ``root`` that is itself a file is returned as the only entry.
    ``count_hidden`` also walks hidden folders (a ``.git`` can be large) to count the files left out.
    """
    listing = LocalListing()
    top = os.fsencode(os.path.abspath(os.path.expanduser(os.fspath(root))))
    if os.path.isfile(top):
        _add_file(listing, top, wanted)
        return listing

    seen_folders: dict[tuple[int, int], bytes] = {}

    def on_error(exc: OSError) -> None:
        name = exc.filename if exc.filename is not None else top
        listing.problems.append(
            {"path": printable(name), "reason": f"cannot list folder ({exc.strerror or exc})"}
        )

    for folder, subfolders, names in os.walk(top, onerror=on_error, followlinks=True):
        identity = _identity(folder)
        if identity is not None:
            seen_folders.setdefault(identity, folder)
        keep = []
        for name in sorted(subfolders):
            path = os.path.join(folder, name)
            if name.startswith(b"."):
                listing.hidden += _count_files(path) if count_hidden else 0
                continue
            if not is_utf8_name(name):
                listing.problems.append(
                    {"path": printable(path), "reason": "folder name is not valid UTF-8; rename it"}
                )
                continue
            identity = _identity(path)
            if identity in seen_folders:
                first = printable(seen_folders[identity])
                listing.problems.append(
                    {
                        "path": printable(path),
                        "reason": f"symbolic link to a folder already listed ({first}); skipped to avoid a loop or duplicates",
                    }
                )
                continue
            if identity is not None:
                seen_folders[identity] = path
            keep.append(name)
        subfolders[:] = keep
        for name in names:
            path = os.path.join(folder, name)
            if name.startswith(b"."):
                listing.hidden += 1
                continue
            _add_file(listing, path, wanted)
    listing.files.sort()
    listing.problems.sort(key=lambda p: p["path"])
    return listing


def _add_file(listing: LocalListing, path: bytes, wanted: Callable[[str], bool] | None) -> None:
    name = os.path.basename(path)
    if wanted is not None and not wanted(name.decode("utf-8", "surrogateescape")):
        return
    if not is_utf8_name(path):
        listing.problems.append(
            {"path": printable(path), "reason": "file name is not valid UTF-8; rename it"}
        )
    elif not os.path.exists(path):  # a link to nothing, or a link loop among files
        listing.problems.append({"path": printable(path), "reason": "broken symbolic link"})
    elif not os.path.isfile(path):
        listing.problems.append({"path": printable(path), "reason": "not a regular file"})
    else:
        listing.files.append(path.decode("utf-8"))


def is_utf8_name(name: bytes) -> bool:
    """Whether a raw file name decodes as UTF-8 (what manifests, CSV and Parquet need)."""
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _identity(path: bytes) -> tuple[int, int] | None:
    try:
        info = os.stat(path)  # follows links: the folder the link points at
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _count_files(path: bytes) -> int:
    return sum(len(names) for _, _, names in os.walk(path))  # hidden trees: no links followed
