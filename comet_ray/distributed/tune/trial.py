"""One Tune trial: the plain core in-process, or a TorchTrainer over Ray Train workers; its per-epoch reports."""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

from comet_ray.config import TrainConfig, apply_overrides
from comet_ray.errors import CometError
from comet_ray.storage import join as join_location

log = logging.getLogger(__name__)
from comet_ray.distributed.tune.space import knob_overrides

# report-split metrics as results.csv names them; F1-max uses the best threshold on the report split itself
TEST_METRICS = {
    f"test_{k}": k
    for k in (
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "f1_at_threshold",
        "precision_at_threshold",
        "recall_at_threshold",
    )
} | {"test_f1_max_oracle": "f1_max"}


def unsupervised_loss(model, store, device) -> float:
    """Mean training loss of every training image under fixed noise: the label-free objective."""
    import torch

    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(store), 32):
        rows = torch.arange(start, min(start + 32, len(store)))
        with torch.no_grad():
            losses = model(store.batch(rows, device), rows + 10_000_019)
        total += float(losses.mean(dim=1).sum())
        count += rows.numel()
    model.train()
    return total / max(count, 1)


def _selection_metrics(metrics: dict, supervised: bool) -> dict:
    """The tie-breakers a trial reports: validation AUPRO (labels: validation objective only), final loss."""
    return {
        "validation_aupro": metrics.get("validation_aupro") if supervised else None,
        "final_loss": metrics.get("final_loss"),
        "split_seed": metrics.get("split_seed"),
    }


def _test_metrics(metrics: dict) -> dict:
    return {column: metrics.get(key) for column, key in TEST_METRICS.items()}


def run_trial(params: dict[str, Any]) -> None:
    """Tune function trainable: one configuration at one contamination level."""
    import torch
    from ray import tune

    context = params["_context"]
    torch.set_num_threads(int(context.get("torch_threads", 1)))
    config = apply_overrides(TrainConfig.from_dict(context["base"]), knob_overrides(params))
    start = time.perf_counter()
    if int(context.get("workers", 0)) > 0:
        _run_distributed_trial(config, context, start)
        return

    from comet_ray.config import resolve_device
    from comet_ray.distributed.worker_logs import say_feature_origin
    from comet_ray.evaluate import validation_auroc
    from comet_ray.pipeline import train_category
    from comet_ray.prepare import prepare_data
    from comet_ray.resume import load_epoch_state, save_epoch_state

    device = resolve_device(config.device)
    data = prepare_data(config, device, cache_dir=context.get("feature_cache"))
    say_feature_origin(data, "trial")
    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state, _ = load_epoch_state(directory)
    supervised = context["objective"] == "validation"

    def on_epoch_end(trainer, log) -> None:
        if supervised:
            value = validation_auroc(
                trainer.model, data.validation, data.validation_labels, device, config.precision
            )
        else:
            value = unsupervised_loss(trainer.model, trainer.store, device)
        metrics = {
            "objective": value,
            "epoch": log.epoch,
            "loss": log.loss,
            "lambda": log.lam,
            "mean_weight": log.mean_weight,
        }
        with tempfile.TemporaryDirectory(prefix="comet-trial-") as tmp:
            save_epoch_state(tmp, trainer.state_dict())
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    result = train_category(config, data, device, on_epoch_end=on_epoch_end, trainer_state=state)
    last = supervised and result.validation_metrics.get("image_auroc")
    objective = last if supervised else unsupervised_loss(result.model, data.train.store, device)
    tune.report(
        {
            "objective": objective,
            "epoch": config.epochs,
            "final": True,
            "seconds": time.perf_counter() - start,
            **_selection_metrics(result.metrics, supervised),
            **_test_metrics(result.metrics),
        }
    )


def _run_distributed_trial(config: TrainConfig, context: dict, start: float) -> None:
    """Build and fit a TorchTrainer inside the trial; its per-epoch reports reach Tune via the callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from comet_ray.distributed.train import fit_distributed

    if context["objective"] != "validation":
        raise CometError("the unsupervised objective runs with --workers 0 (in-process trials)")

    class ObjectiveReportCallback(TuneReportCallback):
        """Rank 0's per-epoch reports as Tune results carrying the ``objective`` that the search, ASHA
        and Tune's strict metric check key on. The workers' final report (``done``) is not forwarded:
        the trial reports the final result below, so a trial still counts epochs + 1 results."""

        def after_report(self, run_context, metrics, checkpoint):
            if not metrics or "done" in metrics[0]:
                return
            first = {**metrics[0], "objective": metrics[0].get("validation_image_auroc")}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    trial = tune.get_context()
    metrics = fit_distributed(
        config,
        workers=int(context["workers"]),
        gpus_per_worker=float(context.get("gpus_per_worker", 0)),
        cpus_per_worker=float(context.get("cpus_per_worker", 0.5)),
        storage_path=context["storage_path"],
        run_name=f"{trial.get_experiment_name()}-{trial.get_trial_id()}-train",
        feature_cache=context.get("feature_cache"),
        out=join_location(
            context["storage_path"], trial.get_experiment_name(), trial.get_trial_id(), "output"
        ),
        callbacks=[ObjectiveReportCallback()],
    )
    tune.report(
        {
            "objective": metrics.get("validation_image_auroc"),
            "epoch": config.epochs,
            "final": True,
            "seconds": time.perf_counter() - start,
            **_selection_metrics(metrics, True),
            **_test_metrics(metrics),
        }
    )
