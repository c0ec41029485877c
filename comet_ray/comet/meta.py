"""Meta-learning with covariance regularisation: tasks, Reptile, and lambda(Sigma).

Tasks of K images are drawn with probability proportional to their SCL weights, split into support
and query, and a copy of the detector takes ``inner_steps`` steps of the same weighted loss on the
support. ``L_tr`` is the support loss before adaptation and ``L_val`` the query loss after it. The
covariance of a window of (L_tr, L_val) pairs measures how unstable learning is, and the L2 strength
grows with it: ``lambda = lambda0 * (1 + gamma * log(1 + clip(det Sigma, 1e-6, C)) / log(1 + C))``.
The mean task direction feeds a first-order (Reptile) update ``theta += beta * mean(theta'_m - theta)``
(the authors' release had the sign reversed and a step too small to matter).
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
    return [torch.multinomial(probabilities, size, replacement=False, generator=generator) for _ in range(n_tasks)]


def split_task(task: torch.Tensor, query_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_query = min(max(1, round(query_fraction * task.numel())), task.numel() - 1)
    return task[: task.numel() - n_query], task[task.numel() - n_query :]


class CovarianceHistory:
    """A window of (L_tr, L_val) pairs from the meta phase and the lambda(Sigma) they imply."""

    def __init__(self, window: int = 5) -> None:
        self.pairs: deque[tuple[float, float]] = deque(maxlen=window)

    def extend(self, pairs: list[tuple[float, float]]) -> None:
        self.pairs.extend(pairs)

    def determinant(self) -> float:
        if len(self.pairs) < 2:
            return 0.0
        data = torch.tensor(list(self.pairs), dtype=torch.float64).T  # [2, W]
        return float(torch.linalg.det(torch.cov(data)))

    def state(self) -> dict:
        return {"window": self.pairs.maxlen, "pairs": [list(p) for p in self.pairs]}

    def load_state(self, state: dict) -> None:
        self.pairs = deque((tuple(p) for p in state["pairs"]), maxlen=state["window"])


def covariance_lambda(det: float, lambda0: float, gamma: float, det_clip: float) -> float:
    """lambda(Sigma) = lambda0 * (1 + gamma * d(Sigma)), d in [0, 1] a squashed log-determinant."""
    clipped = min(max(det, 1e-6), det_clip)
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
