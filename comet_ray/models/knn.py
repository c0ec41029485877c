"""A training-free reference detector: distance to the nearest nominal patch (PatchCore-style).

PatchCore (Roth et al., CVPR 2022) keeps a memory bank of the training images' patch features and
scores a patch by its Euclidean distance to the nearest bank entry; the image score is the largest
patch score and the pixel map is the patch grid upsampled and blurred, exactly as for the other
detectors here (``anomaly_map``). It reads the same cached features as SimpleNet and the flow, so it
is the reference a user would pick instead: nothing is trained, there are no epochs, and the CoMet
strategies (which reweight a gradient-descent loss) do not apply to it.

The bank is a coreset of the training patches, ``bank_fraction`` of them:
- ``greedy``: PatchCore's greedy k-center selection, run on a fixed random projection of the
  features to ``projection_dim`` dimensions (the projection only picks the entries; the bank holds the
  full features). It covers rare nominal patches that a random draw would miss.
- ``random``: a seeded uniform draw; much cheaper on a CPU, a little weaker on fine structure.

``leave_one_out_scores`` scores every training image against the bank entries of the *other*
training images: the anomaly score of a training image that the model never saw, which SCL can use
as a confidence signal that does not trust a model on its own training images.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from comet_ray.errors import CometError

CORESETS = ("greedy", "random")


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).sum(dim=-1)


def nearest_distances(
    queries: torch.Tensor, bank: torch.Tensor, exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk: int = 2048,
) -> torch.Tensor:
    """Euclidean distance from every query row [Q, D] to its nearest bank row [M, D], in float32 chunks.

    ``exclude = (query_groups [Q], bank_groups [M])``: a bank row of the query's own group is never its
    neighbour (leave-one-image-out).
    """
    queries = queries.float()
    bank = bank.float()
    bank_norms = _squared_norms(bank)
    out = []
    for start in range(0, queries.shape[0], chunk):
        block = queries[start : start + chunk]
        squared = _squared_norms(block)[:, None] - 2.0 * block @ bank.T + bank_norms[None, :]
        if exclude is not None:
            same = exclude[0][start : start + chunk, None] == exclude[1][None, :]
            squared = squared.masked_fill(same, float("inf"))
        out.append(squared.min(dim=1).values.clamp_min(0).sqrt())
    return torch.cat(out) if out else torch.zeros(0)


def coreset_rows(
    patches: torch.Tensor, size: int, method: str, generator: torch.Generator, projection_dim: int = 32
) -> torch.Tensor:
    """Row indices of a ``size``-row coreset of ``patches`` [N, D]."""
    n = patches.shape[0]
    size = max(1, min(size, n))
    if method not in CORESETS:
        raise CometError(f"unknown coreset {method!r}; choose one of {', '.join(CORESETS)}")
    if method == "random" or size == n:
        return torch.randperm(n, generator=generator)[:size].sort().values
    dim = patches.shape[1]
    if projection_dim and projection_dim < dim:
        projection = torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)
        points = patches.float() @ projection
    else:
        points = patches.float()
    norms = _squared_norms(points)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    # Greedy k-center: always add the point farthest from everything chosen so far.
    nearest = (norms - 2.0 * points @ points[chosen[0]] + norms[chosen[0]]).clamp_min(0)
    for i in range(1, size):
        chosen[i] = int(nearest.argmax())
        distance = (norms - 2.0 * points @ points[chosen[i]] + norms[chosen[i]]).clamp_min(0)
        nearest = torch.minimum(nearest, distance)
    return chosen


class PatchKNN(nn.Module):
    """Nearest-neighbour patch distance to a memory bank of training patches; not trained."""

    name = "knn"
    trainable = False  # no gradient descent: no epochs, no optimisers, no CoMet strategy

    def __init__(
        self,
        feature_dim: int,
        bank_size: int = 0,
        bank_fraction: float = 0.1,
        coreset: str = "greedy",
        projection_dim: int = 32,
    ) -> None:
        super().__init__()
        if not 0.0 < bank_fraction <= 1.0:
            raise CometError(f"knn_bank_fraction must be in (0, 1], got {bank_fraction}")
        if coreset not in CORESETS:
            raise CometError(f"unknown coreset {coreset!r}; choose one of {', '.join(CORESETS)}")
        self._hparams = dict(
            feature_dim=int(feature_dim),
            bank_size=int(bank_size),
            bank_fraction=float(bank_fraction),
            coreset=coreset,
            projection_dim=int(projection_dim),
        )
        self.register_buffer("bank", torch.zeros(int(bank_size), int(feature_dim)))

    def hparams(self) -> dict:
        return dict(self._hparams)

    def bank_size_for(self, n_patches: int) -> int:
        return max(1, round(self._hparams["bank_fraction"] * n_patches))

    def select(self, patches: torch.Tensor, generator: torch.Generator, size: int | None = None) -> torch.Tensor:
        """Coreset row indices of ``patches`` [N, D] with this model's settings (``size`` rows: default
        ``bank_fraction`` of them)."""
        hp = self._hparams
        size = self.bank_size_for(patches.shape[0]) if size is None else size
        return coreset_rows(patches, size, hp["coreset"], generator, hp["projection_dim"])

    @torch.no_grad()
    def fit(self, features: torch.Tensor, generator: torch.Generator | None = None,
            size: int | None = None) -> PatchKNN:
        """Fill the bank from training patch features [N, P, D] (or [N*P, D]); ``size``: as in ``select``."""
        generator = generator or torch.Generator().manual_seed(0)
        patches = features.reshape(-1, features.shape[-1]).float()
        self.bank = patches[self.select(patches, generator, size)].clone()
        self._hparams["bank_size"] = int(self.bank.shape[0])
        return self

    # ------------------------------------------------------------------ the detector protocol
    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        if self.bank.shape[0] == 0:
            raise CometError("the knn memory bank is empty: fit it on training features first")
        batch, patches, dim = features.shape
        flat = features.reshape(-1, dim)
        if torch.jit.is_tracing():  # export: one block, so the traced graph keeps its batch size free
            return self._traced_distances(flat).reshape(batch, patches)
        return nearest_distances(flat, self.bank).reshape(batch, patches)

    def _traced_distances(self, flat: torch.Tensor) -> torch.Tensor:
        bank = self.bank.float()
        flat = flat.float()
        squared = _squared_norms(flat)[:, None] - 2.0 * flat @ bank.T + _squared_norms(bank)[None, :]
        return squared.min(dim=1).values.clamp_min(0).sqrt()

    def patch_losses(self, features: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> torch.Tensor:
        raise CometError("the knn reference is training-free: it has no training loss")

    def forward(self, features: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.patch_scores(features)

    def regularised_parameters(self, include_norm_and_bias: bool = False) -> list[nn.Parameter]:
        return []

    def make_optimizers(self, lr_scale: float = 1.0) -> list[torch.optim.Optimizer]:
        return []


@torch.no_grad()
def leave_one_out_scores(model: PatchKNN, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Patch scores [N, P] of every training image against a bank built from all N images' patches,
    never matching a patch to a bank entry of its own image."""
    n, p, dim = features.shape
    patches = features.reshape(-1, dim).float()
    rows = model.select(patches, generator)
    owners = torch.arange(n).repeat_interleave(p)
    return nearest_distances(patches, patches[rows], exclude=(owners, owners[rows])).reshape(n, p)
