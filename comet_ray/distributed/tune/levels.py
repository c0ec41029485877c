"""The sweep: per contamination level, the baseline's search, then CoMet's on its base knobs; results.csv."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from comet_ray import atomic, jsonfile
from comet_ray.config import TrainConfig
from comet_ray.storage import check_location, is_remote, require_shared, staged
from comet_ray.storage import join as join_location

log = logging.getLogger(__name__)
from comet_ray.distributed.tune.plot import plot_contamination
from comet_ray.distributed.tune.ray_compat import _restorable, _scheduler
from comet_ray.distributed.tune.repeats import _extract_once, repeat_over_seeds
from comet_ray.distributed.tune.selection import chosen_knobs, select_best, selection_split
from comet_ray.distributed.tune.settings import SweepSettings, _max_concurrent, level_config
from comet_ray.distributed.tune.space import (
    STRATEGIES,
    load_search_space,
    param_space,
    split_space,
)
from comet_ray.distributed.tune.trial import TEST_METRICS, run_trial

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


def _experiment_name(config: TrainConfig, level: float) -> str:
    strategy = "" if config.comet.strategy == "comet" else f"-{config.comet.strategy}"
    return f"tune-{config.category}-{config.model.model}{strategy}-rho{level:g}"


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
