"""A category's data before any detector: its samples, the contamination draw, the splits and the
features (``prepare_data``), shared by every strategy, seed and Tune trial on the same images; and
what one of N data-parallel workers would hold of them."""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from comet_ray.comet.collective import Collective
from comet_ray.config import TrainConfig
from comet_ray.data.contamination import inject_contamination
from comet_ray.data.layout import NOMINAL, CategoryScan, Sample, open_dataset_filesystem, scan_category
from comet_ray.data.s3 import public_s3_uri
from comet_ray.data.splits import validation_split
from comet_ray.errors import CometError, DatasetLayoutError
from comet_ray.evaluate import split_labels
from comet_ray.features.entry import FeatureEntry
from comet_ray.features.extractor import (
    ExtractedSplit,
    PatchFeatureExtractor,
    cached_entry,
    open_entry,
    read_split,
)

log = logging.getLogger(__name__)


def subset_split(source: ExtractedSplit, ids: list[str]) -> ExtractedSplit:
    """The rows of ``source`` for ``ids`` (ids skipped at decode time are dropped)."""
    known = set(source.store.ids)
    present = [i for i in ids if i in known]
    rows = source.store.rows(present)
    result = ExtractedSplit(source.store.subset(present))
    if source.masks is not None:
        result.masks = source.masks.index_select(0, rows)
        result.mask_available = source.mask_available.index_select(0, rows)
    wanted = set(ids)
    result.skipped = [s for s in source.skipped if s["sample_id"] in wanted]
    result.mask_issues = [s for s in source.mask_issues if s["sample_id"] in wanted]
    return result


@dataclass
class PreparedData:
    """Everything a training run needs that does not depend on the detector or the strategy."""

    train: ExtractedSplit
    validation: ExtractedSplit
    report: ExtractedSplit
    validation_labels: torch.Tensor
    report_labels: torch.Tensor
    injected_ids: set[str]
    manifest: dict
    feature_info: dict
    feature_dim: int
    grid: tuple[int, int]
    skipped: list[dict] = field(default_factory=list)
    mask_issues: list[dict] = field(default_factory=list)
    feature_origin: str = ""  # where the features came from, when a cache was used (ExtractedSplit.origin)

    @property
    def feature_bytes(self) -> int:
        """Bytes of the features this process holds (its shards, when data-parallel)."""
        return sum(split.store.nbytes for split in (self.train, self.validation, self.report))


def select_samples(
    samples: list[Sample], config: TrainConfig
) -> tuple[list[Sample], list[Sample], list[Sample], dict]:
    """Contamination injection and the validation split: (train, validation, report, manifest)."""
    manifest: dict = {
        "data_root": public_s3_uri(config.data_root),
        "category": config.category,
        "seed": config.seed,
        "split_seed": config.data_seed,
        "validation_fraction": config.validation_fraction,
    }
    if config.contamination > 0:
        samples, contamination = inject_contamination(samples, config.contamination, config.data_seed)
        manifest["contamination"] = contamination.to_dict()
    else:
        manifest["contamination"] = {"requested_ratio": 0.0, "achieved_ratio": 0.0, "n_moved": 0, "moved": []}
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    validation, report = validation_split(test, config.validation_fraction, config.data_seed)
    manifest["n_train"] = len(train)
    manifest["validation_ids"] = [s.sample_id for s in validation]
    manifest["report_ids"] = [s.sample_id for s in report]
    return train, validation, report, manifest


def check_trainable(config: TrainConfig, filesystem=None, s3_endpoint: str | None = None) -> CategoryScan:
    """List the category and refuse, with one line, a layout no training can use.

    Cheap (a listing, no decoding), so drivers call it before starting Ray workers: a user error
    found inside a worker would be retried as if it were a crash and reported with a traceback.
    """
    if filesystem is None:
        filesystem, _ = open_dataset_filesystem(config.data_root, s3_endpoint)
    scan = scan_category(config.data_root, config.category, filesystem)
    where = f"category {config.category!r} under {public_s3_uri(config.data_root)}"
    if not any(s.split == "test" for s in scan.samples):
        raise DatasetLayoutError(
            f"{where} has no test/ images: training needs a labelled test split for the validation "
            "threshold and the final metrics"
        )
    if not any(s.split == "test" and s.defect == NOMINAL for s in scan.samples):
        raise DatasetLayoutError(
            f"{where} has no good test images (test/good/): training needs some to set the decision "
            "threshold and to measure image AUROC"
        )
    return scan


def category_samples(
    config: TrainConfig, filesystem=None, s3_endpoint: str | None = None
) -> tuple[CategoryScan, list[Sample]]:
    """The category's listing and every image of it in the order its features are stored (by sample id):
    one extraction for the whole category (train + test, masks included), shared by every
    contamination level, seed and strategy; the split only decides which rows go where."""
    scan = check_trainable(config, filesystem, s3_endpoint)
    return scan, sorted(scan.samples, key=lambda s: s.sample_id)


def feature_entry(
    config: TrainConfig,
    cache_dir: str,
    device: torch.device | str = "cpu",
    s3_endpoint: str | None = None,
    engine: str = "local",
    progress: bool = False,
    samples: list[Sample] | None = None,
) -> tuple[FeatureEntry, str]:
    """The category's cache entry in ``cache_dir``, extracted when there is none (in this process, or
    with ``engine="ray"`` by the Ray Data pipeline over every node); and where the features came from."""
    filesystem, _ = open_dataset_filesystem(config.data_root, s3_endpoint)
    if samples is None:
        samples = category_samples(config, filesystem)[1]
    extractor = PatchFeatureExtractor(config.features, device)
    if engine == "ray":
        from comet_ray.features.streaming import extract_to_entry_streaming

        return extract_to_entry_streaming(
            samples, extractor, s3_endpoint, True, cache_dir, progress=progress, data_root=config.data_root
        )
    return cached_entry(samples, extractor, filesystem, True, cache_dir, progress, s3_endpoint)


def worker_feature_bytes(config: TrainConfig, scan: CategoryScan, entry: FeatureEntry, workers: int) -> int:
    """The most feature bytes one of ``workers`` data-parallel workers holds: the largest shard of each split."""
    held = 0
    for split in select_samples(scan.samples, config)[:3]:
        present = sum(entry.contains(s.sample_id) for s in split)
        held += -(-present // workers)
    return held * entry.row_bytes


@contextmanager
def _category_entry(config, samples, device, cache_dir, features, progress, s3_endpoint, engine):
    """(entry, origin) of the category's features: ``features`` (an entry's location) as it is, the cache
    entry in ``cache_dir``, or without a cache a temporary entry on local disk, removed afterwards."""
    if features:
        entry = open_entry(features, s3_endpoint)
        if entry is None:
            raise CometError(f"no complete feature cache entry at {public_s3_uri(features)}")
        yield entry, ""
        return
    if cache_dir:
        entry, origin = feature_entry(config, cache_dir, device, s3_endpoint, engine, progress, samples)
        yield entry, origin
        return
    with tempfile.TemporaryDirectory(prefix="comet-features-") as tmp:
        entry, _ = feature_entry(config, tmp, device, s3_endpoint, engine, progress, samples)
        yield entry, ""


def prepare_data(
    config: TrainConfig,
    device: torch.device,
    cache_dir: str | None = None,
    progress: bool = False,
    s3_endpoint: str | None = None,
    engine: str = "local",
    features: str | None = None,
    collective: Collective | None = None,
) -> PreparedData:
    """Sample table, contamination, splits and the category's features (in-process, or with
    ``engine="ray"`` through a Ray Data pipeline with a backbone actor pool).

    The features go to a cache entry (``cache_dir``, else a temporary one) and every split reads its
    own rows from there, so the category is never in memory twice. ``features``: the location of the
    category's complete entry (a data-parallel worker's, extracted by its driver). ``collective``: hold
    only this worker's shard of every split (:meth:`Collective.shard_rows`); ids, labels and masks stay
    those of the whole split.
    """
    filesystem, _ = open_dataset_filesystem(config.data_root, s3_endpoint)
    scan, every = category_samples(config, filesystem)
    samples = scan.samples
    train, validation, report, manifest = select_samples(samples, config)
    sharded = collective is not None and collective.world_size > 1

    def split(entry, ids: list[str], with_masks: bool) -> ExtractedSplit:
        held = collective.shard_rows(sum(entry.contains(i) for i in ids)) if sharded else None
        return read_split(entry, ids, with_masks, held)

    with _category_entry(config, every, device, cache_dir, features, progress, s3_endpoint, engine) as (
        entry,
        origin,
    ):
        train_x = split(entry, [s.sample_id for s in train], False)
        validation_x = split(entry, [s.sample_id for s in validation], True)
        report_x = split(entry, [s.sample_id for s in report], True)
    if len(train_x.store) == 0:
        raise DatasetLayoutError(f"no readable training images in category {config.category!r}")
    if features:
        held = sum(x.store.held_rows().numel() for x in (train_x, validation_x, report_x))
        shard = f" (shard {collective.rank + 1} of {collective.world_size})" if sharded else ""
        origin = f"read {held} images{shard} from the cache {entry.shown}"
    anomalous = {s.sample_id for s in samples if s.split == "test" and s.is_anomalous}
    skipped = scan.unlisted + entry.skipped  # left out at listing time, then at decode time
    manifest["skipped"] = skipped
    manifest["mask_issues"] = entry.mask_issues
    manifest["features"] = entry.fingerprint
    return PreparedData(
        train=train_x,
        validation=validation_x,
        report=report_x,
        validation_labels=split_labels(validation_x, anomalous),
        report_labels=split_labels(report_x, anomalous),
        injected_ids={s.sample_id for s in train if s.injected},
        manifest=manifest,
        feature_info=entry.fingerprint,
        feature_dim=entry.feature_dim,
        grid=entry.grid,
        skipped=skipped,
        mask_issues=entry.mask_issues,
        feature_origin=origin,
    )
