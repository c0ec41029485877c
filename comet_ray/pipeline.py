"""One category end to end, without Ray: samples -> contamination -> splits -> features -> CoMet -> metrics.

``prepare_data`` does everything that does not depend on the detector (and is shared by every
strategy, seed and Tune trial on the same images); ``train_category`` trains and evaluates one
configuration; ``write_run`` puts the results in ``--out`` all at once, so a failed run leaves nothing
half-written there.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from comet_ray.comet.bank_confidence import fit_confident_bank
from comet_ray.comet.collective import Collective
from comet_ray.comet.trainer import CometTrainer, EpochLog, EpochReporter
from comet_ray.config import TrainConfig, check_strategy
from comet_ray.data.contamination import inject_contamination
from comet_ray.data.layout import NOMINAL, CategoryScan, Sample, open_dataset_filesystem, scan_category
from comet_ray.data.s3 import public_s3_uri
from comet_ray.data.splits import validation_split
from comet_ray.errors import CometError, DatasetLayoutError
from comet_ray.evaluate import evaluate_split, score_patches, split_labels
from comet_ray.features.entry import FeatureEntry
from comet_ray.features.extractor import (
    ExtractedSplit,
    PatchFeatureExtractor,
    cached_entry,
    open_entry,
    read_split,
)
from comet_ray.features.store import place_store
from comet_ray.metrics import f1_at_threshold, f1_max
from comet_ray.models import build_detector
from comet_ray.models.protocol import Detector

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


@dataclass
class RunResult:
    metrics: dict
    validation_metrics: dict
    epochs: list[EpochLog]
    model: Detector
    threshold: float
    nominal_score: float
    final_weights: dict[str, float]
    pixel_threshold: float | None = None
    report_scores: list[float] = field(default_factory=list)
    # For ``comet-ray audit``: every epoch's SCL weights [epochs, N] and the final model's SCL score of
    # each training image [N], both in the training store's id order.
    weight_history: torch.Tensor | None = None
    train_scores: list[float] = field(default_factory=list)
    train_score_description: str | None = None  # what train_scores are, when not the final model's SCL score


def decision_threshold(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(F1-optimal threshold, median nominal score) on the validation split, for predict's decisions."""
    nominal = scores[~labels]
    median = float(nominal.median()) if nominal.numel() else float(scores.median())
    if labels.any() and (~labels).any():
        return float(f1_max(scores, labels)[1]), median
    return float(scores.max()), median


def pixel_threshold(
    model, split: ExtractedSplit, image_size: int, device, precision: str, patch: torch.Tensor | None = None
) -> float | None:
    """F1-optimal pixel threshold on the validation split's masks (for region outlines), if it has any.

    ``patch``: the split's patch scores if already computed (the validation evaluation has them).
    """
    from comet_ray.evaluate import score_patches
    from comet_ray.models.anomaly_map import anomaly_maps

    if split.masks is None or not bool(split.mask_available.any()):
        return None
    keep = split.mask_available
    masks = split.masks[keep]
    if not bool(masks.any()) or bool(masks.all()):
        return None
    if patch is None:
        patch = score_patches(model, split.store, device, precision=precision)
    maps = anomaly_maps(patch[keep.to(patch.device)], split.store.grid, image_size)
    return float(f1_max(maps.flatten(), masks.to(maps.device).flatten())[1])


def train_category(
    config: TrainConfig,
    data: PreparedData,
    device: torch.device,
    collective: Collective | None = None,
    on_epoch_end: EpochReporter | None = None,
    trainer_state: dict | None = None,
    evaluate: bool = True,
) -> RunResult:
    """Train one detector with one strategy and evaluate it once on the report split.

    ``evaluate=False`` skips the metrics (empty metrics, NaN thresholds): data-parallel ranks other than 0
    hold the same model and their results are never written; they still score their shards of the
    evaluation splits for the one that evaluates.
    """
    check_strategy(config.model.model, config.comet.strategy)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    bank_scl = config.model.model == "knn" and config.comet.uses_scl
    model = build_detector(
        config.model.model, data.feature_dim, config.model, data.grid, data.train.store, fit_bank=not bank_scl
    )
    bank_metrics: dict = {}
    if getattr(model, "trainable", True):
        store = place_store(data.train.store, device)
        trainer = CometTrainer(model, store, config, device, collective, data.injected_ids)
        if trainer_state is not None:
            trainer.load_state_dict(trainer_state)
        epochs = trainer.fit(config.epochs, on_epoch_end)
        final_weights = dict(zip(data.train.store.ids, trainer.sample_weights.tolist()))
        # The audit ranks the training images by the final model's score: one more pass of the scoring SCL
        # uses every epoch (every rank joins it when distributed: it gathers across workers).
        train_scores = trainer.score_training_set()[0].tolist()
        audit_record = {"weight_history": trainer.weight_history_tensor(), "train_scores": train_scores}
    else:  # training-free (knn): no epochs; with scl, SCL's fence on leave-one-out scores chooses the bank's images
        epochs = []
        final_weights = dict.fromkeys(data.train.store.ids, 1.0)
        audit_record = {}
        if bank_scl:
            generator = torch.Generator().manual_seed(int(torch.randint(1 << 62, (1,))))
            bank = fit_confident_bank(model, data.train.store, config.comet, generator)
            final_weights = dict(zip(data.train.store.ids, bank.weights.tolist()))
            audit_record = bank.audit_record()
            bank_metrics = bank.metrics(data.train.store.ids, data.injected_ids)
        elif collective is not None and collective.world_size > 1:
            # Data-parallel: each worker chose the coreset of its own shard (bank_fraction of its patches);
            # their union is the bank (the merge of a composable coreset), the same on every worker.
            model.set_bank(collective.all_gather_cat(model.bank))
            bank_metrics["bank_shards"] = collective.world_size
        bank_metrics["bank_rows"] = int(model.bank.shape[0])
        model = model.to(device)
    train_seconds = time.perf_counter() - start
    size = config.features.image_size
    precision = config.precision
    # Every worker scores its shard of each evaluation split (and joins the gathers); one computes the metrics.
    validation_patch = score_patches(model, data.validation.store, device, precision, collective)
    report_patch = score_patches(model, data.report.store, device, precision, collective)
    if not evaluate:
        return RunResult({}, {}, epochs, model, float("nan"), float("nan"), final_weights, **audit_record)
    validation = evaluate_split(
        model,
        data.validation,
        data.validation_labels,
        size,
        device,
        precision=precision,
        patch=validation_patch,
    )
    report = evaluate_split(
        model, data.report, data.report_labels, size, device, precision=precision, patch=report_patch
    )
    threshold, nominal = decision_threshold(validation.image_scores, validation.labels)
    pixel_cut = pixel_threshold(model, data.validation, size, device, precision, validation.patch_scores)
    contamination = data.manifest["contamination"]
    metrics = {
        "image_auroc": report.metrics.get("image_auroc"),
        "pixel_auroc": report.metrics.get("pixel_auroc", float("nan")),
        "aupro": report.metrics.get("aupro", float("nan")),
        "f1_max": report.metrics.get("f1_max"),
        **dict(
            zip(
                ("f1_at_threshold", "precision_at_threshold", "recall_at_threshold"),
                f1_at_threshold(report.image_scores, report.labels, threshold),
            )
        ),
        "validation_image_auroc": validation.metrics.get("image_auroc"),
        "validation_aupro": validation.metrics.get("aupro", float("nan")),
        "final_loss": epochs[-1].loss if epochs else float("nan"),
        "strategy": config.comet.strategy if getattr(model, "trainable", True) or bank_scl else "none",
        "model": config.model.model,
        "category": config.category,
        "contamination": config.contamination,
        "achieved_contamination": contamination["achieved_ratio"],
        "seed": config.seed,
        "split_seed": config.data_seed,
        "n_train": len(data.train.store),
        "n_test": report.metrics["n_images"],
        "n_validation": validation.metrics["n_images"],
        "n_skipped": len(data.skipped),
        "epochs": config.epochs,
        "train_seconds": train_seconds,
        "device": str(device),
    }
    if epochs:
        last = epochs[-1]
        metrics["mean_weight_injected"] = last.mean_weight_injected
        metrics["mean_weight_nominal"] = last.mean_weight_nominal
    metrics.update(bank_metrics)
    return RunResult(
        metrics,
        validation.metrics,
        epochs,
        model,
        threshold,
        nominal,
        final_weights,
        pixel_cut,
        report.image_scores.tolist(),
        **audit_record,
    )
