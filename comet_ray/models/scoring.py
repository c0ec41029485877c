"""Scoring beside the detector: patch scores of features, at a run's precision, a few images at a time.

The trainer (validation each epoch) and evaluation (every split) both score through here, so the
detector's scores have one home below both of them.
"""

from __future__ import annotations

import torch

from comet_ray.config import use_bf16
from comet_ray.features.store import FeatureStore
from comet_ray.models.protocol import Detector


@torch.no_grad()
def detector_patch_scores(model: Detector, features: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """Patch scores [B, P] float32 of features [B, P, D]: eval mode, bf16 autocast as ``precision`` says."""
    bf16 = use_bf16(precision, features.device.type)
    was_training = model.training
    model.eval()
    with torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=bf16):
        scores = model.patch_scores(features).float()
    model.train(was_training)
    return scores


SCORING_CHUNK_BYTES = 64 << 20  # float32 features per scoring call: 8 images of WideResNet-50 at 288 px


@torch.no_grad()
def score_rows(
    model: Detector,
    store: FeatureStore,
    rows: torch.Tensor,
    device: torch.device | str,
    precision: str = "auto",
) -> torch.Tensor:
    """Patch scores [len(rows), P] of rows ``rows`` of ``store`` (see :func:`detector_patch_scores`),
    a few images at a time (at most ``SCORING_CHUNK_BYTES`` of float32 features, 64 images)."""
    device = torch.device(device)
    chunk = max(1, min(64, SCORING_CHUNK_BYTES // max(1, store.num_patches * store.dim * 4)))
    parts = [
        detector_patch_scores(model, store.batch(rows[start : start + chunk], device), precision)
        for start in range(0, rows.numel(), chunk)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, store.num_patches, device=device)
