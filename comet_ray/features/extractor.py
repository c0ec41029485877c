"""Frozen backbone + patch aggregation as one callable, and the once-per-image extraction loop.

On a GPU the trunk runs in bf16 autocast with channels_last inputs (both pay on tensor cores); the
aggregated features leave in float32 and are stored in ``cache_dtype``. Decoding of the next chunk of
images overlaps with the backbone pass on the current one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comet_ray import storage
from comet_ray.config import FeatureConfig
from comet_ray.data.images import load_samples
from comet_ray.data.layout import Sample
from comet_ray.data.s3 import public_s3_uri
from comet_ray.features.aggregation import aggregate_patches
from comet_ray.features.backbone import BACKBONES, build_backbone
from comet_ray.features.store import FeatureStore, storage_dtype

log = logging.getLogger(__name__)


class PatchFeatureExtractor:
    """Images [B, 3, S, S] (ImageNet-normalised) -> patch features [B, P, D] float32."""

    def __init__(self, config: FeatureConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.trunk, self.weights_source = build_backbone(config.backbone, config.weights, config.pretrained)
        self.feature_dim = config.feature_dim or BACKBONES[config.backbone].default_feature_dim
        self.pre_dim = self.feature_dim
        self.on_cuda = self.device.type == "cuda"
        self.trunk.to(self.device)
        if self.on_cuda:
            self.trunk.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.on_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_cuda):
            maps = self.trunk(images)
        return aggregate_patches(maps, self.pre_dim, self.feature_dim)

    def grid(self, image_size: int) -> tuple[int, int]:
        with torch.inference_mode():
            maps = self.trunk(torch.zeros(1, 3, image_size, image_size, device=self.device))
        return int(maps[0].shape[2]), int(maps[0].shape[3])

    def fingerprint(self) -> dict[str, Any]:
        """What determines the features, for cache keys and checkpoints."""
        return {
            "backbone": self.config.backbone,
            "weights": self.weights_source,
            "weights_file": self.config.weights,
            "pretrained": self.weights_source != "random init",
            "image_size": self.config.image_size,
            "feature_dim": self.feature_dim,
            "cache_dtype": self.config.cache_dtype,
        }


@dataclass
class ExtractedSplit:
    """Features of one split plus what evaluation needs beside them (masks) and what was skipped."""

    store: FeatureStore
    masks: torch.Tensor | None = None  # [N, S, S] bool, aligned with store.ids
    mask_available: torch.Tensor | None = None  # [N] bool
    skipped: list[dict] = field(default_factory=list)
    mask_issues: list[dict] = field(default_factory=list)
    origin: str = ""  # with a cache: "extracted N images into the cache LOCATION" or "read N images from ..."


def extract_features(
    samples: list[Sample],
    extractor: PatchFeatureExtractor,
    filesystem: Any,
    with_masks: bool = False,
    chunk_size: int = 64,
    progress: bool = False,
) -> ExtractedSplit:
    """Decode, preprocess and embed every sample once; unreadable images are skipped and reported."""
    config = extractor.config
    dtype = storage_dtype(config.cache_dtype)
    grid = extractor.grid(config.image_size)
    chunks = [samples[i : i + chunk_size] for i in range(0, len(samples), chunk_size)]
    feature_parts: list[torch.Tensor] = []
    ids: list[str] = []
    masks: list[torch.Tensor] = []
    available: list[torch.Tensor] = []
    skipped: list[dict] = []
    mask_issues: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc="features", unit="img", leave=False)

    def load(chunk: list[Sample]):
        return load_samples(chunk, config.image_size, filesystem, with_masks=with_masks)

    with ThreadPoolExecutor(max_workers=1) as prefetch:
        pending = prefetch.submit(load, chunks[0]) if chunks else None
        for index in range(len(chunks)):
            loaded = pending.result()
            pending = prefetch.submit(load, chunks[index + 1]) if index + 1 < len(chunks) else None
            skipped.extend(loaded.skipped)
            mask_issues.extend(getattr(loaded, "mask_issues", []))
            for start in range(0, len(loaded.sample_ids), config.batch_size):
                batch = loaded.images[start : start + config.batch_size]
                feature_parts.append(extractor(batch).to("cpu", dtype))
            ids.extend(loaded.sample_ids)
            if with_masks and loaded.masks is not None:
                masks.append(loaded.masks)
                available.append(loaded.mask_available)
            if bar is not None:
                bar.update(len(chunks[index]))
    if bar is not None:
        bar.close()
    if feature_parts:
        features = torch.cat(feature_parts)
    else:
        features = torch.zeros(0, grid[0] * grid[1], extractor.feature_dim, dtype=dtype)
    store = FeatureStore(ids, features, grid)
    result = ExtractedSplit(store, skipped=skipped, mask_issues=mask_issues)
    if with_masks:
        size = config.image_size
        result.masks = torch.cat(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool)
        result.mask_available = torch.cat(available) if available else torch.zeros(0, dtype=torch.bool)
    return result


CACHE_MARKER = "extras.json"  # written (uploaded) last: an entry without it is incomplete
LOCAL_MIRROR = "comet-ray-features"


def cache_key(samples: list[Sample], extractor: PatchFeatureExtractor, with_masks: bool) -> str:
    payload = json.dumps(
        {
            "extractor": extractor.fingerprint(),
            "samples": [(s.sample_id, s.uri, s.mask_uri) for s in samples],
            "masks": with_masks,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def cache_location(cache_dir: str, samples: list[Sample], extractor: PatchFeatureExtractor,
                   with_masks: bool) -> str:
    """Where the features of ``samples`` under ``extractor`` live in ``cache_dir`` (a folder or ``s3://``).

    One entry per feature fingerprint and sample list, ``<cache_dir>/<cache_key>``: every process, on
    any node, that embeds the same images with the same backbone settings finds the same entry. On a
    cluster the cache lives in shared storage (default: under the run's ``--storage-path``), so what
    one node extracted no other node extracts again.
    """
    return storage.join(cache_dir, cache_key(samples, extractor, with_masks))


def _local_entry(location: str, s3_endpoint: str | None = None) -> Path | None:
    """A complete cache entry as a local folder: ``location`` itself, or this node's copy of an S3 entry
    (downloaded once per node, then reused); None when the entry does not exist (yet)."""
    if not storage.is_remote(location):
        return Path(location) if (Path(location) / CACHE_MARKER).exists() else None
    mirror = Path(tempfile.gettempdir()) / LOCAL_MIRROR / hashlib.sha256(location.encode()).hexdigest()[:24]
    if (mirror / CACHE_MARKER).exists():
        return mirror
    if not storage.exists(storage.join(location, CACHE_MARKER), s3_endpoint):
        return None
    partial = mirror.with_name(f"{mirror.name}.tmp-{os.getpid()}")
    storage.download(location, partial, s3_endpoint)
    try:
        os.replace(partial, mirror)
    except OSError:  # another process on this node finished the same download first
        shutil.rmtree(partial, ignore_errors=True)
    return mirror


def load_cached(location: str, with_masks: bool, mmap: bool = False,
                s3_endpoint: str | None = None) -> ExtractedSplit | None:
    """The :class:`ExtractedSplit` stored at ``location`` (local or ``s3://``), or None if there is none."""
    directory = _local_entry(location, s3_endpoint)
    if directory is None or not FeatureStore.exists(directory):
        return None
    store = FeatureStore.load(directory, mmap=mmap)
    extras = json.loads((directory / CACHE_MARKER).read_text())
    result = ExtractedSplit(store, skipped=extras["skipped"], mask_issues=extras["mask_issues"])
    if with_masks:
        result.masks = torch.from_numpy(np.load(directory / "masks.npy"))
        result.mask_available = torch.from_numpy(np.load(directory / "mask_available.npy"))
    return result


def save_cached(location: str, result: ExtractedSplit, with_masks: bool, s3_endpoint: str | None = None) -> None:
    """Store ``result`` at ``location`` (local or ``s3://``); the marker file last, so readers see it whole."""
    remote = storage.is_remote(location)
    directory = Path(tempfile.mkdtemp(prefix="comet-features-")) if remote else Path(location)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if with_masks:
            np.save(directory / "masks.npy", result.masks.numpy())
            np.save(directory / "mask_available.npy", result.mask_available.numpy())
        result.store.save(directory)
        extras = {"skipped": result.skipped, "mask_issues": result.mask_issues}
        (directory / CACHE_MARKER).write_text(json.dumps(extras))
        if remote:
            storage.upload(directory, location, last=[CACHE_MARKER], s3_endpoint=s3_endpoint)
    finally:
        if remote:
            shutil.rmtree(directory, ignore_errors=True)


def extract_features_cached(
    samples: list[Sample],
    extractor: PatchFeatureExtractor,
    filesystem: Any,
    with_masks: bool,
    cache_dir: str | None,
    progress: bool = False,
    mmap: bool = False,
    s3_endpoint: str | None = None,
) -> ExtractedSplit:
    """``extract_features`` with a cache (a local folder or ``s3://``) keyed by the samples and the
    extractor's fingerprint (:func:`cache_location`).

    Reruns (another strategy, seed or Tune trial on the same images, another worker on another node)
    then skip the backbone entirely.
    """
    if not cache_dir:
        return extract_features(samples, extractor, filesystem, with_masks, progress=progress)
    location = cache_location(cache_dir, samples, extractor, with_masks)
    cached = load_cached(location, with_masks, mmap=mmap, s3_endpoint=s3_endpoint)
    if cached is not None:
        log.info("feature cache hit: %s", public_s3_uri(location))
        cached.origin = f"read {len(cached.store)} images from the cache {public_s3_uri(location)}"
        return cached
    result = extract_features(samples, extractor, filesystem, with_masks, progress=progress)
    save_cached(location, result, with_masks, s3_endpoint)
    result.origin = f"extracted {len(result.store)} images into the cache {public_s3_uri(location)}"
    return result
