"""Ray Tune sweeps of the SCL and regularisation knobs, one contamination level at a time.

Contamination is an experimental condition: each level gets its own seeded Optuna search with ASHA
early stopping on the per-epoch objective. The objective is image AUROC on the validation split
(carved from test, disjoint from the reported images) or, with ``objective="unsupervised"``, the
detector's own loss on the training images (no labels anywhere). Each trial evaluates its final model
once on the report split so ``results.csv`` can show it, but :func:`select_best` sees only the
validation and training columns (:data:`SELECTION_COLUMNS`): test numbers never choose anything.

A fair comparison, per level: the baseline is tuned first over the base-detector knobs of the space
(``--trials`` trials), then CoMet over its own knobs (``--trials`` trials) on top of the base knobs
chosen for the baseline, so both rows share the same base detector. Every trial and every repeat uses
one split (contamination draw and validation split, ``split_seed``); repeats vary only the training
seed, so no image that selection saw is ever reported on.

A trial runs the plain core in-process (``workers=0``) or builds and fits a ``TorchTrainer`` over
``workers`` Ray Train workers (the Ray 2.60 pattern: Train V2 forbids ``Tuner(trainer)``), with the
workers' per-epoch reports forwarded to Tune by ``TuneReportCallback``.

On a cluster the driver runs on a worker node (``comet-ray submit``'s default): the trials, the one task that fills
the feature cache before them and the seed repeats after them are Ray work with the trials'
resources (GPUs when the cluster has or can autoscale GPU nodes), placed wherever those are.
Concurrency is ``--max-concurrent-trials`` or what the cluster can hold at its largest. Tune's
storage (default ``OUT/.ray``) and the feature cache under it must be shared by the nodes
(``s3://`` on a cluster of several nodes); an ``s3://`` ``--out`` receives the results once the
sweep is complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from comet_ray import atomic, jsonfile
from comet_ray.config import ModelConfig, TrainConfig, apply_overrides
from comet_ray.errors import CometError
from comet_ray.storage import check_location, is_remote, require_shared, staged
from comet_ray.storage import join as join_location

log = logging.getLogger(__name__)
DEFAULT_SPACE = Path(__file__).with_name("search_space.yaml")
# Knobs of the detector itself (ModelConfig), as opposed to CoMet's: the baseline searches these only.
BASE_DETECTOR_KNOBS = {f.name for f in dataclasses.fields(ModelConfig)} - {"model"}
STRATEGIES = ("baseline", "comet")
# Everything select_best compares, best first: the objective, then (validation objective only) the
# validation AUPRO, then the final training loss. None of them is computed on a reported image.
SELECTION_COLUMNS = ("objective", "validation_aupro", "final_loss")
RESULT_COLUMNS = [
    "level",
    "strategy",
    "trial_id",
    "objective",
    "validation_aupro",
    "final_loss",
    "split_seed",
    "epochs_run",
    "test_image_auroc",
    "test_pixel_auroc",
    "test_aupro",
    "test_f1_at_threshold",
    "test_precision_at_threshold",
    "test_recall_at_threshold",
    "test_f1_max_oracle",
    "seconds",
]
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


# --------------------------------------------------------------------------- search space
def load_search_space(
    path: str | os.PathLike | None = None, objective: str = "validation"
) -> dict[str, dict]:
    """The editable YAML search space; base-detector knobs are dropped for the unsupervised objective,
    whose loss scale they change (a lower loss would not mean a better detector)."""
    path = Path(path) if path else DEFAULT_SPACE
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CometError(f"cannot read search space {path}: {exc}") from None
    probe = TrainConfig()
    for knob, dist in spec.items():
        if knob != "l2":
            try:
                apply_overrides(probe, {knob: None})
            except KeyError:
                raise CometError(f"search space {path}: {knob!r} is not a comet-ray knob") from None
        if (
            not isinstance(dist, dict)
            or len(dist) != 1
            or next(iter(dist)) not in ("uniform", "loguniform", "randint", "choice")
        ):
            raise CometError(f"search space {path}: {knob!r} needs one of uniform/loguniform/randint/choice")
    if objective == "unsupervised":
        spec = {k: v for k, v in spec.items() if k not in BASE_DETECTOR_KNOBS}
    return spec


def split_space(spec: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(base-detector knobs, CoMet knobs) of a search space: the baseline searches the first only."""
    base = {k: v for k, v in spec.items() if k in BASE_DETECTOR_KNOBS}
    return base, {k: v for k, v in spec.items() if k not in BASE_DETECTOR_KNOBS}


def param_space(spec: dict[str, dict]) -> dict[str, Any]:
    from ray import tune

    space = {}
    for knob, dist in spec.items():
        ((kind, args),) = dist.items()
        if kind == "uniform":
            space[knob] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "loguniform":
            space[knob] = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "randint":
            space[knob] = tune.randint(int(args[0]), int(args[1]) + 1)
        else:
            space[knob] = tune.choice(list(args))
    return space


def knob_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Trial parameters -> config overrides (``l2: off`` means lambda0 = 0)."""
    overrides = {k: v for k, v in params.items() if not k.startswith("_") and k != "l2"}
    if params.get("l2") == "off":
        overrides["lambda0"] = 0.0
    for key, value in list(overrides.items()):
        if hasattr(value, "item"):  # numpy scalars from the searcher
            overrides[key] = value.item()
    return overrides


# --------------------------------------------------------------------------- the trial
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
    from comet_ray.distributed.train import say_feature_origin
    from comet_ray.evaluate import validation_auroc
    from comet_ray.pipeline import prepare_data, train_category
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


# --------------------------------------------------------------------------- selection (no test labels)
def _number(value: Any) -> float | None:
    """A finite float from a result cell (CSV text, None, NaN and '' are missing)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def selection_key(view: dict, objective: str = "validation") -> tuple | None:
    """Larger is better: the objective, then validation AUPRO (validation objective only), then a lower
    final training loss; None for a trial that did not finish. ``view`` holds SELECTION_COLUMNS only.

    A saturated objective (every trial at AUROC 1.0 on an easy category) still separates trials.
    """
    value = _number(view.get("objective"))
    if value is None:
        return None
    loss = _number(view.get("final_loss"))
    loss_key = -loss if loss is not None else -math.inf
    if objective != "validation":
        return (-value, loss_key)
    aupro = _number(view.get("validation_aupro"))
    return (value, aupro if aupro is not None else -math.inf, loss_key)


def select_best(
    rows: list[dict], objective: str = "validation", strategy: str = "comet"
) -> dict[float, dict]:
    """Best finished trial of ``strategy`` per level by :func:`selection_key`; the first of equals wins.

    Each row is cut down to its SELECTION_COLUMNS before it is compared: no test column can reach the
    choice. Rows without a strategy (results of older sweeps) are CoMet trials.
    """
    best: dict[float, tuple[tuple, dict]] = {}
    for row in rows:
        if (row.get("strategy") or "comet") != strategy:
            continue
        key = selection_key({column: row.get(column) for column in SELECTION_COLUMNS}, objective)
        if key is None:
            continue
        level = float(row["level"])
        if level not in best or key > best[level][0]:
            best[level] = (key, row)
    return {level: row for level, (_, row) in best.items()}


def chosen_knobs(row: dict | None) -> dict[str, Any]:
    """The knobs a result row was trained with (``knob_*`` columns), as trial parameters."""
    return {
        k.removeprefix("knob_"): v
        for k, v in (row or {}).items()
        if k.startswith("knob_") and v not in (None, "")
    }  # "": a column of the other strategy's knobs


# --------------------------------------------------------------------------- the sweep
@dataclasses.dataclass
class SweepSettings:
    levels: list[float]
    trials: int = 32
    objective: str = "validation"
    space_file: str | None = None
    storage_path: str = "tune-runs"
    out: str = "tune-results"
    search_seed: int = 0
    seeds: int = 1
    workers: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int | None = None
    grace_period: int = 2
    feature_cache: str | None = None


def _max_concurrent(settings: SweepSettings) -> int:
    from comet_ray.distributed.resources import cluster_capacity

    if settings.max_concurrent_trials:
        return settings.max_concurrent_trials
    resources = cluster_capacity()  # autoscaling node types not started yet included
    cpus = resources.get("CPU", 1.0)
    per_trial = settings.cpus_per_trial + settings.workers * settings.cpus_per_worker
    limit = max(1, int(cpus // max(per_trial, 1e-3)))
    gpu_need = settings.gpus_per_trial + settings.workers * settings.gpus_per_worker
    if gpu_need > 0:
        limit = min(limit, max(1, int(resources.get("GPU", 0) // gpu_need)))
    return limit


def _experiment_name(config: TrainConfig, level: float) -> str:
    strategy = "" if config.comet.strategy == "comet" else f"-{config.comet.strategy}"
    return f"tune-{config.category}-{config.model.model}{strategy}-rho{level:g}"


def level_config(
    base: TrainConfig,
    level: float,
    strategy: str,
    knobs: dict[str, Any] | None = None,
    seed: int | None = None,
) -> TrainConfig:
    """``base`` at one contamination level with one strategy and chosen knobs, on the sweep's split.

    The split seed is pinned to ``base``'s (``split_seed``, else ``seed``) whatever the training
    ``seed``: every trial and every repeat of a level sees the same training, validation and report
    images, so a configuration is never reported on images it was selected on.
    """
    config = dataclasses.replace(
        base, contamination=level, split_seed=base.data_seed, seed=base.seed if seed is None else seed
    )
    config = apply_overrides(config, knob_overrides(knobs or {}))
    config.comet = dataclasses.replace(config.comet, strategy=strategy)
    return config


def _restorable(path: str) -> bool:
    """Whether the Tune experiment at ``path`` can be resumed; clears one that cannot be.

    ``Tuner.can_restore`` only looks for ``tuner.pkl``, which the ``Tuner`` writes when it is built,
    before its first experiment-state snapshot. A driver killed in between leaves a folder that
    ``Tuner.restore`` accepts but cannot resume: Ray 2.60 then logs "Failed to restore the run state",
    "restarts" the experiment and, since ``num_samples`` is passed to fresh runs only, runs ONE
    trial instead of ``--trials``. Nothing in such a folder was ever recorded, so its contents
    (``tuner.pkl``, folders of trials that had just started) are removed and the level starts over.
    A newest snapshot that is not valid JSON (a kill during its upload) would end the same way, so
    it stops the sweep with the file to remove instead.
    """
    import fnmatch

    import pyarrow.fs
    from ray.train._internal.storage import get_fs_and_path

    fs, fs_path = get_fs_and_path(path)
    if fs.get_file_info(fs_path).type != pyarrow.fs.FileType.Directory:
        return False
    names = [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(fs_path))]
    if "tuner.pkl" not in names:
        return False
    states = sorted(fnmatch.filter(names, "experiment_state-*.json"))
    if not states:
        fs.delete_dir_contents(fs_path)
        return False
    newest = f"{path.rstrip('/')}/{states[-1]}"
    try:
        with fs.open_input_stream(f"{fs_path.rstrip('/')}/{states[-1]}") as handle:
            json.loads(handle.readall())
    except (OSError, ValueError):
        raise CometError(
            f"the Tune experiment state {newest} is unreadable (cut off by a kill?); "
            "remove that file to resume from the previous one"
        ) from None
    return True


def _state_api_available() -> bool:
    """Whether Ray's state API answers (it is served by the dashboard: not with include_dashboard=False)."""
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    try:
        list_actors(limit=1, timeout=10, raise_on_missing_output=False)
    except (RayStateApiException, ConnectionError):
        return False
    return True


def _scheduler(settings: SweepSettings, epochs: int):
    """ASHA early stopping, except for Ray Train trials on a Ray without the state API: FIFO.

    Stopping a trial kills the Train controller it owns. Ray Train then relies on a detached
    PlacementGroupCleaner that asks the state API whether the controller is alive; without the
    dashboard it cannot tell, so the run's placement group (its workers' CPUs) stays reserved until
    the driver exits and the cleaner process lives on: bench/soak.py measured 0.5 CPU and ~190 MiB per
    early-stopped trial (on two CPUs, two stopped trials leave no room for the next trial's worker).
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.workers > 0 and not _state_api_available():
        log.warning(
            "Ray's state API (dashboard) is not available: trials with Ray Train workers run "
            "without ASHA early stopping, whose stopped trials would leak their placement groups"
        )
        return FIFOScheduler()
    return ASHAScheduler(max_t=epochs + 1, grace_period=min(settings.grace_period, epochs))


def tune_level(
    base: TrainConfig,
    level: float,
    settings: SweepSettings,
    strategy: str = "comet",
    spec: dict[str, dict] | None = None,
    fixed: dict[str, Any] | None = None,
) -> list[dict]:
    """One Optuna + ASHA search of ``spec`` (default: the settings' space) for ``strategy`` at one
    contamination level, with ``fixed`` knobs (the baseline's chosen base knobs) in every trial."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    config = level_config(base, level, strategy, fixed)
    if spec is None:
        spec = load_search_space(settings.space_file, settings.objective)
    metric, mode = ("objective", "max") if settings.objective == "validation" else ("objective", "min")
    storage = check_location(settings.storage_path, "--storage-path")
    context = {
        "base": config.to_dict(),
        "objective": settings.objective,
        "workers": settings.workers,
        "cpus_per_worker": settings.cpus_per_worker,
        "gpus_per_worker": settings.gpus_per_worker,
        "feature_cache": settings.feature_cache,
        "storage_path": storage,
    }
    space = {**param_space(spec), "_context": context}
    trainable = tune.with_resources(
        run_trial, {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    )
    name = _experiment_name(config, level)
    path = os.path.join(storage, name)
    if _restorable(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=space)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=settings.trials,
                search_alg=OptunaSearch(seed=settings.search_seed),
                scheduler=_scheduler(settings, config.epochs),
                max_concurrent_trials=_max_concurrent(settings),
                trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
        )
    grid = tuner.fit()
    rows = []
    for result in grid:
        if result.config is None:
            continue
        metrics = result.metrics or {}
        knobs = {k: v for k, v in result.config.items() if not k.startswith("_")}
        finished = bool(metrics.get("final"))  # Ray sets its own "done" on every last result
        row = {
            "level": level,
            "strategy": strategy,
            "trial_id": metrics.get("trial_id", ""),
            "objective": metrics.get("objective") if finished else None,
            **{k: metrics.get(k) for k in ("validation_aupro", "final_loss")},
            "split_seed": config.data_seed,  # every trial of a level, stopped early or not, uses this split
            "epochs_run": metrics.get("training_iteration"),
            "seconds": metrics.get("seconds", metrics.get("time_total_s")),
            **{k: metrics.get(k) for k in TEST_METRICS},
            **{f"knob_{k}": v for k, v in {**(fixed or {}), **knobs}.items()},
        }
        if not finished:
            row["stopped_early_objective"] = metrics.get("objective")
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(RESULT_COLUMNS)
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    atomic.write_csv(path, columns, rows)


def repeat_configs(base: TrainConfig, level: float, knobs: dict[str, dict], seeds: int) -> list[TrainConfig]:
    """Baseline and CoMet at one level with their chosen ``knobs[strategy]``, on training seeds
    ``base.seed .. base.seed + seeds - 1``, all on the split the knobs were chosen on."""
    return [
        level_config(base, level, strategy, knobs.get(strategy), seed=base.seed + k)
        for k in range(seeds)
        for strategy in STRATEGIES
    ]


def check_reported_split(selection: dict, manifest: dict) -> None:
    """Refuse a repeat that would train or report on an image the configuration was selected on."""
    seen = set(selection["validation_ids"])
    used = set(manifest["report_ids"]) | {m["sample_id"] for m in manifest["contamination"].get("moved", [])}
    if seen & used or manifest["validation_ids"] != selection["validation_ids"]:
        raise CometError(
            f"a repeat's split differs from the one its configuration was selected on "
            f"({len(seen & used)} validation image(s) reused): split seeds must match"
        )


def _training_resources(settings: SweepSettings) -> dict[str, float]:
    """What one training process of the sweep reserves: a trial's, or (``workers`` > 0) a Train worker's."""
    if settings.workers > 0:
        return {"num_cpus": settings.cpus_per_worker, "num_gpus": settings.gpus_per_worker}
    return {"num_cpus": settings.cpus_per_trial, "num_gpus": settings.gpus_per_trial}


def _train_once(config_dict: dict, feature_cache: str | None, threads: int) -> tuple[dict, dict]:
    """One training run as Ray work (a repeat, on whichever node has a trial's resources): its metrics
    and its manifest (which images it trained and reported on)."""
    import torch

    from comet_ray.config import resolve_device
    from comet_ray.distributed.train import say_feature_origin
    from comet_ray.pipeline import prepare_data, train_category

    torch.set_num_threads(threads)
    config = TrainConfig.from_dict(config_dict)
    device = resolve_device(config.device)
    data = prepare_data(config, device, cache_dir=feature_cache)
    say_feature_origin(data, "repeat")
    return train_category(config, data, device).metrics, data.manifest


def _extract(config_dict: dict, feature_cache: str) -> None:
    from comet_ray.config import resolve_device
    from comet_ray.pipeline import feature_entry

    config = TrainConfig.from_dict(config_dict)
    _, origin = feature_entry(config, feature_cache, resolve_device(config.device))
    print(f"[cache fill] features: {origin}", flush=True)


def _extract_once(base: TrainConfig, settings: SweepSettings) -> None:
    """Fill the shared feature cache with one Ray task before any trial starts: the trials and repeats
    (every contamination level and seed embeds the same images) then all read it, on any node."""
    import ray

    task = ray.remote(_extract).options(**_training_resources(settings))
    ray.get(task.remote(base.to_dict(), settings.feature_cache))


def repeat_over_seeds(
    base: TrainConfig, best: dict[str, dict[float, dict]], settings: SweepSettings, out: Path | None = None
) -> list[dict]:
    """Baseline and the best CoMet configuration of every level, trained on ``settings.seeds`` training
    seeds; each repeat's manifest goes to ``out/rho_<level>/repeats/`` when ``out`` is given.

    Each run is a Ray task with a trial's resources, so the repeats run side by side on the cluster's
    workers (never in the driver, which on a cluster sits on the head). The driver checks every
    repeat's manifest against the split its configuration was selected on.
    """
    import ray

    resources = _training_resources(settings)
    run = ray.remote(_train_once).options(**resources)
    threads = max(1, int(resources["num_cpus"]))
    configs, selections, pending = [], [], []
    for level in sorted(best["comet"]):
        knobs = {strategy: chosen_knobs(best[strategy].get(level)) for strategy in STRATEGIES}
        level_configs = repeat_configs(base, level, knobs, settings.seeds)
        selection = selection_split(level_configs[0])
        for config in level_configs:
            configs.append(config)
            selections.append(selection)
            pending.append(run.remote(config.to_dict(), settings.feature_cache, threads))
    rows = []
    for config, selection, (metrics, manifest) in zip(configs, selections, ray.get(pending)):
        check_reported_split(selection, manifest)
        if out is not None:
            folder = out / f"rho_{config.contamination:g}" / "repeats"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{config.comet.strategy}-seed{config.seed}.manifest.json"
            jsonfile.write(folder / name, manifest, indent=2)
        rows.append(
            {
                "level": config.contamination,
                "seed": config.seed,
                "split_seed": config.data_seed,
                "strategy": config.comet.strategy,
                **_test_metrics(metrics),
            }
        )
    return rows


def selection_split(config: TrainConfig) -> dict:
    """The split every trial of ``config``'s level trains and is selected on (a listing, no decoding)."""
    from comet_ray.pipeline import check_trainable, select_samples

    _, _, _, manifest = select_samples(check_trainable(config).samples, config)
    return {
        "split_seed": config.data_seed,
        "validation_ids": manifest["validation_ids"],
        "report_ids": manifest["report_ids"],
        "moved": manifest["contamination"].get("moved", []),
    }


def plot_contamination(rows: list[dict], path: Path) -> None:
    """Test image AUROC and AUPRO vs contamination, baseline vs best CoMet, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for axis, key, title in zip(axes, ("test_image_auroc", "test_aupro"), ("image AUROC", "AUPRO@0.3")):
        for strategy, colour in (("baseline", "tab:gray"), ("comet", "tab:blue")):
            levels = sorted({r["level"] for r in rows if r["strategy"] == strategy})
            means, stds = [], []
            for level in levels:
                values = [
                    r[key]
                    for r in rows
                    if r["strategy"] == strategy
                    and r["level"] == level
                    and r[key] is not None
                    and not math.isnan(r[key])
                ]
                means.append(statistics.mean(values) if values else float("nan"))
                stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            xs = [100 * level for level in levels]
            axis.errorbar(
                xs,
                means,
                yerr=stds,
                marker="o",
                capsize=3,
                color=colour,
                label="CoMet (best config)" if strategy == "comet" else "baseline",
            )
        axis.set_xlabel("training-set contamination (%)")
        axis.set_title(f"test {title}")
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune_strategies(base: TrainConfig, level: float, settings: SweepSettings) -> list[dict]:
    """The baseline's search over the base-detector knobs, then CoMet's over its own knobs with the
    baseline's chosen base knobs fixed: ``settings.trials`` trials each. A space without base knobs
    (or the unsupervised objective, which drops them) leaves the baseline on the given defaults."""
    base_spec, comet_spec = split_space(load_search_space(settings.space_file, settings.objective))
    new: list[dict] = []
    fixed: dict[str, Any] = {}
    if base_spec:
        new.extend(tune_level(base, level, settings, "baseline", base_spec))
        fixed = chosen_knobs(select_best(new, settings.objective, "baseline").get(level))
    new.extend(tune_level(base, level, settings, "comet", comet_spec, fixed))
    return new


def sweep(base: TrainConfig, settings: SweepSettings) -> dict:
    """Tune every level (baseline, then CoMet), pick the best of each per level on validation, repeat, plot."""
    if is_remote(settings.out):  # put together locally, uploaded once the sweep is complete
        with staged(check_location(settings.out, "--out"), last=("summary.json",)) as local:
            return sweep(base, dataclasses.replace(settings, out=str(local)))
    from comet_ray.distributed.resources import cluster_nodes

    storage_path = check_location(settings.storage_path, "--storage-path")
    require_shared(storage_path, "--storage-path", cluster_nodes())  # before any trial starts
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    if settings.feature_cache is None:
        settings.feature_cache = join_location(storage_path, "feature_cache")
    _extract_once(base, settings)
    rows: list[dict] = []
    for level in settings.levels:
        rows.extend(tune_strategies(base, level, settings))
        _write_csv(out / "results.csv", rows)  # after every level: an interrupted sweep keeps its rows
    best = {strategy: select_best(rows, settings.objective, strategy) for strategy in STRATEGIES}
    for level in settings.levels:
        level_dir = out / f"rho_{level:g}"
        level_dir.mkdir(exist_ok=True)
        split = selection_split(level_config(base, level, "comet"))
        jsonfile.write(level_dir / "selection_split.json", split, indent=2)
        for strategy, name in (("comet", "best.json"), ("baseline", "best_baseline.json")):
            if level in best[strategy]:
                jsonfile.write(level_dir / name, best[strategy][level], indent=2, default=str)
    summary: dict[str, Any] = {
        "best": {f"{k:g}": v for k, v in best["comet"].items()},
        "best_baseline": {f"{k:g}": v for k, v in best["baseline"].items()},
    }
    if settings.seeds > 0 and best["comet"]:
        repeats = repeat_over_seeds(base, best, settings, out)
        _write_csv(out / "seeds.csv", repeats)
        plot_contamination(repeats, out / "contamination.png")
        summary["repeats"] = repeats
    jsonfile.write(out / "summary.json", summary, indent=2, default=str)
    return summary


# --------------------------------------------------------------------------- command line
