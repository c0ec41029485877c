"""Ray Data feature extraction: stream images from disk or object storage through the frozen backbone.

The in-process path (:func:`comet_ray.features.extractor.extract_features_cached`) decodes on the
driver. This one spreads the same work over a Ray cluster and never needs the dataset in memory::

    from_items(sample rows)                       ids, uris, labels: a few hundred bytes per image
      -> map_batches(_decode_batch)               CPU tasks (fractional CPUs): concurrent GETs,
                                                  decode + resize + crop to uint8, masks; corrupt
                                                  objects become rows with an error, not failures
      -> map_batches(FeatureActor, ActorPool)     one PatchFeatureExtractor per actor (a GPU each
                                                  when the cluster has them, else at least one per
                                                  node): normalise + backbone, then either
      -> iter_batches -> FeatureStore             features collected on the driver, or
         each actor writes its parts straight     a cache entry (features/entry.py) in shared storage:
         into the output; only a row's metadata   the driver writes its index.json last; reused by
         comes back                               later runs, read by each worker for its shard only

Why ``from_items`` and not ``read_binary_files``: the sample table already has every object's URI,
so the rows carry ``sample_id``/labels/mask URIs without a path->id join; ``read_binary_files``
would HEAD every object again (Ray tasks for >16 scattered paths) and fail its whole read task on a
single unreadable object, while here a corrupt or vanished object is skipped and listed, and a
storage-level failure (denied, endpoint down after retries) stops the run with one line. Reads run
in a thread pool inside each decode task, so many GETs are in flight per CPU.

Only uint8 crops (3*S*S bytes) and fp16 features travel through the object store; Ray Data's
streaming executor bounds what is in flight, so datasets far larger than the object store complete
(see ``bench/stream.py --stress``). Features equal the in-process extractor's (same decode, same
resize/crop, same normalisation; only the backbone's batch composition differs).

With an ``output`` (a local folder or ``s3://bucket/prefix``: on a cluster, storage every node
reaches) the features never pass through the driver: each actor writes the part it embedded (one per
batch) to the output itself, on whatever node it runs, and returns the rows' metadata (sample id, part
and position, mask availability, errors, node, process and time), from which the driver writes the
entry's ``index.json`` last (:mod:`comet_ray.features.entry`: what the in-process extractor writes
too). Each part also says which node embedded it and when, and each actor prints a line per part to
its node's log: the record that extraction ran on every node at once.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from comet_ray.config import FeatureConfig
from comet_ray.data.images import _load_mask, crop_image, decode_image, normalise_images
from comet_ray.data.layout import Sample, open_dataset_filesystem, read_bytes
from comet_ray.data.s3 import is_s3_uri, parse_s3_uri, public_s3_uri, s3_filesystem, storage_error
from comet_ray.errors import CometError, ImageDecodeError, StorageError, remote_error
from comet_ray.features.entry import PARTS_DIR, EntryIndex, FeatureEntry, as_numpy, part_name, write_part
from comet_ray.features.extractor import ExtractedSplit, PatchFeatureExtractor, cache_location, read_split
from comet_ray.features.store import FeatureStore, storage_dtype

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
            return cls(s3_endpoint or location.endpoint, location.region, location.access_key, location.secret_key)
        return cls(s3_endpoint)

    def s3(self) -> pafs.S3FileSystem:
        return s3_filesystem(self.endpoint, region=self.region, access_key=self.access_key,
                             secret_key=self.secret_key)


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


def _decode_batch(batch: dict[str, np.ndarray], image_size: int, with_masks: bool, storage: StorageSpec,
                  read_threads: int) -> dict[str, np.ndarray]:
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
            sample_id=_text(batch["sample_id"][i]), category=_text(batch["category"][i]),
            split=_text(batch["split"][i]), uri=_text(batch["uri"][i]), defect=_text(batch["defect"][i]),
            mask_uri=_text(batch["mask_uri"][i]) or None, injected=bool(batch["injected"][i]),
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

    def __init__(self, feature_config: FeatureConfig, use_gpu: bool, threads: int,
                 output: tuple[str, StorageSpec] | None = None) -> None:
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

    def _write_part(self, batch: dict[str, np.ndarray], ok: np.ndarray, features: np.ndarray | None,
                    started: float) -> pa.Table:
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
            print(f"[node {self.node[:12]}] features: embedded {kept} images into {shown}/{PARTS_DIR}/{name}",
                  flush=True)
        offsets = np.cumsum(ok) - 1
        n = len(rows)
        return pa.table({
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
        })


def _fixed_binary(values: np.ndarray | None, ok: np.ndarray, n: int, width: int) -> pa.Array:
    """Rows of ``values`` (one per True in ``ok``) as fixed-size binary; null where ``ok`` is False."""
    data = np.zeros((n, width), dtype=np.uint8)
    if values is not None:
        data[ok] = np.ascontiguousarray(values).reshape(len(values), -1).view(np.uint8).reshape(len(values), width)
    validity = None if ok.all() else pa.py_buffer(np.packbits(ok, bitorder="little").tobytes())
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), n, [validity, pa.py_buffer(data.tobytes())], null_count=int(n - ok.sum())
    )


# --- the pipeline --------------------------------------------------------------------------------


def build_dataset(samples: list[Sample], feature_config: FeatureConfig, storage: StorageSpec,
                  with_masks: bool, options: StreamOptions, output: str | None = None):
    """The lazy Ray Dataset of feature rows, or with ``output`` of the rows' metadata once their parts
    are written there (see the module docstring); needs ``ray.init`` done."""
    import ray

    opts = options
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    num_gpus = opts.num_gpus if opts.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    in_flight = opts.max_tasks_in_flight_per_actor
    if opts.actors:
        pool = ray.data.ActorPoolStrategy(size=opts.actors, max_tasks_in_flight_per_actor=in_flight)
    elif num_gpus > 0:
        pool = ray.data.ActorPoolStrategy(size=max(1, int(gpus / num_gpus)), max_tasks_in_flight_per_actor=in_flight)
    else:
        # At least one actor per node with CPUs (Ray Data spreads actors over nodes): every node embeds.
        nodes = sum(1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0)
        largest = max(1, nodes, int(cpus // 2))
        pool = ray.data.ActorPoolStrategy(min_size=max(1, min(nodes, largest)), max_size=largest,
                                          max_tasks_in_flight_per_actor=in_flight)
    blocks = max(1, math.ceil(len(samples) / max(1, opts.decode_batch_size)))
    ds = ray.data.from_items(_sample_rows(samples), override_num_blocks=blocks)
    ds = ds.map_batches(
        _decode_batch,
        batch_size=opts.decode_batch_size,
        batch_format="numpy",
        num_cpus=opts.decode_cpus,
        fn_kwargs={"image_size": feature_config.image_size, "with_masks": with_masks, "storage": storage,
                   "read_threads": opts.read_threads},
    )
    return ds.map_batches(
        FeatureActor,
        batch_size=opts.feature_batch_size or feature_config.batch_size,
        batch_format="numpy",
        compute=pool,
        num_cpus=opts.actor_cpus,
        num_gpus=num_gpus or None,
        fn_constructor_kwargs={"feature_config": feature_config, "use_gpu": num_gpus > 0,
                               "threads": max(1, int(opts.actor_cpus)),
                               "output": (output, storage) if output else None},
    )


def _ray_data_run(progress: bool):
    """A context for one pipeline run: the running Ray (started here, and shut down after, when none
    is running), progress bars as asked, a CometError raised in a worker as that one line."""
    import contextlib

    import ray

    @contextlib.contextmanager
    def run():
        started = not ray.is_initialized()
        if started:
            ray.init(include_dashboard=False, log_to_driver=True)
        context = ray.data.DataContext.get_current()
        saved = context.enable_progress_bars, context.wait_for_min_actors_s
        context.enable_progress_bars = progress
        # Work starts once the pool's first actors (one per node at least) are up, so every node embeds.
        context.wait_for_min_actors_s = 600
        try:
            yield
        finally:
            context.enable_progress_bars, context.wait_for_min_actors_s = saved
            if started:
                ray.shutdown()

    return run()


def stream_to_entry(
    samples: list[Sample],
    extractor: PatchFeatureExtractor,
    output: str,
    *,
    with_masks: bool = True,
    options: StreamOptions | None = None,
    storage: StorageSpec | None = None,
    progress: bool = False,
) -> FeatureEntry:
    """Embed ``samples`` with the Ray Data pipeline into a cache entry at ``output`` (local or ``s3://``;
    on a cluster, storage every node reaches): the actors write the parts, this process the index.

    ``extractor`` (this process's) gives the entry's fingerprint, patch grid and width; the actors' own
    backbones must have the same weights, or the entry would be mislabelled (one line says so).
    """
    storage = storage or StorageSpec()
    config = extractor.config
    if not samples:
        raise CometError("no images to extract features from")
    out_fs, out_path = _output_filesystem(output, storage)
    grid = extractor.grid(config.image_size)
    index = EntryIndex(grid, extractor.feature_dim, config.cache_dtype, config.image_size, with_masks,
                       extractor.fingerprint())
    t0 = time.perf_counter()
    with _ray_data_run(progress):
        ds = build_dataset(samples, config, storage, with_masks, options or _spread_options(len(samples)), output)
        tables = _run(lambda: list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    rows = [row for table in tables for row in table.to_pylist()]
    if len(rows) != len(samples) or {r["row"] for r in rows} != set(range(len(samples))):
        raise CometError(f"the feature pipeline lost {len(samples) - len({r['row'] for r in rows})} image(s); rerun")
    other = {r["weights"] for r in rows} - {extractor.weights_source}
    if other:
        raise CometError(f"the cluster's nodes embedded with backbone weights {min(other)!r}, this process "
                         f"has {extractor.weights_source!r}: give every node the same weights (--weights FILE)")
    by_part: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["row"]):
        if row["error"]:
            index.skipped.append({"sample_id": row["sample_id"], "uri": row["uri"], "reason": row["error"]})
            continue
        if row["mask_issue"]:
            index.mask_issues.append({"sample_id": row["sample_id"], "uri": row["uri"], "reason": row["mask_issue"]})
        by_part.setdefault(row["part"], []).append(row)
    for name, part in sorted(by_part.items()):
        part.sort(key=lambda r: r["offset"])
        index.add_part(name, [r["row"] for r in part], [r["sample_id"] for r in part],
                       [r["mask_available"] for r in part] if with_masks else None, node=part[0]["node"],
                       pid=part[0]["pid"], started=part[0]["started"], finished=part[0]["finished"])
    try:
        index.write(out_fs, out_path)
    except OSError as exc:
        raise storage_error(exc, public_s3_uri(output), out_fs) from exc
    log.info("streamed %d images in %.1fs -> %s", len(samples), time.perf_counter() - t0, public_s3_uri(output))
    return FeatureEntry.open(out_fs, out_path, public_s3_uri(output))


def _spread_options(images: int) -> StreamOptions:
    """Batches (one part each) small enough that every node's actors get several: at least 4 per node with
    CPUs, at most 16 images (64 MiB of WideResNet-50 features at 288 px)."""
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0)
    size = max(1, min(16, math.ceil(images / (4 * max(1, nodes)))))
    return StreamOptions(decode_batch_size=size, feature_batch_size=size)


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
        entry = FeatureEntry.open(*_output_filesystem(output, storage), public_s3_uri(output)) if reuse else None
        if entry is None:
            entry = stream_to_entry(samples, extractor, output, with_masks=with_masks, options=options,
                                    storage=storage, progress=progress)
        return read_split(entry, ids, with_masks)
    if not samples:
        raise CometError("no images to extract features from")
    grid = extractor.grid(feature_config.image_size)
    with _ray_data_run(progress):
        ds = build_dataset(samples, feature_config, storage, with_masks, options or StreamOptions())
        return _run(lambda: _collect(ds, len(samples), grid, feature_config, with_masks))


def extract_to_entry_streaming(
    samples: list[Sample],
    extractor: PatchFeatureExtractor,
    s3_endpoint: str | None,
    with_masks: bool,
    cache_dir: str,
    progress: bool = False,
    options: StreamOptions | None = None,
    data_root: str | None = None,
) -> tuple[FeatureEntry, str]:
    """``cached_entry`` (same location, same entry) on Ray Data: the cache entry of ``samples`` in
    ``cache_dir``, embedded over every node of the cluster when there is none; and where the features
    came from."""
    location = cache_location(cache_dir, samples, extractor, with_masks)
    storage = StorageSpec.for_root(data_root, s3_endpoint)
    entry = FeatureEntry.open(*_output_filesystem(location, storage), public_s3_uri(location))
    if entry is not None:
        return entry, f"read {len(entry)} images from the cache {entry.shown}"
    entry = stream_to_entry(samples, extractor, location, with_masks=with_masks, options=options,
                            storage=storage, progress=progress)
    nodes = len({part["node"] for part in entry.parts})
    return entry, f"extracted {len(entry)} images into the cache {entry.shown} on {nodes} node(s)"


def _run(action):
    """Run a Ray Data action; a CometError raised in a worker comes back as that one line."""
    try:
        return action()
    except CometError:
        raise
    except Exception as exc:
        found = _find_comet_error(exc)
        if found is None:
            raise
        raise found from None


def _find_comet_error(exc: BaseException | None, depth: int = 0) -> CometError | None:
    """The CometError behind a Ray task failure, as a fresh one-line exception of the same kind.

    Ray keeps the worker's exception object only partly (a chained cause is not pickled), but its
    formatted traceback ends with ``comet_ray.errors.<Kind>: <message>``, which is enough.
    """
    if exc is None or depth > 10:
        return None
    if isinstance(exc, CometError):
        return StorageError(str(exc)) if isinstance(exc, StorageError) else CometError(str(exc))
    for attr in ("cause", "__cause__", "__context__"):
        inner = getattr(exc, attr, None)
        if isinstance(inner, BaseException) and inner is not exc:
            found = _find_comet_error(inner, depth + 1)
            if found is not None:
                return found
    if depth == 0:
        found = remote_error(str(exc))
        if found:
            kind, message = found
            return StorageError(message) if kind == "StorageError" else CometError(message)
    return None


# --- collecting and reading back -----------------------------------------------------------------


class _Assembler:
    """Fills features/masks for the kept rows of a stream of feature tables, in input order."""

    def __init__(self, n_rows: int, grid: tuple[int, int], config: FeatureConfig, with_masks: bool,
                 kept_rows: list[int] | None = None) -> None:
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
        raw = np.frombuffer(features.buffers()[1], dtype=np.uint8)[features.offset * width : (features.offset + len(features)) * width]
        raw = raw.reshape(len(features), width) if len(features) else raw.reshape(0, width)
        for j, row in enumerate(rows):
            row = int(row)
            self.ids[row] = ids[j]
            if errors[j]:
                self.errors[row] = {"sample_id": ids[j], "uri": uris[j], "reason": errors[j]}
                continue
            pos = self.position[row] if self.position is not None else row
            if self.features is None:
                numpy_dtype = np.int16 if self.dtype == torch.bfloat16 else torch.empty(0, dtype=self.dtype).numpy().dtype
                n_patches = self.grid[0] * self.grid[1]
                dim = width // (n_patches * np.dtype(numpy_dtype).itemsize)
                self.numpy_dtype, self.shape = numpy_dtype, (n_patches, dim)
                self.features = torch.empty((self.capacity, n_patches, dim), dtype=self.dtype)
                self._view = self.features.view(torch.int16) if self.dtype == torch.bfloat16 else self.features
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


def _output_filesystem(output: str, storage: StorageSpec) -> tuple[pafs.FileSystem, str]:
    if is_s3_uri(output):
        location = parse_s3_uri(output)
        spec = StorageSpec(storage.endpoint or location.endpoint, location.region or storage.region,
                           location.access_key or storage.access_key, location.secret_key or storage.secret_key)
        return spec.s3(), location.path
    fs, path = open_dataset_filesystem(output)
    fs.create_dir(path, recursive=True)
    return fs, path


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
