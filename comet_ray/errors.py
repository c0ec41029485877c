"""User-facing errors.

Every problem a user can cause (a bad path, a corrupt image, a wrong folder layout) is raised as a
:class:`CometError` whose message is one clear line naming the offending file. The CLI prints that line
and exits non-zero instead of showing a traceback from deep inside PIL or torch.
"""

from __future__ import annotations

import re


class CometError(Exception):
    """An error caused by input or configuration, reported to the user as one line."""


class DatasetLayoutError(CometError):
    """The dataset root is not an MVTec-AD-style tree, or a category is empty."""


class ImageDecodeError(CometError):
    """An image or mask file cannot be decoded."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason


class CheckpointError(CometError):
    """A checkpoint is missing, corrupt, or from another model or version."""


class StorageError(CometError):
    """Object storage cannot be used: missing bucket, denied credentials, endpoint down (after retries)."""


_REMOTE_ERROR = re.compile(r"comet_ray\.errors\.(\w+): ([^\n]+)")


def remote_error(text: str) -> tuple[str, str] | None:
    """``(kind, message)`` of the last ``comet_ray.errors.<Kind>: message`` line in ``text``: a Ray worker's
    formatted traceback (Ray keeps the remote exception object only partly; that line is what the user
    can act on). None when there is none."""
    found = _REMOTE_ERROR.findall(text)
    return (found[-1][0], found[-1][1].strip()) if found else None
