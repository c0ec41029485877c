"""The training schedule around the epoch loop: a floor in optimizer steps, the experiment-only oracle
weights, and BatchNorm statistics re-estimated with the final model.

Features are cached, so a head step is cheap; what a small category lacks at a fixed epoch count is
steps (60 images at batch 8 make 7 steps a pass, a 600-image set 75). ``min_steps`` keeps the epoch
count (SCL re-weights and the meta phase run once per epoch, as the method says) and raises the passes
per epoch until the run's main-phase steps reach the floor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from comet_ray.comet.collective import Collective
from comet_ray.config import TrainConfig
from comet_ray.errors import CometError


def passes_per_epoch(passes: int, min_steps: int, epochs: int, steps_per_pass: int) -> int:
    """``passes``, raised so that ``epochs * passes * steps_per_pass >= min_steps`` (no floor when 0)."""
    if min_steps < 0:
        raise CometError(f"min_steps must be 0 or more, got {min_steps}")
    if min_steps == 0 or epochs <= 0 or steps_per_pass <= 0:
        return passes
    return max(passes, math.ceil(min_steps / (epochs * steps_per_pass)))


def check_experiment_knobs(config: TrainConfig) -> None:
    """Refuse, in one line, a knob that needs something the run does not have."""
    if config.comet.oracle_weights and config.contamination <= 0:
        raise CometError(
            "oracle_weights=true weighs the injected images 0: it needs --contamination > 0 "
            "(an experiment that knows which training images are anomalies)"
        )


def oracle_weights(injected: torch.Tensor) -> torch.Tensor:
    """0 for every injected training image, 1 for the rest: what a perfect SCL ranking and fence would give."""
    return (~injected).float()


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def recalibrate_batchnorm(
    module: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    collective: Collective | None = None,
) -> bool:
    """Replace every BatchNorm's running statistics by their exact average over ``batches`` of
    (features, sample seeds) fed through ``module``'s training forward (the same true and synthetic
    patches training normalised), averaged over workers when distributed. False: nothing to recalibrate."""
    norms = batch_norms(module)
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    was_training = module.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches, not an exponential one
    module.train()
    for features, seeds in batches:
        module(features, seeds)
    module.train(was_training)
    collective = collective or Collective()
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
        if collective.world_size > 1:
            for stat in (norm.running_mean, norm.running_var):
                stat.copy_(collective.all_reduce_sum(stat.clone()) / collective.world_size)
    return True
