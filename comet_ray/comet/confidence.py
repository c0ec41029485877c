"""Soft Confident Learning: weights that fall off beyond an outlier fence on this epoch's scores.

Samples the current model finds least nominal are probably the anomalies hiding in an uncurated
training set; they keep a weight below 1 rather than being dropped, so a wrong guess costs little.
Weights are monotone non-increasing in the score and exactly 1 at or below the fence. Unlike the
authors' release, the fence is recomputed every epoch from the current model (never from an untrained
one), the hyperbolic form is shift-invariant (no assumption that scores are positive), and weights are
indexed by sample, never by batch position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_FORMS = ("hyperbolic", "exponential", "hard")


@dataclass(frozen=True)
class Fence:
    tau: float
    q1: float
    q3: float
    minimum: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def outlier_fence(scores: torch.Tensor, fence_k: float = 1.5) -> Fence:
    """Tukey's upper fence ``tau = Q3 + k * (Q3 - Q1)`` over all scores (all workers' when distributed)."""
    scores = scores.detach().double().flatten()
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=scores.dtype, device=scores.device))
    tau = q3 + fence_k * (q3 - q1)
    return Fence(float(tau), float(q1), float(q3), float(scores.min()))


def confidence_weights(
    scores: torch.Tensor,
    fence_k: float = 1.5,
    form: str = "hyperbolic",
    temperature_scale: float = 1.0,
    floor: float = 0.0,
) -> tuple[torch.Tensor, Fence]:
    """Per-sample (or per-patch) weights in [floor, 1] from anomaly scores; returns them and the fence."""
    if form not in WEIGHT_FORMS:
        raise ValueError(f"unknown weight form {form!r}; choose one of {', '.join(WEIGHT_FORMS)}")
    fence = outlier_fence(scores, fence_k)
    s = scores.detach().double()
    above = s > fence.tau
    eps = 1e-12
    if form == "hyperbolic":
        # (tau - m) / (s - m): 1 at the fence, -> 0 as s grows; m = min score makes it sign-free.
        w = (fence.tau - fence.minimum) / (s - fence.minimum).clamp_min(eps)
    elif form == "exponential":
        temperature = max(temperature_scale * fence.iqr, eps)
        w = torch.exp(-(s - fence.tau) / temperature)
    else:
        w = torch.zeros_like(s)
    w = torch.where(above, w.clamp(0.0, 1.0), torch.ones_like(s))
    w = w.clamp_min(floor)
    return w.float(), fence


def weight_histogram(weights: torch.Tensor, bins: int = 10) -> list[int]:
    """Counts of weights in ``bins`` equal bins over [0, 1], for per-epoch logs and reports."""
    return torch.histc(weights.float().cpu(), bins=bins, min=0.0, max=1.0).long().tolist()
