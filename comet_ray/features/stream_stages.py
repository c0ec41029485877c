"""The Ray Data pipeline's parts (:mod:`comet_ray.features.streaming`): its options, the storage the
tasks and actors open, the decode tasks and the feature actors."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from comet_ray.config import FeatureConfig
from comet_ray.data.images import _load_mask, crop_image, decode_image, normalise_images
from comet_ray.data.layout import Sample, open_dataset_filesystem, read_bytes
from comet_ray.data.s3 import is_s3_uri, parse_s3_uri, public_s3_uri, s3_filesystem, storage_error
from comet_ray.errors import ImageDecodeError
from comet_ray.features.entry import PARTS_DIR, as_numpy, part_name, write_part
from comet_ray.features.extractor import PatchFeatureExtractor
from comet_ray.features.store import storage_dtype

log = logging.getLogger(__name__)


# --- options and storage -------------------------------------------------------------------------


@dataclass
class StreamOptions:
    """Resources and batch sizes of the pipeline; the defaults suit a small CPU box and scale up."""

    feature_batch_size: int | None = None  # images per backbone call; None = FeatureConfig.batch_size
    decode_batch_size: int = 16  # images per decode task (and per input block)
    decode_cpus: float = 0.5  # fractional: decoding is I/O plus PIL, which release the GIL
    read_threads: int = 8  # concurrent GETs inside one decode task
    # per feature actor; also its torch thread count (at least 1). Half a CPU leaves room on a 1-CPU node
    # for the decode tasks that feed the actor there.
    actor_cpus: float = 0.5
    num_gpus: float | None = None  # per actor; None = 1 when the cluster has GPUs, else 0
    # pool size; None = one per GPU, else autoscale from one per node with CPUs to max(that, CPUs // 2)
    actors: int | None = None
    max_tasks_in_flight_per_actor: int = 2


@dataclass(frozen=True)
class StorageSpec:
    """How workers open the dataset's storage: picklable, rebuilt in every worker process.

    Credentials normally come from each worker's own AWS chain (the environment Ray workers inherit
    from the driver on a local cluster, or the node's profile/role). Keys given in an
    ``s3://KEY:SECRET@bucket`` root travel here (never into results or logs: ``repr`` hides them).
    """

    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)

    @classmethod
    def for_root(cls, root: str | None, s3_endpoint: str | None = None) -> StorageSpec:
        if root and is_s3_uri(root):
            location = parse_s3_uri(root)
            return cls(
                s3_endpoint or location.endpoint, location.region, location.access_key, location.secret_key
            )
        return cls(s3_endpoint)

    def s3(self) -> pafs.S3FileSystem:
        return s3_filesystem(
            self.endpoint, region=self.region, access_key=self.access_key, secret_key=self.secret_key
        )


_FS_CACHE: dict[tuple, pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


def _filesystem_for(uri: str, storage: StorageSpec) -> pafs.FileSystem:
    """One filesystem per (kind, storage) per worker process."""
    key = ("s3", storage) if is_s3_uri(uri) else ("local",)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = storage.s3() if key[0] == "s3" else pafs.LocalFileSystem()
            _FS_CACHE[key] = fs
        return fs


def _output_filesystem(output: str, storage: StorageSpec) -> tuple[pafs.FileSystem, str]:
    if is_s3_uri(output):
        location = parse_s3_uri(output)
        spec = StorageSpec(
            storage.endpoint or location.endpoint,
            location.region or storage.region,
            location.access_key or storage.access_key,
            location.secret_key or storage.secret_key,
        )
        return spec.s3(), location.path
    fs, path = open_dataset_filesystem(output)
    fs.create_dir(path, recursive=True)
    return fs, path


# --- preprocessing split in two (uint8 crop in decode tasks, normalisation in the actor) ----------


# --- pipeline stages -----------------------------------------------------------------------------

_SAMPLE_FIELDS = ("sample_id", "category", "split", "uri", "defect", "mask_uri", "injected")


def _sample_rows(samples: list[Sample]) -> list[dict]:
    return [
        {"row": index, **{name: getattr(s, name) for name in _SAMPLE_FIELDS}, "mask_uri": s.mask_uri or ""}
        for index, s in enumerate(samples)
    ]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value) if value is not None else ""


def _decode_batch(
    batch: dict[str, np.ndarray], image_size: int, with_masks: bool, storage: StorageSpec, read_threads: int
) -> dict[str, np.ndarray]:
    """Read + decode + crop one batch of samples (Ray Data task). Unreadable images get an error."""
    n = len(batch["row"])
    size = image_size
    images = np.zeros((n, 3, size, size), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    errors = [""] * n
    mask_width = (size * size + 7) // 8
    masks = np.zeros((n, mask_width), dtype=np.uint8)
    available = np.zeros(n, dtype=bool)
    issues = [""] * n

    def work(i: int) -> None:
        sample = Sample(
            sample_id=_text(batch["sample_id"][i]),
            category=_text(batch["category"][i]),
            split=_text(batch["split"][i]),
            uri=_text(batch["uri"][i]),
            defect=_text(batch["defect"][i]),
            mask_uri=_text(batch["mask_uri"][i]) or None,
            injected=bool(batch["injected"][i]),
        )
        fs = _filesystem_for(sample.uri, storage)
        try:
            img = decode_image(read_bytes(sample.uri, fs), sample.uri)
        except ImageDecodeError as exc:
            errors[i] = exc.reason
            return
        images[i] = crop_image(img, size).numpy()
        ok[i] = True
        if not with_masks:
            return
        mask = torch.zeros((1, size, size), dtype=torch.bool)
        reason = _load_mask(sample, img.size, size, fs, mask, 0)
        if reason is None:
            available[i] = sample.split == "test" or sample.injected
            masks[i] = np.packbits(mask[0].numpy().ravel())
        else:
            issues[i] = reason

    with ThreadPoolExecutor(max_workers=max(1, min(read_threads, n))) as pool:
        list(pool.map(work, range(n)))  # re-raises a StorageError from any read
    out = {
        "row": np.asarray(batch["row"], dtype=np.int64),
        "sample_id": np.asarray([_text(v) for v in batch["sample_id"]], dtype=object),
        "uri": np.asarray([_text(v) for v in batch["uri"]], dtype=object),
        "image": images,
        "ok": ok,
        "error": np.asarray(errors, dtype=object),
        "mask_available": available,
        "mask_issue": np.asarray(issues, dtype=object),
    }
    if with_masks:
        out["mask"] = masks
    return out


class FeatureActor:
    """Ray Data callable class: uint8 crops -> patch features, one frozen backbone per actor.

    With ``output`` (an entry's location and how to open its storage) it writes each batch as a part
    there and returns the rows' metadata; without, it returns the features themselves.
    """

    def __init__(
        self,
        feature_config: FeatureConfig,
        use_gpu: bool,
        threads: int,
        output: tuple[str, StorageSpec] | None = None,
    ) -> None:
        import ray

        torch.set_num_threads(max(1, threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.extractor = PatchFeatureExtractor(feature_config, device)
        self.dtype = storage_dtype(feature_config.cache_dtype)
        self.batch_size = max(1, feature_config.batch_size)
        grid = self.extractor.grid(feature_config.image_size)
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        self.width = grid[0] * grid[1] * self.extractor.feature_dim * itemsize  # same type in every block
        self.output = None
        if output is not None:
            self.output = (*_output_filesystem(output[0], output[1]), public_s3_uri(output[0]))
        self.node = ray.get_runtime_context().get_node_id()
        self.weights = self.extractor.weights_source

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.time()
        ok = np.asarray(batch["ok"], dtype=bool)
        n = len(ok)
        features = None
        if ok.any():
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok]))
            parts = []
            for start in range(0, len(images), self.batch_size):
                # uint8 goes to the device (4x less to copy than float32); normalised there
                chunk = images[start : start + self.batch_size].to(self.extractor.device, non_blocking=True)
                chunk = normalise_images(chunk)
                parts.append(self.extractor(chunk).to("cpu", self.dtype))
            features = as_numpy(torch.cat(parts))
        if self.output is not None:
            return self._write_part(batch, ok, features, started)
        columns = {
            "row": pa.array(batch["row"], pa.int64()),
            "sample_id": pa.array(list(batch["sample_id"]), pa.string()),
            "uri": pa.array(list(batch["uri"]), pa.string()),
            "features": _fixed_binary(features, ok, n, self.width),
            "error": pa.array(list(batch["error"]), pa.string()),
            "mask_available": pa.array(batch["mask_available"], pa.bool_()),
            "mask_issue": pa.array(list(batch["mask_issue"]), pa.string()),
        }
        if "mask" in batch:
            mask = np.ascontiguousarray(batch["mask"], dtype=np.uint8)
            columns["mask"] = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(mask.shape[1]), n, [None, pa.py_buffer(mask.tobytes())]
            )
        return pa.table(columns)

    def _write_part(
        self, batch: dict[str, np.ndarray], ok: np.ndarray, features: np.ndarray | None, started: float
    ) -> pa.Table:
        """Write this batch's part into the entry; the rows' metadata (no features) for the index."""
        fs, path, shown = self.output
        rows = np.asarray(batch["row"], dtype=np.int64)
        name = part_name(int(rows.min()), int(rows.max())) if len(rows) else ""
        kept = int(ok.sum())
        if kept:
            masks = np.ascontiguousarray(batch["mask"][ok], dtype=np.uint8) if "mask" in batch else None
            try:
                write_part(fs, path, name, features, masks)
            except OSError as exc:
                raise storage_error(exc, shown, fs) from exc
            print(
                f"[node {self.node[:12]}] features: embedded {kept} images into {shown}/{PARTS_DIR}/{name}",
                flush=True,
            )
        offsets = np.cumsum(ok) - 1
        n = len(rows)
        return pa.table(
            {
                "row": pa.array(rows, pa.int64()),
                "sample_id": pa.array(list(batch["sample_id"]), pa.string()),
                "uri": pa.array(list(batch["uri"]), pa.string()),
                "error": pa.array(list(batch["error"]), pa.string()),
                "mask_available": pa.array(batch["mask_available"], pa.bool_()),
                "mask_issue": pa.array(list(batch["mask_issue"]), pa.string()),
                "part": pa.array([name if good else "" for good in ok], pa.string()),
                "offset": pa.array(np.where(ok, offsets, -1), pa.int64()),
                "node": pa.array([self.node] * n, pa.string()),
                "pid": pa.array([os.getpid()] * n, pa.int64()),
                "started": pa.array([started] * n, pa.float64()),
                "finished": pa.array([time.time()] * n, pa.float64()),
                "weights": pa.array([self.weights] * n, pa.string()),
            }
        )


def _fixed_binary(values: np.ndarray | None, ok: np.ndarray, n: int, width: int) -> pa.Array:
    """Rows of ``values`` (one per True in ``ok``) as fixed-size binary; null where ``ok`` is False."""
    data = np.zeros((n, width), dtype=np.uint8)
    if values is not None:
        data[ok] = (
            np.ascontiguousarray(values).reshape(len(values), -1).view(np.uint8).reshape(len(values), width)
        )
    validity = None if ok.all() else pa.py_buffer(np.packbits(ok, bitorder="little").tobytes())
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), n, [validity, pa.py_buffer(data.tobytes())], null_count=int(n - ok.sum())
    )
