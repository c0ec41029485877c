"""Scoring a feature store with a trained detector, and the metrics of a labelled split.

Used once at the end of training on the report split (final numbers) and on the validation split
(threshold, Tune objective). Nothing here ever chooses an epoch or a hyperparameter.

:func:`detector_patch_scores` is the one way an image is scored: validation (and so the saved
threshold), ``evaluate`` and ``predict`` all go through it, with features as the cache holds them
(float16 by default: ``predict`` rounds fresh features the same way, see ``as_stored``) and the
precision the run was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comet_ray import metrics as metric_functions
from comet_ray.comet.collective import Collective
from comet_ray.features.extractor import ExtractedSplit
from comet_ray.features.store import FeatureStore
from comet_ray.metrics import anomaly_metrics, auroc
from comet_ray.models.anomaly_map import anomaly_maps, image_scores
from comet_ray.models.protocol import Detector
from comet_ray.models.scoring import score_rows


def checkpoint_precision(meta: dict) -> str:
    """The precision a checkpoint's run scored its validation split with (so its threshold holds)."""
    return (meta.get("config") or {}).get("precision", "auto")


def score_patches(
    model: Detector,
    store: FeatureStore,
    device: torch.device | str,
    precision: str = "auto",
    collective: Collective | None = None,
) -> torch.Tensor:
    """Patch scores [N, P] of every image in ``store``; with a ``collective`` each worker scores the rows
    it holds (:meth:`Collective.shard_rows`) and every worker gets all of them back, in order."""
    collective = collective or Collective()
    local = score_rows(model, store, collective.shard_rows(len(store)), device, precision)
    return collective.gather_rows(local, len(store))


@dataclass
class SplitEvaluation:
    metrics: dict
    image_scores: torch.Tensor  # [N], aligned with the split's store ids
    labels: torch.Tensor  # [N] bool
    patch_scores: torch.Tensor | None = None  # [N, P] on the scoring device: reused, not recomputed


def split_labels(split: ExtractedSplit, anomalous_ids: set[str]) -> torch.Tensor:
    return torch.tensor([i in anomalous_ids for i in split.store.ids], dtype=torch.bool)


def evaluate_split(
    model: Detector,
    split: ExtractedSplit,
    labels: torch.Tensor,
    image_size: int,
    device: torch.device | str,
    pixel_metrics: bool = True,
    precision: str = "auto",
    patch: torch.Tensor | None = None,
) -> SplitEvaluation:
    """Image AUROC, F1-max and (where masks are available) pixel AUROC and AUPRO@0.3 of one split.

    ``patch``: the split's patch scores when already computed (e.g. gathered from data-parallel workers).
    """
    if patch is None:
        patch = score_patches(model, split.store, device, precision=precision)
    scores = image_scores(patch)
    maps = masks = None
    if pixel_metrics and split.masks is not None and split.mask_available is not None:
        keep = split.mask_available.to(patch.device)
        if bool(keep.any()):
            maps = anomaly_maps(patch[keep], split.store.grid, image_size)
            masks = split.masks.to(patch.device)[keep]
    if labels.numel() == 0 or bool(labels.all()) or not bool(labels.any()):
        # One image class: image metrics are undefined, pixel metrics may not be (anomalies only).
        metrics = {"image_auroc": float("nan"), "f1_max": float("nan"), "f1_threshold": float("nan")}
        if maps is not None:
            metrics.update(metric_functions.pixel_metrics(maps, masks))
    else:
        metrics = anomaly_metrics(scores, labels.to(scores.device), maps, masks)
    metrics["n_images"] = int(labels.numel())
    metrics["n_anomalous"] = int(labels.sum())
    metrics["n_pixel_evaluated"] = 0 if maps is None else int(maps.shape[0])
    return SplitEvaluation(metrics, scores.cpu(), labels.cpu(), patch)


def validation_auroc(
    model: Detector,
    split: ExtractedSplit,
    labels: torch.Tensor,
    device,
    precision: str = "auto",
    collective: Collective | None = None,
) -> float:
    """Image AUROC on the validation split only: the per-epoch signal Tune may use (every data-parallel
    worker calls it: each scores its shard of the split)."""
    if labels.numel() == 0 or bool(labels.all()) or not bool(labels.any()):
        return float("nan")
    patch = score_patches(model, split.store, device, precision=precision, collective=collective)
    return auroc(image_scores(patch), labels)
