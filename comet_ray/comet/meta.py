"""Meta-learning with covariance regularisation: tasks, Reptile, and lambda(Sigma).

Tasks of K images are drawn with probability proportional to their SCL weights, split into support
and query, and a copy of the detector takes ``inner_steps`` steps of the same weighted loss on the
support. ``L_tr`` is the support loss before adaptation and ``L_val`` the query loss after it. Each
epoch contributes ONE pair, (mean L_tr, mean L_val) over its tasks, to a window of the last W epochs;
Sigma is the covariance of that window with each coordinate standardised over the window, so
``det Sigma = 1 - r^2`` (r the correlation of L_tr and L_val over the epochs) lies in [0, 1]. While
the two losses fall together (learning that carries over from support to query) det Sigma is near 0;
when they stop moving together (noise-dominated, collapsed or memorising training) it nears 1. The L2
strength grows with it: ``lambda = lambda0 * (1 + gamma * log(1 + min(det Sigma, C)) / log(1 + C))``,
C = 1 by default. Raw (unstandardised) losses give det Sigma ~ 1e-7..1e-5, which no fixed clip range
turns into a moving lambda. The mean task direction feeds a first-order (Reptile) update
``theta += beta * mean(theta'_m - theta)`` (the authors' release had the sign reversed).

Why the Reptile step is small: an inner Adam step at ``inner_lr`` moves each weight by about
``inner_lr``, as a main-phase step at the detector's own learning rate does, and the task directions
partly cancel, so with the defaults (beta 0.5, 5 inner steps at 1e-4) the Reptile step is worth 1-3
main-phase steps (measured on MVTec bottle, MobileNetV2 features): 2-4 % of an epoch's main-phase
displacement at 4 passes. Its effect on validation AUROC/AUPRO there is positive but within
seed-to-seed noise, and a 10x larger inner learning rate (5-12 main steps) did not improve it
consistently; so the meta phase is above all the probe that feeds lambda(Sigma), with a nudge towards
parameters that adapt well. ``reptile_step`` and ``inner_lr`` are searched by ``comet-ray tune``.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import nn


def sample_tasks(
    weights: torch.Tensor, n_tasks: int, task_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Row indices of ``n_tasks`` tasks, each ``task_size`` distinct rows drawn proportional to weight."""
    probabilities = weights.double().clamp_min(0) + 1e-12
    size = min(task_size, weights.numel())
    return [
        torch.multinomial(probabilities, size, replacement=False, generator=generator) for _ in range(n_tasks)
    ]


def split_task(task: torch.Tensor, query_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_query = min(max(1, round(query_fraction * task.numel())), task.numel() - 1)
    return task[: task.numel() - n_query], task[task.numel() - n_query :]


class CovarianceHistory:
    """A window of per-epoch (L_tr, L_val) pairs from the meta phase and the det Sigma they imply."""

    def __init__(self, window: int = 5) -> None:
        self.pairs: deque[tuple[float, float]] = deque(maxlen=window)

    def append(self, l_tr: float, l_val: float) -> None:
        self.pairs.append((float(l_tr), float(l_val)))

    def determinant(self) -> float:
        """det of the window's covariance with both coordinates standardised: ``1 - r^2`` in [0, 1].

        Fewer than 3 pairs: 0 (two points are always perfectly correlated: no evidence yet). A
        coordinate that does not move over the window (relative spread below 1e-9) has no correlation:
        if both are still, nothing is unstable (0); if only one moves, the other does not follow it (1).
        """
        if len(self.pairs) < 3:
            return 0.0
        data = torch.tensor(list(self.pairs), dtype=torch.float64)  # [W, 2]
        centred = data - data.mean(dim=0)
        spread = centred.pow(2).sum(dim=0).sqrt()
        moving = spread > 1e-9 * data.abs().amax(dim=0).clamp_min(1e-12)
        if not bool(moving.any()):
            return 0.0
        if not bool(moving.all()):
            return 1.0
        r = float((centred[:, 0] * centred[:, 1]).sum() / (spread[0] * spread[1]))
        return min(max(1.0 - r * r, 0.0), 1.0)

    def state(self) -> dict:
        return {"window": self.pairs.maxlen, "pairs": [list(p) for p in self.pairs]}

    def load_state(self, state: dict) -> None:
        self.pairs = deque((tuple(p) for p in state["pairs"]), maxlen=state["window"])


def covariance_lambda(det: float, lambda0: float, gamma: float, det_clip: float = 1.0) -> float:
    """lambda(Sigma) = lambda0 * (1 + gamma * d(Sigma)), d = log(1 + min(det, C)) / log(1 + C) in [0, 1].

    ``det_clip`` is the normaliser C: with standardised pairs det Sigma <= 1, so C = 1 makes d span
    [0, 1]; a smaller C saturates d (lambda = lambda0 * (1 + gamma)) from det Sigma = C on.
    """
    if det_clip <= 0:
        raise ValueError(f"det_clip must be positive, got {det_clip}")
    clipped = min(max(det, 0.0), det_clip)
    d = math.log1p(clipped) / math.log1p(det_clip)
    return lambda0 * (1.0 + gamma * d)


def l2_penalty(parameters: list[nn.Parameter], normalisation: str = "fan_in") -> torch.Tensor:
    """||theta||^2 over ``parameters``; with "fan_in" each tensor's sum is divided by its fan-in."""
    if normalisation not in ("fan_in", "sum"):
        raise ValueError(f"unknown L2 normalisation {normalisation!r}; choose fan_in or sum")
    total = 0.0
    for p in parameters:
        squared = (p.float() ** 2).sum()
        if normalisation == "fan_in" and p.dim() > 1:
            squared = squared / p[0].numel()
        total = total + squared
    return total


@torch.no_grad()
def parameter_vector(module: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector([p for p in module.parameters()]).detach().clone()


@torch.no_grad()
def reptile_step(module: nn.Module, mean_direction: torch.Tensor, step: float) -> None:
    """theta <- theta + step * mean_m(theta'_m - theta), in place."""
    theta = torch.nn.utils.parameters_to_vector(list(module.parameters()))
    torch.nn.utils.vector_to_parameters(theta + step * mean_direction.to(theta), list(module.parameters()))
