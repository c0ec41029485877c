"""A training-free reference detector: distance to the nearest nominal patch (PatchCore-style).

PatchCore (Roth et al., CVPR 2022) keeps a memory bank of the training images' patch features and
scores a patch by its Euclidean distance to the nearest bank entry; the image score is the largest
patch score and the pixel map is the patch grid upsampled and blurred, exactly as for the other
detectors here (``anomaly_map``). It reads the same cached features as SimpleNet and the flow, so it
is the reference a user would pick instead: nothing is trained, there are no epochs, and the CoMet
strategies (which reweight a gradient-descent loss) do not apply to it.

The bank is a coreset of the training patches, ``bank_fraction`` of them (:mod:`comet_ray.models.coreset`):
- ``auto`` (default): ``exact`` where it costs at most ``EXACT_BUDGET`` distances (small categories:
  ELPV's 100 cells), else ``fast``.
- ``fast``: PatchCore's greedy k-center within random parts of the patches, their selections merged
  into the bank; seconds where the exact one takes hours, never all patches in float32.
- ``exact``: PatchCore's greedy k-center over every patch (``greedy``, its earlier name, still loads).
  Both select on a fixed random projection to ``projection_dim`` dimensions (the bank holds the full
  features); they cover rare nominal patches that a random draw would miss.
- ``random``: a seeded uniform draw.

The search (:mod:`comet_ray.models.search`) is faiss's exact flat index on the CPU by default
(``search``: ``hnsw`` or ``ivf`` for approximate ones), chunked torch matmul when the bank is on a GPU.

``leave_one_out_scores`` scores every training image against the bank entries of the *other*
training images: the anomaly score of a training image that the model never saw, which SCL can use
as a confidence signal that does not trust a model on its own training images.
"""

from __future__ import annotations

import torch
from torch import nn

from comet_ray.errors import CometError
from comet_ray.models.coreset import CORESETS, coreset_rows
from comet_ray.models.search import (
    SEARCHES,
    _squared_norms,
    build_index,
    nearest,
    nearest_excluding,
    torch_nearest,
)

nearest_distances = torch_nearest  # brute force: the reference the faiss search is tested against
__all__ = ["PatchKNN", "coreset_rows", "leave_one_out_scores", "nearest_distances"]


class PatchKNN(nn.Module):
    """Nearest-neighbour patch distance to a memory bank of training patches; not trained."""

    name = "knn"
    trainable = False  # no gradient descent: no epochs, no optimisers, no CoMet strategy

    def __init__(
        self,
        feature_dim: int,
        bank_size: int = 0,
        bank_fraction: float = 0.1,
        coreset: str = "auto",
        projection_dim: int = 128,
        search: str = "flat",
    ) -> None:
        super().__init__()
        if not 0.0 < bank_fraction <= 1.0:
            raise CometError(f"knn_bank_fraction must be in (0, 1], got {bank_fraction}")
        if coreset not in CORESETS:
            raise CometError(f"unknown coreset {coreset!r}; choose one of {', '.join(CORESETS[:4])}")
        if search not in SEARCHES:
            raise CometError(f"unknown knn search {search!r}; choose one of {', '.join(SEARCHES)}")
        self._hparams = dict(
            feature_dim=int(feature_dim),
            bank_size=int(bank_size),
            bank_fraction=float(bank_fraction),
            coreset=coreset,
            projection_dim=int(projection_dim),
            search=search,
        )
        self.progress: bool | None = (
            None  # a progress bar (stderr) on the bank build; None: when stderr is a terminal
        )
        self._index = None  # (key of the bank it was built from, faiss index)
        self.register_buffer("bank", torch.zeros(int(bank_size), int(feature_dim)))

    def hparams(self) -> dict:
        return dict(self._hparams)

    def bank_size_for(self, n_patches: int) -> int:
        return max(1, round(self._hparams["bank_fraction"] * n_patches))

    def select(
        self, patches: torch.Tensor, generator: torch.Generator, size: int | None = None
    ) -> torch.Tensor:
        """Coreset row indices of ``patches`` [N, D] with this model's settings (``size`` rows: default
        ``bank_fraction`` of them)."""
        hp = self._hparams
        size = self.bank_size_for(patches.shape[0]) if size is None else size
        return coreset_rows(
            patches, size, hp["coreset"], generator, hp["projection_dim"], progress=self.progress
        )

    @torch.no_grad()
    def fit(
        self, features: torch.Tensor, generator: torch.Generator | None = None, size: int | None = None
    ) -> PatchKNN:
        """Fill the bank from training patch features [N, P, D] (or [N*P, D]); ``size``: as in ``select``."""
        generator = generator or torch.Generator().manual_seed(0)
        patches = features.reshape(
            -1, features.shape[-1]
        )  # the stored dtype: one float32 copy of the bank only
        return self.set_bank(patches[self.select(patches, generator, size)].float())

    def set_bank(self, bank: torch.Tensor) -> PatchKNN:
        self.bank = bank.float().contiguous()
        self._hparams["bank_size"] = int(self.bank.shape[0])
        self._index = None
        return self

    def index(self):
        """The faiss index over the (CPU) bank, built once per bank."""
        key = (self.bank.data_ptr(), self.bank._version, tuple(self.bank.shape), self._hparams["search"])
        if self._index is None or self._index[0] != key:
            self._index = (key, build_index(self.bank, self._hparams["search"]))
        return self._index[1]

    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """Distance of every query row [Q, D] to its nearest bank row (on the bank's device)."""
        if self.bank.is_cuda:
            return torch_nearest(queries, self.bank)
        return nearest(queries, self.index())

    # ------------------------------------------------------------------ the detector protocol
    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        if self.bank.shape[0] == 0:
            raise CometError("the knn memory bank is empty: fit it on training features first")
        batch, patches, dim = features.shape
        flat = features.reshape(-1, dim)
        if torch.jit.is_tracing():  # export: one block, so the traced graph keeps its batch size free
            return self._traced_distances(flat).reshape(batch, patches)
        return self.nearest(flat).to(features.device).reshape(batch, patches)

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
    never matching a patch to a bank entry of its own image (the model's search: exact by default)."""
    n, p, dim = features.shape
    patches = features.reshape(-1, dim)
    rows = model.select(patches, generator)
    owners = torch.arange(n).repeat_interleave(p)
    bank = PatchKNN(dim, search=model.hparams()["search"]).set_bank(patches[rows])
    if patches.is_cuda:
        return torch_nearest(patches, bank.bank, exclude=(owners, owners[rows])).reshape(n, p)
    return nearest_excluding(patches, owners, bank.index(), owners[rows]).reshape(n, p)
