"""A feature cache entry: the patch features of a category in parts, in a folder or under an ``s3://`` prefix.

Written once, by one process (in-process extraction) or by many at once (the Ray Data pipeline's
backbone actors, each writing the parts it embedded, on whatever node it runs); read many times, by
processes that each need only some rows (a data-parallel worker's shard, one split)::

    <entry>/parts/part-<first row>-<last row>.npy        features [n, P, D] in the cache dtype
    <entry>/parts/part-<first row>-<last row>.mask.npy   ground-truth masks, bit-packed [n, ceil(S*S/8)]
    <entry>/index.json                                   written last: an entry without it is incomplete

``index.json`` lists the images kept (sample ids in input order, each with its part and position
there), every part with the node and process that embedded it and when, the images skipped at
decode time and the unusable masks. A reader fetches exactly the rows it asks for: one ranged read per
run of consecutive rows (``.npy`` keeps rows contiguous after a small header), straight into the
tensor it returns, so holding k rows costs k rows of memory, never the whole entry, locally or in S3.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import torch

from comet_ray.features.store import FeatureStore, storage_dtype

VERSION = 2
INDEX_FILE = "index.json"
PARTS_DIR = "parts"
READ_THREADS = 8


def part_name(first_row: int, last_row: int) -> str:
    """A part's name from the input rows it covers: a retried block rewrites the same files."""
    return f"part-{first_row:08d}-{last_row:08d}"


def as_numpy(features: torch.Tensor) -> np.ndarray:
    """Features as a numpy array of the same bytes (bfloat16, which numpy lacks, as its int16 bits)."""
    if features.dtype == torch.bfloat16:
        features = features.view(torch.int16)
    return features.contiguous().numpy()


def pack_masks(masks: torch.Tensor | np.ndarray) -> np.ndarray:
    """Bool ``[n, S, S]`` masks -> ``[n, ceil(S*S/8)]`` uint8, 8x smaller."""
    masks = np.asarray(masks, dtype=bool)
    return np.packbits(masks.reshape(masks.shape[0], -1), axis=1)


def unpack_masks(packed: np.ndarray, size: int) -> torch.Tensor:
    bits = np.unpackbits(packed, axis=1, count=size * size)
    return torch.from_numpy(bits.reshape(packed.shape[0], size, size).astype(bool))


def _write_file(fs: pafs.FileSystem, path: str, write) -> None:
    """Write one file with ``write(stream)``; locally through a temporary name and a rename (never half written)."""
    local = isinstance(fs, pafs.LocalFileSystem)
    target = f"{path}.tmp-{os.getpid()}" if local else path
    if local:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(target) as stream:
        write(stream)
    if local:
        fs.move(target, path)


def write_part(
    fs: pafs.FileSystem, entry_path: str, name: str, features: np.ndarray, masks: np.ndarray | None = None
) -> None:
    """Write one part: features ``[n, P, D]`` (see :func:`as_numpy`) and, if given, packed masks."""
    base = f"{entry_path.rstrip('/')}/{PARTS_DIR}/{name}"
    _write_file(
        fs, f"{base}.npy", lambda stream: np.lib.format.write_array(stream, features, allow_pickle=False)
    )
    if masks is not None:
        _write_file(
            fs,
            f"{base}.mask.npy",
            lambda stream: np.lib.format.write_array(stream, masks, allow_pickle=False),
        )


@dataclass
class EntryIndex:
    """What ``index.json`` holds, built part by part (parts may arrive in any order)."""

    grid: tuple[int, int]
    feature_dim: int
    cache_dtype: str
    image_size: int
    with_masks: bool
    fingerprint: dict = field(default_factory=dict)
    parts: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    mask_issues: list[dict] = field(default_factory=list)
    _rows: list[tuple[int, str, int, int, bool]] = field(default_factory=list, repr=False)

    def add_part(
        self,
        name: str,
        input_rows: Sequence[int],
        ids: Sequence[str],
        mask_available: Sequence[bool] | None = None,
        **record,
    ) -> None:
        """Record a written part: its images (input row, sample id) in part order, and who wrote it."""
        number = len(self.parts)
        self.parts.append({"name": name, "rows": len(ids), **record})
        available = mask_available if mask_available is not None else [False] * len(ids)
        for offset, (row, sample_id, usable) in enumerate(zip(input_rows, ids, available)):
            self._rows.append((int(row), sample_id, number, offset, bool(usable)))

    def to_json(self) -> str:
        rows = sorted(self._rows)
        return json.dumps(
            {
                "version": VERSION,
                "grid": list(self.grid),
                "feature_dim": self.feature_dim,
                "cache_dtype": self.cache_dtype,
                "image_size": self.image_size,
                "with_masks": self.with_masks,
                "fingerprint": self.fingerprint,
                "ids": [r[1] for r in rows],
                "places": [[r[2], r[3]] for r in rows],
                "mask_available": [r[4] for r in rows],
                "parts": self.parts,
                "skipped": sorted(self.skipped, key=lambda s: s["sample_id"]),
                "mask_issues": sorted(self.mask_issues, key=lambda s: s["sample_id"]),
            }
        )

    def write(self, fs: pafs.FileSystem, entry_path: str) -> None:
        """Write ``index.json``: the entry is complete from this moment."""
        text = self.to_json()
        _write_file(fs, f"{entry_path.rstrip('/')}/{INDEX_FILE}", lambda stream: stream.write(text.encode()))


class FeatureEntry:
    """A complete cache entry, opened for reading rows (see the module docstring)."""

    def __init__(self, fs: pafs.FileSystem, path: str, index: dict, shown: str) -> None:
        self.fs, self.path, self.shown = fs, path.rstrip("/"), shown
        self.index = index
        self.ids: list[str] = index["ids"]
        self.grid: tuple[int, int] = tuple(index["grid"])
        self.cache_dtype: str = index["cache_dtype"]
        self.image_size: int = int(index["image_size"])
        self.with_masks: bool = bool(index["with_masks"])
        self.places: list[list[int]] = index["places"]
        self.mask_available = torch.tensor(index["mask_available"], dtype=torch.bool)
        self.parts: list[dict] = index["parts"]
        self.skipped: list[dict] = index["skipped"]
        self.mask_issues: list[dict] = index["mask_issues"]
        self.fingerprint: dict = index.get("fingerprint", {})
        self.feature_dim: int = int(index["feature_dim"])
        self._row = {sample_id: row for row, sample_id in enumerate(self.ids)}

    @classmethod
    def open(cls, fs: pafs.FileSystem, path: str, shown: str | None = None) -> FeatureEntry | None:
        """The entry at ``path``, or None when there is none or it is incomplete (no index yet)."""
        try:
            with fs.open_input_stream(f"{path.rstrip('/')}/{INDEX_FILE}") as stream:
                index = json.loads(stream.readall())
        except FileNotFoundError:
            return None
        except ValueError:
            return None
        if index.get("version") != VERSION:
            return None
        return cls(fs, path, index, shown or path)

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, ids: Sequence[str]) -> list[int]:
        return [self._row[i] for i in ids]

    def contains(self, sample_id: str) -> bool:
        return sample_id in self._row

    @property
    def row_shape(self) -> tuple[int, int]:
        """``(P, D)`` of one image."""
        return self.grid[0] * self.grid[1], self.feature_dim

    @property
    def row_bytes(self) -> int:
        patches, dim = self.row_shape
        return patches * dim * torch.empty(0, dtype=storage_dtype(self.cache_dtype)).element_size()

    def read_features(self, rows: Sequence[int]) -> torch.Tensor:
        """Features ``[len(rows), P, D]`` of entry rows ``rows``, in the cache dtype."""
        out = torch.empty((len(rows), *self.row_shape), dtype=storage_dtype(self.cache_dtype))
        if rows:
            self._read_rows(rows, ".npy", as_numpy(out))
        return out

    def read_masks(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(masks ``[n, S, S]`` bool, mask available ``[n]`` bool) of entry rows ``rows``."""
        size = self.image_size
        packed = np.zeros((len(rows), (size * size + 7) // 8), dtype=np.uint8)
        if rows and self.with_masks:
            self._read_rows(rows, ".mask.npy", packed)
        available = (
            self.mask_available[torch.as_tensor(list(rows), dtype=torch.long)]
            if rows
            else torch.zeros(0, dtype=torch.bool)
        )
        return unpack_masks(packed, size), available

    def store(self, ids: Sequence[str], held: torch.Tensor | None = None) -> FeatureStore:
        """A :class:`FeatureStore` of ``ids`` holding only rows ``held`` of them (all when None)."""
        rows = self.rows_of(ids)
        wanted = rows if held is None else [rows[int(i)] for i in held]
        return FeatureStore(list(ids), self.read_features(wanted), self.grid, held)

    # ------------------------------------------------------------------ reading
    def _part_path(self, part: int, suffix: str) -> str:
        return f"{self.path}/{PARTS_DIR}/{self.parts[part]['name']}{suffix}"

    def _read_rows(self, rows: Sequence[int], suffix: str, out: np.ndarray) -> None:
        """Fill ``out[i]`` with row ``rows[i]`` of every part's ``suffix`` file, one read per run of rows."""
        by_part: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for position, row in enumerate(rows):
            part, offset = self.places[row]
            by_part[part].append((offset, position))
        flat = out.reshape(len(rows), -1).view(np.uint8)

        def read_part(part: int) -> None:
            with self.fs.open_input_file(self._part_path(part, suffix)) as handle:
                _, _, start = _npy_header(handle)
                width = flat.shape[1]
                for first_offset, first_position, count in _runs(sorted(by_part[part])):
                    handle.seek(start + first_offset * width)
                    _read_exact(handle, flat[first_position : first_position + count].reshape(-1))

        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(by_part))) as pool:
            list(pool.map(read_part, sorted(by_part)))


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(offset, position) pairs sorted by offset -> runs (first offset, first position, length) in which
    both grow by one per row: one contiguous read into one contiguous slice each."""
    runs: list[list[int]] = []
    for offset, position in pairs:
        if runs and offset == runs[-1][0] + runs[-1][2] and position == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([offset, position, 1])
    return [tuple(r) for r in runs]


def _npy_header(handle) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the ``.npy`` file open in ``handle``."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(handle)
    if fortran:
        raise ValueError("a Fortran-ordered feature part")
    return shape, dtype, handle.tell()


def _read_exact(handle, view: np.ndarray) -> None:
    memory = memoryview(view).cast("B")
    done = 0
    while done < len(memory):
        got = handle.readinto(memory[done:])
        if not got:
            raise OSError(f"a feature part ended {len(memory) - done} bytes early")
        done += got
