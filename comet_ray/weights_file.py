"""``weights.json``: the SCL weight of every training image, per epoch, and its final anomaly score.

Written by :func:`comet_ray.pipeline.write_run`, read by ``comet-ray audit`` and ``comet-ray report``::

    {
      "weights":  {sample_id: weight after the last epoch, ...},     # every training image, store order
      "injected": [sample_id, ...],                                  # experiments: anomalies moved into train
      "scores":   {sample_id: score, ...},                           # the final model's SCL score of each image
      "score":    "what the scores are",
      "per_epoch": {
        "epochs": E,
        "below_one": {sample_id: [w_1, ..., w_E], ...},              # only images below 1 in some epoch
        "unknown_epochs": [e, ...]                                   # 1-based; weights not recorded (null)
      }
    }

Every image not in ``below_one`` had weight 1 in every epoch, so the file grows with the images SCL
distrusted, not with the category: a 20,000-image category with 10 % ever below 1 over 40 epochs
writes about 3.3 MB (1.8 MB without any per-epoch row; 17 MB if every image were below 1 every
epoch). Run folders written before the audit existed hold only ``weights`` and ``injected``;
:func:`read_training_weights` then leaves ``scores`` and ``per_epoch`` None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SCORE_DESCRIPTION = (
    "mean of the top_k highest patch scores of the image under the final model (the score SCL fences)"
)


def _rounded(value: float) -> float | None:
    """Six significant digits (NaN: None); a weight below 1 stays below 1."""
    if not math.isfinite(value):
        return None
    if value >= 1:
        return 1.0
    return min(float(f"{value:.6g}"), 0.999999)


def weights_document(
    ids: Sequence[str],
    final_weights: Sequence[float],
    injected: set[str] | Sequence[str],
    weight_history: np.ndarray | None = None,
    scores: Sequence[float] | None = None,
    score_description: str | None = None,
) -> dict:
    """The ``weights.json`` content. ``weight_history``: ``[epochs, N]`` in ``ids`` order (NaN = unknown)."""
    document: dict = {
        "weights": dict(zip(ids, (float(w) for w in final_weights))),
        "injected": sorted(injected),
    }
    if scores is not None:
        document["scores"] = dict(zip(ids, (float(s) for s in scores)))
        document["score"] = score_description or SCORE_DESCRIPTION
    if weight_history is not None:
        history = np.asarray(weight_history, dtype=np.float64).reshape(-1, len(ids))
        unknown = np.isnan(history).all(axis=1)
        below = (history < 1).any(axis=0)
        document["per_epoch"] = {
            "epochs": int(history.shape[0]),
            "below_one": {ids[j]: [_rounded(v) for v in history[:, j]] for j in np.flatnonzero(below)},
            "unknown_epochs": [int(e) + 1 for e in np.flatnonzero(unknown)],
        }
    return document


@dataclass
class TrainingWeights:
    """What ``weights.json`` says about one run's training images, as arrays in one id order."""

    ids: list[str]
    final: np.ndarray  # [N] weight after the last epoch
    injected: set[str]
    scores: np.ndarray | None = None  # [N] final SCL score; None in older run folders
    per_epoch: np.ndarray | None = None  # [E, N]; NaN where not recorded; None in older run folders
    notes: list[str] = field(default_factory=list)

    @property
    def injected_mask(self) -> np.ndarray:
        return np.array([i in self.injected for i in self.ids], dtype=bool)


def read_training_weights(document: dict) -> TrainingWeights:
    """Parse a ``weights.json`` document (missing newer sections become None)."""
    weights = document.get("weights") or {}
    ids = list(weights)
    final = np.array([float(weights[i]) for i in ids], dtype=np.float64)
    result = TrainingWeights(ids, final, set(document.get("injected") or []))
    if isinstance(document.get("scores"), dict):
        scores = document["scores"]
        result.scores = np.array([float(scores.get(i, math.nan)) for i in ids], dtype=np.float64)
    per_epoch = document.get("per_epoch")
    if isinstance(per_epoch, dict) and "epochs" in per_epoch:
        epochs = int(per_epoch["epochs"])
        history = np.ones((epochs, len(ids)), dtype=np.float64)
        column = {sample_id: j for j, sample_id in enumerate(ids)}
        for sample_id, row in (per_epoch.get("below_one") or {}).items():
            if sample_id in column and len(row) == epochs:
                history[:, column[sample_id]] = [math.nan if v is None else float(v) for v in row]
        for epoch in per_epoch.get("unknown_epochs") or []:
            history[int(epoch) - 1, :] = math.nan
        result.per_epoch = history
    return result
