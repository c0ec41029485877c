"""Detector checkpoints: one file that evaluate/predict/export load without the training config.

Saved atomically (temp name, then rename) so a crash or a full disk never leaves a half-written file
in place of a good one, and loaded with ``torch.load(weights_only=True)`` only: a checkpoint is data,
never code. A checkpoint holds no credentials (only the dataset URI without query strings).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from comet_ray.atomic import atomic_path, recover_folder
from comet_ray.errors import CheckpointError
from comet_ray.models.protocol import Detector

FORMAT = "comet-ray-detector"
FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    try:
        with atomic_path(path, fsync=True) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as exc:  # torch.save wraps a failed write (disk full) in RuntimeError
        raise CheckpointError(f"could not write {path} (the previous file is intact): {exc}") from None


def save_detector(
    path: str | os.PathLike,
    model: Detector,
    features: dict,
    grid: tuple[int, int],
    config: dict,
    threshold: float,
    nominal_score: float,
    extra: dict | None = None,
    pixel_threshold: float | None = None,
) -> None:
    """Write a self-describing detector checkpoint (model + how to compute its inputs + threshold)."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model.name,
        "model_hparams": model.hparams(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "features": dict(features),
        "grid": list(grid),
        "config": config,
        "threshold": float(threshold),
        "nominal_score": float(nominal_score),
        "pixel_threshold": None if pixel_threshold is None else float(pixel_threshold),
        "extra": extra or {},
    }
    atomic_torch_save(payload, path)


def load_detector(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Detector, dict]:
    """Rebuild a detector from a checkpoint; returns (model in eval mode, the checkpoint's metadata)."""
    from comet_ray.models import detector_from_hparams

    path = Path(path)
    recover_folder(path.parent if path.suffix == ".pt" else path)  # a run folder a killed publish set aside
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line, not a traceback
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a comet-ray detector checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {payload.get('format_version')}; "
            f"this comet-ray reads version {FORMAT_VERSION}"
        )
    try:
        model = detector_from_hparams(payload["model_name"], payload["model_hparams"])
    except TypeError as exc:
        raise CheckpointError(
            f"{path} holds settings that do not fit model {payload['model_name']!r}: {exc}"
        ) from None
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match model {payload['model_name']}: {exc}") from None
    meta = {k: v for k, v in payload.items() if k != "model_state"}
    return model.to(device).eval(), meta
