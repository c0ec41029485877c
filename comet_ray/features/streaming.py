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
import time

from comet_ray.config import FeatureConfig
from comet_ray.data.layout import Sample
from comet_ray.data.s3 import public_s3_uri, storage_error
from comet_ray.errors import CometError, StorageError, remote_error
from comet_ray.features.entry import EntryIndex, FeatureEntry
from comet_ray.features.extractor import PatchFeatureExtractor, cache_location

log = logging.getLogger(__name__)

from comet_ray.features.stream_stages import (
    FeatureActor,
    StorageSpec,
    StreamOptions,
    _decode_batch,
    _output_filesystem,
    _sample_rows,
)

__all__ = ["StorageSpec", "StreamOptions", "build_dataset", "extract_to_entry_streaming", "stream_to_entry"]


# --- the pipeline --------------------------------------------------------------------------------


def build_dataset(
    samples: list[Sample],
    feature_config: FeatureConfig,
    storage: StorageSpec,
    with_masks: bool,
    options: StreamOptions,
    output: str | None = None,
):
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
        pool = ray.data.ActorPoolStrategy(
            size=max(1, int(gpus / num_gpus)), max_tasks_in_flight_per_actor=in_flight
        )
    else:
        # At least one actor per node with CPUs (Ray Data spreads actors over nodes): every node embeds.
        nodes = sum(
            1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0
        )
        largest = max(1, nodes, int(cpus // 2))
        pool = ray.data.ActorPoolStrategy(
            min_size=max(1, min(nodes, largest)), max_size=largest, max_tasks_in_flight_per_actor=in_flight
        )
    blocks = max(1, math.ceil(len(samples) / max(1, opts.decode_batch_size)))
    ds = ray.data.from_items(_sample_rows(samples), override_num_blocks=blocks)
    ds = ds.map_batches(
        _decode_batch,
        batch_size=opts.decode_batch_size,
        batch_format="numpy",
        num_cpus=opts.decode_cpus,
        fn_kwargs={
            "image_size": feature_config.image_size,
            "with_masks": with_masks,
            "storage": storage,
            "read_threads": opts.read_threads,
        },
    )
    return ds.map_batches(
        FeatureActor,
        batch_size=opts.feature_batch_size or feature_config.batch_size,
        batch_format="numpy",
        compute=pool,
        num_cpus=opts.actor_cpus,
        num_gpus=num_gpus or None,
        fn_constructor_kwargs={
            "feature_config": feature_config,
            "use_gpu": num_gpus > 0,
            "threads": max(1, int(opts.actor_cpus)),
            "output": (output, storage) if output else None,
        },
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
    index = EntryIndex(
        grid,
        extractor.feature_dim,
        config.cache_dtype,
        config.image_size,
        with_masks,
        extractor.fingerprint(),
    )
    t0 = time.perf_counter()
    with _ray_data_run(progress):
        ds = build_dataset(
            samples, config, storage, with_masks, options or _spread_options(len(samples)), output
        )
        tables = _run(lambda: list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    rows = [row for table in tables for row in table.to_pylist()]
    if len(rows) != len(samples) or {r["row"] for r in rows} != set(range(len(samples))):
        raise CometError(
            f"the feature pipeline lost {len(samples) - len({r['row'] for r in rows})} image(s); rerun"
        )
    other = {r["weights"] for r in rows} - {extractor.weights_source}
    if other:
        raise CometError(
            f"the cluster's nodes embedded with backbone weights {min(other)!r}, this process "
            f"has {extractor.weights_source!r}: give every node the same weights (--weights FILE)"
        )
    by_part: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["row"]):
        if row["error"]:
            index.skipped.append({"sample_id": row["sample_id"], "uri": row["uri"], "reason": row["error"]})
            continue
        if row["mask_issue"]:
            index.mask_issues.append(
                {"sample_id": row["sample_id"], "uri": row["uri"], "reason": row["mask_issue"]}
            )
        by_part.setdefault(row["part"], []).append(row)
    for name, part in sorted(by_part.items()):
        part.sort(key=lambda r: r["offset"])
        index.add_part(
            name,
            [r["row"] for r in part],
            [r["sample_id"] for r in part],
            [r["mask_available"] for r in part] if with_masks else None,
            node=part[0]["node"],
            pid=part[0]["pid"],
            started=part[0]["started"],
            finished=part[0]["finished"],
        )
    try:
        index.write(out_fs, out_path)
    except OSError as exc:
        raise storage_error(exc, public_s3_uri(output), out_fs) from exc
    log.info(
        "streamed %d images in %.1fs -> %s", len(samples), time.perf_counter() - t0, public_s3_uri(output)
    )
    return FeatureEntry.open(out_fs, out_path, public_s3_uri(output))


def _spread_options(images: int) -> StreamOptions:
    """Batches (one part each) small enough that every node's actors get several: at least 4 per node with
    CPUs, at most 16 images (64 MiB of WideResNet-50 features at 288 px)."""
    import ray

    nodes = sum(
        1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0
    )
    size = max(1, min(16, math.ceil(images / (4 * max(1, nodes)))))
    return StreamOptions(decode_batch_size=size, feature_batch_size=size)


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
    entry = stream_to_entry(
        samples,
        extractor,
        location,
        with_masks=with_masks,
        options=options,
        storage=storage,
        progress=progress,
    )
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
