"""The feature store: sample id -> patch features [P, D], filled once, read many times.

The backbone is frozen and SimpleNet uses no augmentation, so an image's patch features never change
during training. Computing them once (instead of ~160 times per image, as the authors' code does) is
the single largest speed-up in comet-ray. A store lives in memory (CPU or GPU) or, for sets larger
than memory, in a memory-mapped file on disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.bfloat16: None}


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
    """Patch features of a set of images, addressed by sample id."""

    ids: list[str]
    features: torch.Tensor  # [N, P, D]
    grid: tuple[int, int]
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {sample_id: row for row, sample_id in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise ValueError("duplicate sample ids in a feature store")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        return int(self.features.shape[2])

    def rows(self, ids: list[str]) -> torch.Tensor:
        return torch.tensor([self._index[i] for i in ids], dtype=torch.long)

    def batch(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Features of the given rows as float32 on ``device`` (async copy from pinned memory on CUDA)."""
        rows = rows.to(self.features.device)
        chunk = self.features.index_select(0, rows)
        if chunk.device.type == "cpu" and torch.device(device).type == "cuda":
            chunk = chunk.pin_memory().to(device, non_blocking=True)
        return chunk.to(device=device, dtype=torch.float32)

    def subset(self, ids: list[str]) -> FeatureStore:
        return FeatureStore(list(ids), self.features.index_select(0, self.rows(list(ids))), self.grid)

    def to(self, device: torch.device | str) -> FeatureStore:
        return FeatureStore(self.ids, self.features.to(device), self.grid)

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
        return self.features.numel() * self.features.element_size()

    # Persistence: a raw array plus a JSON index, so a large store can be memory-mapped.
    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = self.features.dtype
        array = self.features.cpu()
        if dtype == torch.bfloat16:  # numpy has no bfloat16: store the raw 16-bit pattern
            array = array.view(torch.int16)
        tmp = directory / "features.npy.tmp"
        with open(tmp, "wb") as handle:
            np.save(handle, array.numpy())
        meta = {"ids": self.ids, "grid": list(self.grid), "dtype": str(dtype).removeprefix("torch.")}
        (directory / "index.json.tmp").write_text(json.dumps(meta))
        os.replace(tmp, directory / "features.npy")
        os.replace(directory / "index.json.tmp", directory / "index.json")

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = False) -> FeatureStore:
        directory = Path(directory)
        meta = json.loads((directory / "index.json").read_text())
        array = np.load(directory / "features.npy", mmap_mode="c" if mmap else None)
        tensor = torch.from_numpy(array)
        if meta["dtype"] == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return cls(list(meta["ids"]), tensor, tuple(meta["grid"]))

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        directory = Path(directory)
        return (directory / "index.json").exists() and (directory / "features.npy").exists()


def place_store(store: FeatureStore, device: torch.device, max_fraction: float = 0.5) -> FeatureStore:
    """Move a store onto the GPU when it takes at most ``max_fraction`` of free memory (MVTec sizes do).

    The head's epochs then read features with no host-to-device copies; larger stores stay in host
    memory and stream through pinned buffers.
    """
    if device.type != "cuda" or store.features.device.type == "cuda":
        return store
    free, _ = torch.cuda.mem_get_info(device)
    return store.to(device) if store.nbytes <= max_fraction * free else store


def concat_stores(stores: list[FeatureStore]) -> FeatureStore:
    if not stores:
        raise ValueError("no feature stores to concatenate")
    ids = [i for store in stores for i in store.ids]
    return FeatureStore(ids, torch.cat([s.features for s in stores]), stores[0].grid)
