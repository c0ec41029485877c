"""The detector protocol: the only surface the CoMet strategy, evaluation and Ray layers talk to.

A detector maps cached patch features [B, P, D] to per-patch training losses and per-patch anomaly
scores. CoMet needs nothing else: SCL weights the per-sample (or per-patch) losses, meta-learning
adapts copies of the parameters, and lambda(Sigma) regularises ``regularised_parameters``. SimpleNet
and the normalizing flow both implement it, so neither the strategy nor Ray knows which one it trains.

Every detector is also a ``torch.nn.Module`` (eval/train modes, parameters, state dicts); every signature
that takes or returns one says ``Detector``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Detector(Protocol):
    name: str

    def patch_losses(self, features: torch.Tensor, sample_seeds: torch.Tensor) -> torch.Tensor:
        """Training loss of every patch, [B, P]. ``sample_seeds`` [B] makes any randomness a function of
        the sample, not of its batch position or worker, so sharded training equals single-process."""
        ...

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Anomaly score of every patch, [B, P]; higher means more anomalous. Eval mode, no randomness."""
        ...

    def regularised_parameters(self, include_norm_and_bias: bool = False) -> list[nn.Parameter]:
        """Parameters that the lambda(Sigma) L2 term covers (weight matrices by default)."""
        ...

    def make_optimizers(self, lr_scale: float = 1.0) -> list[torch.optim.Optimizer]:
        """The model's own optimisers with its paper defaults."""
        ...

    def hparams(self) -> dict:
        """Constructor arguments, stored in checkpoints so the model can be rebuilt without its config."""
        ...


def weight_matrices(module: nn.Module, include_norm_and_bias: bool = False) -> list[nn.Parameter]:
    """Weights of Linear/Conv layers (the L2 target); optionally BatchNorm and bias parameters too."""
    if include_norm_and_bias:
        return [p for p in module.parameters() if p.requires_grad]
    chosen = []
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)) and layer.weight.requires_grad:
            chosen.append(layer.weight)
    return chosen


def seeded_normal(shape: tuple[int, ...], sample_seeds: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Standard normal noise [B, *shape], each row drawn from its own seed (batch- and worker-independent)."""
    rows = []
    for seed in sample_seeds.tolist():
        generator = torch.Generator(device=device).manual_seed(int(seed))
        rows.append(torch.randn(shape, generator=generator, device=device))
    return torch.stack(rows) if rows else torch.zeros((0, *shape), device=device)
