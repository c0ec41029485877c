"""One model object from image to score: :class:`AnomalyModel`.

frozen backbone + patch aggregation (:class:`~comet_ray.features.extractor.PatchFeatureExtractor`)
-> features rounded to the cache dtype (float16 by default: what the detector was trained and
thresholded on, :func:`~comet_ray.features.store.as_stored`) -> the detector's patch scores in eval mode
at the run's precision (:func:`~comet_ray.models.scoring.detector_patch_scores`) -> image score (the patch
maximum) and anomaly map (upsampled, blurred).

Validation and ``evaluate`` run the second half of this path on cached features (``score_patches``);
``predict``, ``report``'s example panels and ``audit``'s gallery run all of it on images; ``export``
writes it as one graph (:class:`~comet_ray.export.ExportedDetector`, built from an ``AnomalyModel``).
``tests/test_one_path.py`` checks that one image gets the same score from each.
"""

from __future__ import annotations

import os

import torch

from comet_ray.checkpoint import load_detector
from comet_ray.config import FeatureConfig
from comet_ray.errors import CometError
from comet_ray.evaluate import checkpoint_precision
from comet_ray.features.extractor import PatchFeatureExtractor
from comet_ray.features.store import as_stored
from comet_ray.models.anomaly_map import anomaly_maps, image_scores
from comet_ray.models.protocol import Detector
from comet_ray.models.scoring import detector_patch_scores


def extractor_for(meta: dict, device: torch.device) -> PatchFeatureExtractor:
    """The feature extractor a checkpoint was trained with."""
    info = meta["features"]
    weights_file = info.get("weights_file")
    if weights_file and not os.path.exists(weights_file):
        raise CometError(f"the checkpoint's backbone weights file is missing: {weights_file}")
    config = FeatureConfig(
        backbone=info["backbone"],
        image_size=int(info["image_size"]),
        feature_dim=int(info["feature_dim"]),
        weights=weights_file,
        pretrained=bool(info.get("pretrained", True)),
        cache_dtype=info.get("cache_dtype", "float16"),
    )
    extractor = PatchFeatureExtractor(config, device)
    if extractor.fingerprint()["pretrained"] != config.pretrained:
        raise CometError(
            "the checkpoint was trained on ImageNet features but the backbone weights are unavailable here"
        )
    return extractor


class AnomalyModel:
    """Normalised images ``[B, 3, S, S]`` -> image scores ``[B]`` and anomaly maps ``[B, S, S]``."""

    def __init__(
        self,
        extractor: PatchFeatureExtractor,
        detector: Detector,
        grid: tuple[int, int],
        precision: str = "auto",
        meta: dict | None = None,
    ) -> None:
        self.extractor = extractor
        self.detector = detector
        self.grid = (int(grid[0]), int(grid[1]))
        self.precision = precision
        self.meta = meta or {}

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike, device: torch.device | str = "cpu"
    ) -> AnomalyModel:
        """``model.pt`` (or a run folder) with the backbone it was trained on, at the run's precision."""
        device = torch.device(device)
        detector, meta = load_detector(checkpoint, device)
        return cls(
            extractor_for(meta, device), detector, tuple(meta["grid"]), checkpoint_precision(meta), meta
        )

    @property
    def image_size(self) -> int:
        return int(self.extractor.config.image_size)

    @property
    def cache_dtype(self) -> str:
        return self.extractor.config.cache_dtype

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features ``[B, P, D]`` as the feature cache holds them (rounded to the cache dtype)."""
        return as_stored(self.extractor(images), self.cache_dtype)

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Patch scores ``[B, P]`` of (cached or fresh) features: the scoring of validation and evaluate."""
        return detector_patch_scores(self.detector, features, self.precision)

    def maps(self, patch_scores: torch.Tensor) -> torch.Tensor:
        return anomaly_maps(patch_scores, self.grid, self.image_size)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, with_maps: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image scores ``[B]``, anomaly maps ``[B, S, S]`` or None), on the CPU."""
        patch = self.patch_scores(self.features(images))
        scores = image_scores(patch).cpu()
        return scores, (self.maps(patch).cpu() if with_maps else None)
