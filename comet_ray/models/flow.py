"""A normalizing-flow detector over cached patch features (the method page's base model B).

Choice: a FastFlow/CFlow-style flow that treats every patch vector as one sample. The cached
features are already spatially aggregated (each patch sees its 3x3 neighbourhood at two scales), so
a per-patch flow needs no convolutions: it is a stack of affine coupling blocks over the D channels
of one patch, its weights shared by all P = h*w grid positions. Like CFlow, each coupling's
conditioner also receives a 2-D sinusoidal encoding of the patch's (row, column) on the grid,
concatenated to its input, so the density can differ by position (a bottle's rim and its centre
look different) without one flow per position. DifferNet's whole-image flow would only give image
scores; a per-patch flow gives the patch scores (and hence pixel maps) every detector here must give.

One coupling block, on x of width D, split into a passive part x1 (first D//2 channels) and an
active part x2 (the rest)::

    s, t = subnet([x1, pos]).chunk(2)          subnet = Linear -> ReLU -> Linear (last one zero-init)
    s    = clamp * tanh(s / clamp)             soft clamp: |s| < clamp, so exp(s) never over/underflows
    y    = [x1, x2 * exp(s) + t]               log|det J| = sum(s)

followed by a fixed random channel permutation (seeded by the block index and kept as a buffer,
so a checkpoint carries it), which moves different channels into the active half for the next
block. The zero-initialised last layer makes every block the identity at the start. Couplings run in
float32 even under bf16 autocast (the subnet's Linear layers may run in bf16; its output is cast to
float32 before the exponent), so the log-determinant is accumulated in float32.

Loss and score, per patch, with z = f(x)::

    NLL(x) = (0.5 * ||z||^2 - log|det df/dx|) / D

i.e. the negative log-likelihood under a standard normal base in nats per channel, *without* the
constant 0.5 * log(2 pi). Dividing by D keeps the loss O(1) whatever the feature width (like
SimpleNet's hinge loss), so CoMet's lambda(Sigma) * ||W||^2 and its inner learning rate mean the
same for both detectors. ``patch_losses`` is this NLL (``sample_seeds`` is unused: the flow has no
randomness); ``patch_scores`` is the same NLL in eval mode (higher = less likely = more anomalous).

Degenerate inputs: all-equal features (a blank image, a saturated region) have unbounded likelihood
under an unclamped flow, which drives log-scales to -inf and the loss to NaN. The soft clamp bounds
the log-determinant, so the NLL is bounded below by ``-clamp * blocks * ceil(D/2) / D`` and stays
finite; tests train on constant features to check it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from comet_ray.models.protocol import weight_matrices


def positional_encoding_2d(height: int, width: int, channels: int) -> torch.Tensor:
    """Sinusoidal encoding of every grid position, [height*width, channels] (row-major, like the patches).

    Half the channels encode the row and half the column, each as sin/cos pairs at geometric
    frequencies (Vaswani et al.; CFlow's positional condition).
    """
    if channels <= 0:
        return torch.zeros(height * width, 0)
    if channels % 4:
        raise ValueError(f"positional encoding width must be a multiple of 4, got {channels}")
    quarter = channels // 4
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float32) / quarter)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.float()[:, None] * frequencies[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [n, channels/2]

    rows = encode(torch.arange(height)).repeat_interleave(width, dim=0)
    cols = encode(torch.arange(width)).repeat(height, 1)
    return torch.cat([rows, cols], dim=1)


class AffineCoupling(nn.Module):
    """Conditional affine coupling: the first D//2 channels and the condition set the rest's scale, shift."""

    def __init__(self, dim: int, cond_dim: int, hidden: int, clamp: float) -> None:
        super().__init__()
        if clamp <= 0:
            raise ValueError(f"clamp must be positive, got {clamp}")
        self.split = dim // 2
        self.active = dim - self.split
        self.clamp = float(clamp)
        self.subnet = nn.Sequential(
            nn.Linear(self.split + cond_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2 * self.active),
        )
        nn.init.zeros_(self.subnet[-1].weight)
        nn.init.zeros_(self.subnet[-1].bias)

    def _log_scale_shift(
        self, passive: torch.Tensor, cond: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if cond is not None:  # [..., C] broadcast over the leading dims (e.g. [P, C] against [B, P, D/2])
            cond = cond.to(passive.dtype).expand(*passive.shape[:-1], cond.shape[-1])
            passive = torch.cat([passive, cond], dim=-1)
        raw = self.subnet(passive).float()  # bf16 under autocast -> float32 for exp and the log-det
        log_scale, shift = raw.chunk(2, dim=-1)
        return self.clamp * torch.tanh(log_scale / self.clamp), shift

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (y [..., D] float32, log|det dy/dx| [...] float32); cond [..., C] broadcasts."""
        x = x.float()
        passive, active = x[..., : self.split], x[..., self.split :]
        log_scale, shift = self._log_scale_shift(passive, cond)
        y = torch.cat([passive, active * torch.exp(log_scale) + shift], dim=-1)
        return y, log_scale.sum(dim=-1)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y = y.float()
        passive, active = y[..., : self.split], y[..., self.split :]
        log_scale, shift = self._log_scale_shift(passive, cond)
        return torch.cat([passive, (active - shift) * torch.exp(-log_scale)], dim=-1)


class FlowBlock(nn.Module):
    """A coupling followed by a fixed channel permutation (log-det 0)."""

    def __init__(self, dim: int, cond_dim: int, hidden: int, clamp: float, seed: int) -> None:
        super().__init__()
        self.coupling = AffineCoupling(dim, cond_dim, hidden, clamp)
        permutation = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y, log_det = self.coupling(x, cond)
        return y[..., self.permutation], log_det

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.coupling.inverse(y[..., self.inverse_permutation], cond)


class PatchFlow(nn.Module):
    """Normalizing-flow detector: per-patch conditional affine couplings, score = per-patch NLL."""

    name = "flow"

    def __init__(
        self,
        feature_dim: int,
        grid: list[int] | tuple[int, int] | None = None,
        blocks: int = 4,
        hidden: int = 512,
        clamp: float = 2.0,
        lr: float = 2e-4,
        pos_dim: int = 32,
    ) -> None:
        super().__init__()
        if feature_dim < 2:
            raise ValueError(f"a coupling flow needs at least 2 feature channels, got {feature_dim}")
        if blocks < 1:
            raise ValueError(f"the flow needs at least one block, got {blocks}")
        if pos_dim < 0 or pos_dim % 4:
            raise ValueError(f"pos_dim must be a non-negative multiple of 4, got {pos_dim}")
        grid_list = None if grid is None else [int(grid[0]), int(grid[1])]
        self._hparams = dict(
            feature_dim=int(feature_dim),
            grid=grid_list,
            blocks=int(blocks),
            hidden=int(hidden),
            clamp=float(clamp),
            lr=float(lr),
            pos_dim=int(pos_dim),
        )
        self.feature_dim = int(feature_dim)
        self.grid = None if grid_list is None else tuple(grid_list)
        self.pos_dim = int(pos_dim)
        self.blocks = nn.ModuleList(
            FlowBlock(self.feature_dim, self.pos_dim, int(hidden), float(clamp), seed=index)
            for index in range(blocks)
        )
        self._encodings: dict[tuple[int, str], torch.Tensor] = {}

    def hparams(self) -> dict:
        return dict(self._hparams)

    # ------------------------------------------------------------------ the flow
    def _grid_for(self, num_patches: int) -> tuple[int, int]:
        if self.grid is not None:
            # Not while tracing for export: the patch count is then a traced value (the checkpoint fixes it).
            if not torch.jit.is_tracing() and self.grid[0] * self.grid[1] != num_patches:
                raise ValueError(f"features have {num_patches} patches but the flow's grid is {self.grid}")
            return self.grid
        side = math.isqrt(num_patches)
        return (side, side) if side * side == num_patches else (1, num_patches)

    def _condition(self, num_patches: int, device: torch.device) -> torch.Tensor | None:
        """Positional encoding of each patch [P, pos_dim] (None when pos_dim is 0)."""
        if self.pos_dim == 0:
            return None
        key = (num_patches, str(device))
        if key not in self._encodings:
            encoding = positional_encoding_2d(*self._grid_for(num_patches), self.pos_dim)
            self._encodings[key] = encoding.to(device)
        return self._encodings[key]

    def transform(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, P, D] -> (z [B, P, D] float32, log|det dz/dx| [B, P] float32)."""
        cond = self._condition(features.shape[1], features.device)  # [P, C], broadcast over the batch
        z = features.float()
        log_det: torch.Tensor | float = 0.0  # no zeros(B, P): a traced export keeps its batch dimension free
        for block in self.blocks:
            z, block_log_det = block(z, cond)
            log_det = log_det + block_log_det
        return z, log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, P, D] -> x [B, P, D]: the exact inverse of ``transform``."""
        cond = self._condition(z.shape[1], z.device)
        x = z.float()
        for block in reversed(self.blocks):
            x = block.inverse(x, cond)
        return x

    def nll(self, features: torch.Tensor) -> torch.Tensor:
        """Per-patch NLL in nats per channel, constant 0.5*log(2*pi) dropped: [B, P] float32."""
        z, log_det = self.transform(features)
        return (0.5 * z.pow(2).sum(dim=-1) - log_det) / self.feature_dim

    # ------------------------------------------------------------------ the detector protocol
    def patch_losses(self, features: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.nll(features)

    def forward(self, features: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> torch.Tensor:
        """Per-patch losses; the training step goes through ``forward`` so DDP can hook it."""
        return self.patch_losses(features, sample_seeds)

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.nll(features)

    def regularised_parameters(self, include_norm_and_bias: bool = False) -> list[nn.Parameter]:
        return weight_matrices(self, include_norm_and_bias)

    def make_optimizers(self, lr_scale: float = 1.0) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.parameters(), lr=self._hparams["lr"] * lr_scale)]
