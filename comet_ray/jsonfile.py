"""JSON that every parser reads: undefined numbers are written as ``null``, never as ``NaN``.

An image AUROC is undefined when the test split holds one class only, a pixel AUROC when no mask
is usable. Python's ``json`` writes such floats as the bare token ``NaN``, which is not JSON:
``JSON.parse``, Go, Rust's serde and strict ``jq`` builds refuse the whole file. Every file and
stdout document comet-ray writes for people and other tools (run folders, summaries, ``evaluate``
output) goes through :func:`dumps`; internal state that only comet-ray reads back may use ``json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from comet_ray import atomic
from comet_ray.errors import CometError


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts, lists and tuples) made ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` with undefined numbers as ``null``; raises rather than ever writing ``NaN``."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def write(path: str | Path, value: Any, **kwargs: Any) -> Path:
    """:func:`dumps` of ``value`` into ``path``, atomically (:func:`comet_ray.atomic.write_text`)."""
    return atomic.write_text(path, dumps(value, **kwargs))


def read_run_file(path: Path, default: Any = None) -> Any:
    """A run folder's JSON file; ``default`` when it is missing (without one, a missing file means the folder
    is not a run folder). Unreadable JSON is one :class:`~comet_ray.errors.CometError` line."""
    if not path.exists():
        if default is not None:
            return default
        raise CometError(f"{path.parent} is not a comet-ray run folder (no {path.name})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CometError(f"cannot read {path}: {exc}") from None
