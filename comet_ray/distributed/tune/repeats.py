"""Seed repeats of the chosen configurations, and the one task that fills the feature cache first."""

from __future__ import annotations

import logging
from pathlib import Path

from comet_ray import jsonfile
from comet_ray.config import TrainConfig

log = logging.getLogger(__name__)
from comet_ray.distributed.tune.selection import check_reported_split, chosen_knobs, selection_split
from comet_ray.distributed.tune.settings import SweepSettings, _training_resources, level_config
from comet_ray.distributed.tune.space import STRATEGIES
from comet_ray.distributed.tune.trial import _test_metrics


def repeat_configs(base: TrainConfig, level: float, knobs: dict[str, dict], seeds: int) -> list[TrainConfig]:
    """Baseline and CoMet at one level with their chosen ``knobs[strategy]``, on training seeds
    ``base.seed .. base.seed + seeds - 1``, all on the split the knobs were chosen on."""
    return [
        level_config(base, level, strategy, knobs.get(strategy), seed=base.seed + k)
        for k in range(seeds)
        for strategy in STRATEGIES
    ]


def _train_once(config_dict: dict, feature_cache: str | None, threads: int) -> tuple[dict, dict]:
    """One training run as Ray work (a repeat, on whichever node has a trial's resources): its metrics
    and its manifest (which images it trained and reported on)."""
    import torch

    from comet_ray.config import resolve_device
    from comet_ray.distributed.worker_logs import say_feature_origin
    from comet_ray.pipeline import train_category
    from comet_ray.prepare import prepare_data

    torch.set_num_threads(threads)
    config = TrainConfig.from_dict(config_dict)
    device = resolve_device(config.device)
    data = prepare_data(config, device, cache_dir=feature_cache)
    say_feature_origin(data, "repeat")
    return train_category(config, data, device).metrics, data.manifest


def _extract(config_dict: dict, feature_cache: str) -> None:
    from comet_ray.config import resolve_device
    from comet_ray.prepare import feature_entry

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
