"""The feature store: sample id -> patch features [P, D], filled once, read many times.

The backbone is frozen and SimpleNet uses no augmentation, so an image's patch features never change
during training. Computing them once (instead of ~160 times per image, as the authors' code does) is
the single largest speed-up in comet-ray. A store lives in memory (CPU or GPU); on disk or in S3 the
features live in a cache entry (:mod:`comet_ray.features.entry`), from which each process reads only
the rows it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def storage_dtype(name: str) -> torch.dtype:
    dtypes = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown cache dtype {name!r}; choose one of {', '.join(dtypes)}")
    return dtypes[name]


def as_stored(features: torch.Tensor, cache_dtype: str) -> torch.Tensor:
    """Features rounded to the cache dtype and widened back to float32: exactly what a store hands
    the detector, so freshly extracted images (``predict``) score as the cached ones of training did."""
    return features.to(storage_dtype(cache_dtype)).float()


@dataclass
class FeatureStore:
    """Patch features of a set of images, addressed by sample id (or by row: the position in ``ids``).

    ``ids`` lists every image of the set. A data-parallel worker holds only its shard: ``held`` then
    names the rows whose features are in ``features`` (in that order) and :meth:`batch` serves those
    rows only; ``held=None`` means every row, in order (one process).
    """

    ids: list[str]
    features: torch.Tensor  # [len(held) or len(ids), P, D]
    grid: tuple[int, int]
    held: torch.Tensor | None = None
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {sample_id: row for row, sample_id in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise ValueError("duplicate sample ids in a feature store")
        self._position = None
        if self.held is not None:
            self.held = torch.as_tensor(self.held, dtype=torch.long)
            if self.held.numel() != self.features.shape[0]:
                raise ValueError(f"{self.features.shape[0]} feature rows for {self.held.numel()} held rows")
            self._position = torch.full((len(self.ids),), -1, dtype=torch.long)
            self._position[self.held] = torch.arange(self.held.numel())

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        return int(self.features.shape[2])

    def held_rows(self) -> torch.Tensor:
        """The rows whose features this store holds."""
        return torch.arange(len(self.ids)) if self.held is None else self.held

    def rows(self, ids: list[str]) -> torch.Tensor:
        return torch.tensor([self._index[i] for i in ids], dtype=torch.long)

    def batch(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Features of the given rows as float32 on ``device`` (async copy from pinned memory on CUDA)."""
        chunk = self.batch_raw(rows)
        if chunk.device.type == "cpu" and torch.device(device).type == "cuda":
            chunk = chunk.pin_memory().to(device, non_blocking=True)
        return chunk.to(device=device, dtype=torch.float32)

    def subset(self, ids: list[str]) -> FeatureStore:
        rows = self.rows(list(ids))
        return FeatureStore(list(ids), self.batch_raw(rows), self.grid)

    def batch_raw(self, rows: torch.Tensor) -> torch.Tensor:
        """Features of the given rows as stored (dtype and device unchanged)."""
        if self._position is not None:
            rows = self._position[rows]
            if bool((rows < 0).any()):
                raise IndexError("rows outside this worker's shard of the feature store")
        return self.features.index_select(0, rows.to(self.features.device))

    def to(self, device: torch.device | str) -> FeatureStore:
        return FeatureStore(self.ids, self.features.to(device), self.grid, self.held)

    def scale(self, chunk: int = 64) -> float:
        """The features' spread: sqrt of the mean over dimensions of each dimension's variance over all
        patches (the RMS of the per-dimension standard deviations); 1.0 when there is no spread. A random
        projection with Xavier init (SimpleNet's adaptor) keeps it, so it is also the adapted features'
        spread at the start."""
        total = torch.zeros(self.dim, dtype=torch.float64)
        squares = torch.zeros(self.dim, dtype=torch.float64)
        count = 0
        for start in range(0, len(self), chunk):
            block = self.features[start : start + chunk].reshape(-1, self.dim).to(torch.float64)
            total += block.sum(dim=0)
            squares += block.pow(2).sum(dim=0)
            count += block.shape[0]
        if count < 2:
            return 1.0
        variance = (squares - total.pow(2) / count) / (count - 1)
        spread = float(variance.clamp_min(0).mean().sqrt())
        return spread if spread > 0 else 1.0  # constant features: keep the noise a finite size

    @property
    def nbytes(self) -> int:
        """Bytes of the features held here."""
        return self.features.numel() * self.features.element_size()


def place_store(store: FeatureStore, device: torch.device, max_fraction: float = 0.5) -> FeatureStore:
    """Move a store onto the GPU when it takes at most ``max_fraction`` of free memory (MVTec sizes do).

    The head's epochs then read features with no host-to-device copies; larger stores stay in host
    memory and stream through pinned buffers.
    """
    if device.type != "cuda" or store.features.device.type == "cuda":
        return store
    free, _ = torch.cuda.mem_get_info(device)
    return store.to(device) if store.nbytes <= max_fraction * free else store
