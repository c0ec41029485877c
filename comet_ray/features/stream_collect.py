"""Ray Data features collected on the driver (:func:`stream_features`), for tests and benchmarks that
compare the pipeline with the in-process extractor; production writes cache entries
(:func:`comet_ray.features.streaming.stream_to_entry`) and reads them back by row."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from comet_ray.config import FeatureConfig
from comet_ray.data.layout import Sample
from comet_ray.data.s3 import public_s3_uri
from comet_ray.errors import CometError
from comet_ray.features.entry import FeatureEntry
from comet_ray.features.extractor import ExtractedSplit, PatchFeatureExtractor, read_split
from comet_ray.features.store import FeatureStore, storage_dtype

log = logging.getLogger(__name__)

from comet_ray.features.stream_stages import StorageSpec, StreamOptions
from comet_ray.features.streaming import (
    _output_filesystem,
    _ray_data_run,
    _run,
    build_dataset,
    stream_to_entry,
)


def stream_features(
    samples: list[Sample],
    feature_config: FeatureConfig,
    s3_endpoint: str | None = None,
    *,
    with_masks: bool = True,
    output: str | None = None,
    options: StreamOptions | None = None,
    extractor: PatchFeatureExtractor | None = None,
    storage: StorageSpec | None = None,
    progress: bool = False,
    reuse: bool = True,
) -> ExtractedSplit:
    """Features of ``samples`` through Ray Data, as an :class:`ExtractedSplit` (ids in input order).

    With ``output`` (local folder or ``s3://``), they go to a cache entry there (:func:`stream_to_entry`)
    and are read back; a complete entry already there is read without running the pipeline (``reuse``).
    Without, they are collected here. ``extractor`` (a driver-side one, e.g. the pipeline's) provides
    the fingerprint and patch grid; without it a CPU one is built here. Uses the running Ray
    (``ray.init`` is called with defaults, and shut down again, when none is running).
    """
    storage = storage or StorageSpec(s3_endpoint)
    extractor = extractor or PatchFeatureExtractor(feature_config, "cpu")
    ids = [s.sample_id for s in samples]
    if output:
        entry = (
            FeatureEntry.open(*_output_filesystem(output, storage), public_s3_uri(output)) if reuse else None
        )
        if entry is None:
            entry = stream_to_entry(
                samples,
                extractor,
                output,
                with_masks=with_masks,
                options=options,
                storage=storage,
                progress=progress,
            )
        return read_split(entry, ids, with_masks)
    if not samples:
        raise CometError("no images to extract features from")
    grid = extractor.grid(feature_config.image_size)
    with _ray_data_run(progress):
        ds = build_dataset(samples, feature_config, storage, with_masks, options or StreamOptions())
        return _run(lambda: _collect(ds, len(samples), grid, feature_config, with_masks))


# --- collecting and reading back -----------------------------------------------------------------


class _Assembler:
    """Fills features/masks for the kept rows of a stream of feature tables, in input order."""

    def __init__(
        self,
        n_rows: int,
        grid: tuple[int, int],
        config: FeatureConfig,
        with_masks: bool,
        kept_rows: list[int] | None = None,
    ) -> None:
        self.n_rows = n_rows
        self.grid = grid
        self.size = config.image_size
        self.dtype = storage_dtype(config.cache_dtype)
        self.with_masks = with_masks
        self.ids: list[str | None] = [None] * n_rows
        self.errors: dict[int, dict] = {}
        self.issues: dict[int, dict] = {}
        self.position = {row: i for i, row in enumerate(kept_rows)} if kept_rows is not None else None
        capacity = len(kept_rows) if kept_rows is not None else n_rows
        self.features: torch.Tensor | None = None
        self.capacity = capacity
        self.masks = torch.zeros((capacity, self.size, self.size), dtype=torch.bool) if with_masks else None
        self.available = torch.zeros(capacity, dtype=torch.bool)
        self.filled = np.zeros(capacity, dtype=bool)

    def add(self, table: pa.Table) -> None:
        rows = table.column("row").to_numpy()
        ids = table.column("sample_id").to_pylist()
        uris = table.column("uri").to_pylist()
        errors = table.column("error").to_pylist()
        issues = table.column("mask_issue").to_pylist()
        available = table.column("mask_available").to_numpy(zero_copy_only=False)
        features = table.column("features").combine_chunks()
        masks = table.column("mask").combine_chunks() if self.with_masks else None
        width = features.type.byte_width
        raw = np.frombuffer(features.buffers()[1], dtype=np.uint8)[
            features.offset * width : (features.offset + len(features)) * width
        ]
        raw = raw.reshape(len(features), width) if len(features) else raw.reshape(0, width)
        for j, row in enumerate(rows):
            row = int(row)
            self.ids[row] = ids[j]
            if errors[j]:
                self.errors[row] = {"sample_id": ids[j], "uri": uris[j], "reason": errors[j]}
                continue
            pos = self.position[row] if self.position is not None else row
            if self.features is None:
                numpy_dtype = (
                    np.int16
                    if self.dtype == torch.bfloat16
                    else torch.empty(0, dtype=self.dtype).numpy().dtype
                )
                n_patches = self.grid[0] * self.grid[1]
                dim = width // (n_patches * np.dtype(numpy_dtype).itemsize)
                self.numpy_dtype, self.shape = numpy_dtype, (n_patches, dim)
                self.features = torch.empty((self.capacity, n_patches, dim), dtype=self.dtype)
                self._view = (
                    self.features.view(torch.int16) if self.dtype == torch.bfloat16 else self.features
                )
            self._view[pos] = torch.from_numpy(raw[j].view(self.numpy_dtype).reshape(self.shape))
            self.filled[pos] = True
            if issues[j]:
                self.issues[row] = {"sample_id": ids[j], "uri": uris[j], "reason": issues[j]}
            if self.with_masks:
                self.available[pos] = bool(available[j])
                bits = np.frombuffer(masks[j].as_py(), dtype=np.uint8)
                self.masks[pos] = torch.from_numpy(
                    np.unpackbits(bits)[: self.size * self.size].reshape(self.size, self.size).astype(bool)
                )

    def result(self, feature_dim: int | None = None) -> ExtractedSplit:
        missing = [r for r in range(self.n_rows) if self.ids[r] is None]
        if missing:
            raise CometError(f"the feature pipeline lost {len(missing)} image(s); rerun")
        kept = [r for r in range(self.n_rows) if r not in self.errors]
        if self.position is None:
            index = torch.tensor(kept, dtype=torch.long)
        else:
            index = torch.tensor([self.position[r] for r in kept], dtype=torch.long)
        if self.features is None:  # every image was skipped
            dim = feature_dim or 1
            features = torch.zeros((0, self.grid[0] * self.grid[1], dim), dtype=self.dtype)
        elif len(index) == self.capacity:
            features = self.features
        else:
            features = self.features.index_select(0, index)
        store = FeatureStore([self.ids[r] for r in kept], features, tuple(self.grid))
        result = ExtractedSplit(
            store,
            skipped=[self.errors[r] for r in sorted(self.errors)],
            mask_issues=[self.issues[r] for r in sorted(self.issues)],
        )
        if self.with_masks:
            same = len(index) == self.capacity
            result.masks = self.masks if same else self.masks.index_select(0, index)
            result.mask_available = self.available if same else self.available.index_select(0, index)
        return result


def _collect(ds, n_rows: int, grid, config: FeatureConfig, with_masks: bool) -> ExtractedSplit:
    assembler = _Assembler(n_rows, grid, config, with_masks)
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        assembler.add(table)
    return assembler.result()


def object_store_bytes() -> dict[str, Any]:
    """Object store capacity and spilled bytes of the running Ray (for benchmarks and tests)."""
    import ray

    info: dict[str, Any] = {"capacity": int(ray.cluster_resources().get("object_store_memory", 0))}
    try:
        from ray._private.internal_api import memory_summary

        summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        info["summary"] = summary
        info["spilled_mib"] = 0.0  # the summary has a "Spilled ..." line only once something spilled
        for line in summary.splitlines():
            if "Spilled" in line and "MiB" in line:
                info["spilled_mib"] = float(line.split("Spilled")[1].split("MiB")[0].strip())
                break
    except Exception:  # noqa: BLE001, S110 - best effort: internal API
        pass
    return info
