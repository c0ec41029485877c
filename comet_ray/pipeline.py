"""One category end to end, without Ray: samples -> contamination -> splits -> features -> CoMet -> metrics.

``prepare_data`` (:mod:`comet_ray.prepare`) does everything that does not depend on the detector (and is
shared by every strategy, seed and Tune trial on the same images); ``train_category`` trains and evaluates one
configuration; ``write_run`` puts the results in ``--out`` all at once, so a failed run leaves nothing
half-written there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from comet_ray.comet.bank_confidence import fit_confident_bank
from comet_ray.comet.collective import Collective
from comet_ray.comet.trainer import CometTrainer, EpochLog, EpochReporter
from comet_ray.config import TrainConfig, check_strategy
from comet_ray.evaluate import evaluate_split, score_patches
from comet_ray.features.extractor import (
    ExtractedSplit,
)
from comet_ray.features.store import place_store
from comet_ray.metrics import f1_at_threshold, f1_max
from comet_ray.models import build_detector
from comet_ray.models.protocol import Detector

log = logging.getLogger(__name__)
from comet_ray.prepare import PreparedData


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
