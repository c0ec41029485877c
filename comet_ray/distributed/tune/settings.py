"""A sweep's settings, the resources its trials take, and the config of one level."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from comet_ray.config import TrainConfig, apply_overrides
from comet_ray.distributed.tune.space import knob_overrides

log = logging.getLogger(__name__)


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


def _training_resources(settings: SweepSettings) -> dict[str, float]:
    """What one training process of the sweep reserves: a trial's, or (``workers`` > 0) a Train worker's."""
    if settings.workers > 0:
        return {"num_cpus": settings.cpus_per_worker, "num_gpus": settings.gpus_per_worker}
    return {"num_cpus": settings.cpus_per_trial, "num_gpus": settings.gpus_per_trial}


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
