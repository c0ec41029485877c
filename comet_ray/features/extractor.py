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
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from comet_ray import storage
from comet_ray.config import FeatureConfig
from comet_ray.data.images import load_samples
from comet_ray.data.layout import Sample
from comet_ray.data.s3 import public_s3_uri
from comet_ray.features.aggregation import aggregate_patches
from comet_ray.features.backbone import BACKBONES, build_backbone
from comet_ray.features.entry import EntryIndex, FeatureEntry, as_numpy, pack_masks, part_name, write_part
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


def _embedded_chunks(
    samples: list[Sample],
    extractor: PatchFeatureExtractor,
    filesystem: Any,
    with_masks: bool,
    chunk_size: int,
    progress: bool,
):
    """(first input row, loaded images, their features in the cache dtype) per chunk of ``samples``;
    decoding the next chunk overlaps the backbone pass on this one."""
    config = extractor.config
    dtype = storage_dtype(config.cache_dtype)
    chunks = [samples[i : i + chunk_size] for i in range(0, len(samples), chunk_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc="features", unit="img", leave=False)

    def load(chunk: list[Sample]):
        return load_samples(chunk, config.image_size, filesystem, with_masks=with_masks)

    try:
        with ThreadPoolExecutor(max_workers=1) as prefetch:
            pending = prefetch.submit(load, chunks[0]) if chunks else None
            for index in range(len(chunks)):
                loaded = pending.result()
                pending = prefetch.submit(load, chunks[index + 1]) if index + 1 < len(chunks) else None
                parts = [
                    extractor(loaded.images[start : start + config.batch_size]).to("cpu", dtype)
                    for start in range(0, len(loaded.sample_ids), config.batch_size)
                ]
                features = torch.cat(parts) if parts else None
                yield index * chunk_size, loaded, features
                if bar is not None:
                    bar.update(len(chunks[index]))
    finally:
        if bar is not None:
            bar.close()


def extract_features(
    samples: list[Sample],
    extractor: PatchFeatureExtractor,
    filesystem: Any,
    with_masks: bool = False,
    chunk_size: int = 64,
    progress: bool = False,
) -> ExtractedSplit:
    """Decode, preprocess and embed every sample once, in memory; unreadable images are skipped and reported.

    The features go straight into one tensor sized for every sample (the rows of skipped images are
    never touched, so never resident): no second copy of the set is ever made.
    """
    config = extractor.config
    grid = extractor.grid(config.image_size)
    features = torch.empty(
        (len(samples), grid[0] * grid[1], extractor.feature_dim), dtype=storage_dtype(config.cache_dtype)
    )
    ids: list[str] = []
    masks: list[torch.Tensor] = []
    available: list[torch.Tensor] = []
    result = ExtractedSplit(FeatureStore([], features[:0], grid))
    for _, loaded, chunk in _embedded_chunks(
        samples, extractor, filesystem, with_masks, chunk_size, progress
    ):
        result.skipped.extend(loaded.skipped)
        result.mask_issues.extend(loaded.mask_issues)
        if chunk is not None:
            features[len(ids) : len(ids) + len(chunk)] = chunk
        ids.extend(loaded.sample_ids)
        if with_masks and loaded.masks is not None:
            masks.append(loaded.masks)
            available.append(loaded.mask_available)
    result.store = FeatureStore(ids, features[: len(ids)], grid)
    if with_masks:
        size = config.image_size
        result.masks = torch.cat(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool)
        result.mask_available = torch.cat(available) if available else torch.zeros(0, dtype=torch.bool)
    return result


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


def cache_location(
    cache_dir: str, samples: list[Sample], extractor: PatchFeatureExtractor, with_masks: bool
) -> str:
    """Where the features of ``samples`` under ``extractor`` live in ``cache_dir`` (a folder or ``s3://``).

    One entry per feature fingerprint and sample list, ``<cache_dir>/<cache_key>``: every process, on
    any node, that embeds the same images with the same backbone settings finds the same entry. On a
    cluster the cache lives in shared storage (default: under the run's ``--storage-path``), so what
    was extracted once no process extracts again; each reads only the rows it needs
    (:mod:`comet_ray.features.entry`).
    """
    return storage.join(cache_dir, cache_key(samples, extractor, with_masks))


def open_entry(location: str, s3_endpoint: str | None = None) -> FeatureEntry | None:
    """The complete cache entry at ``location`` (local or ``s3://``), or None if there is none (yet)."""
    fs, path = storage.filesystem(location, s3_endpoint)
    try:
        return FeatureEntry.open(fs, path, public_s3_uri(location))
    except OSError as exc:
        raise storage.failed(exc, location) from None


def extract_to_entry(
    samples: list[Sample],
    extractor: PatchFeatureExtractor,
    filesystem: Any,
    with_masks: bool,
    location: str,
    progress: bool = False,
    s3_endpoint: str | None = None,
    chunk_size: int = 64,
) -> FeatureEntry:
    """Embed ``samples`` in this process into a cache entry at ``location``, one part per chunk (nothing
    accumulates in memory); ``index.json`` last."""
    config = extractor.config
    fs, path = storage.filesystem(location, s3_endpoint)
    grid = extractor.grid(config.image_size)
    index = EntryIndex(
        grid,
        extractor.feature_dim,
        config.cache_dtype,
        config.image_size,
        with_masks,
        extractor.fingerprint(),
    )
    position = {s.sample_id: row for row, s in enumerate(samples)}
    try:
        for first, loaded, chunk in _embedded_chunks(
            samples, extractor, filesystem, with_masks, chunk_size, progress
        ):
            index.skipped.extend(loaded.skipped)
            index.mask_issues.extend(loaded.mask_issues)
            if chunk is None:
                continue
            name = part_name(first, min(first + chunk_size, len(samples)) - 1)
            masks = pack_masks(loaded.masks) if with_masks else None
            started = time.time()
            write_part(fs, path, name, as_numpy(chunk), masks)
            rows = [position[i] for i in loaded.sample_ids]
            index.add_part(
                name,
                rows,
                loaded.sample_ids,
                loaded.mask_available.tolist() if with_masks else None,
                node=platform.node(),
                pid=os.getpid(),
                started=started,
                finished=time.time(),
            )
        index.write(fs, path)
    except OSError as exc:
        raise storage.failed(exc, location) from None
    return FeatureEntry.open(fs, path, public_s3_uri(location))


def read_split(
    entry: FeatureEntry, ids: list[str], with_masks: bool = False, held: torch.Tensor | None = None
) -> ExtractedSplit:
    """The images ``ids`` of ``entry`` (those skipped at decode time dropped) as an :class:`ExtractedSplit`.

    ``held``: rows of the split this process holds (a data-parallel worker's shard); masks are read for
    every image of the split (they are small, and the evaluating worker needs them all).
    """
    wanted = set(ids)
    present = [i for i in ids if entry.contains(i)]
    result = ExtractedSplit(entry.store(present, held))
    if with_masks:
        result.masks, result.mask_available = entry.read_masks(entry.rows_of(present))
    result.skipped = [s for s in entry.skipped if s["sample_id"] in wanted]
    result.mask_issues = [s for s in entry.mask_issues if s["sample_id"] in wanted]
    return result


def cached_entry(
    samples: list[Sample],
    extractor: PatchFeatureExtractor,
    filesystem: Any,
    with_masks: bool,
    cache_dir: str,
    progress: bool = False,
    s3_endpoint: str | None = None,
) -> tuple[FeatureEntry, str]:
    """The cache entry of ``samples`` in ``cache_dir``, extracting it in this process when there is none;
    and where the features came from ("extracted N images into ..." or "read N images from ...")."""
    location = cache_location(cache_dir, samples, extractor, with_masks)
    entry = open_entry(location, s3_endpoint)
    if entry is not None:
        log.info("feature cache hit: %s", entry.shown)
        return entry, f"read {len(entry)} images from the cache {entry.shown}"
    entry = extract_to_entry(samples, extractor, filesystem, with_masks, location, progress, s3_endpoint)
    return entry, f"extracted {len(entry)} images into the cache {entry.shown}"


def extract_features_cached(
    samples: list[Sample],
    extractor: PatchFeatureExtractor,
    filesystem: Any,
    with_masks: bool,
    cache_dir: str | None,
    progress: bool = False,
    s3_endpoint: str | None = None,
) -> ExtractedSplit:
    """``extract_features`` with a cache (a local folder or ``s3://``) keyed by the samples and the
    extractor's fingerprint (:func:`cache_location`).

    Reruns (another strategy, seed or Tune trial on the same images, another worker on another node)
    then skip the backbone entirely.
    """
    if not cache_dir:
        return extract_features(samples, extractor, filesystem, with_masks, progress=progress)
    entry, origin = cached_entry(samples, extractor, filesystem, with_masks, cache_dir, progress, s3_endpoint)
    result = read_split(entry, [s.sample_id for s in samples], with_masks)
    result.origin = origin
    return result
