"""Data-parallel scaling on a feature-only category: memory and throughput per worker for N workers.

A category of K training images with random fp16 features at WideResNet-50 size (1296 patches x 1536
dims per image, 3.8 MiB each; no backbone, so it runs anywhere) is written once as a feature cache
entry on local disk. Then, for each N, a Ray Train run of N workers on the same total cores (CPU:
all cores / N each, torch on that many threads; GPU: one GPU each) reads its shard from the entry and
trains CoMet epochs with the core's CometTrainer, exactly as ``comet-ray train --workers N`` does
after extraction. Per N it prints one line per figure: each worker's peak RSS and its RSS before it
loaded anything (the interpreter, torch and Ray), the features it held, seconds per epoch (the slowest
worker's mean over the timed epochs after the first), images per second per core (per GPU on GPUs),
and then the ratios of N = 2 (every N on GPUs) to N = 1. ``--repeats R`` alternates the N's R times
(1 2 1 2 ...) so machine load drifts into both alike; the medians are printed.

    python bench/scale.py                          # K = 768, N = 1, 2 on the CPUs (about 10 minutes on 2 cores)
    python bench/scale.py --images 64              # a quick look

On a GPU machine N runs from 1 to the number of GPUs; peak GPU memory per worker is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Idle OpenMP threads sleep instead of spinning, here and in the Ray workers (they inherit it): on a
# machine that other processes load, a spinning team whose sibling lost its core made 2-thread torch
# 4-10x slower than 1 thread (and bimodal from run to run), which would swamp every figure here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/support: local env, S3 server
from support import use_local_env

use_local_env()

PATCHES, DIM = 1296, 1536  # WideResNet-50-2 at 288 px: a 36 x 36 grid of 1536-wide patches
GRID = (36, 36)


def write_entry(path: str, images: int, part_size: int = 32) -> None:
    """K images of random fp16 features as a cache entry (parts of ``part_size``), without a backbone."""
    import pyarrow.fs as pafs

    from comet_ray.features.entry import EntryIndex, as_numpy, part_name, write_part

    fs = pafs.LocalFileSystem()
    index = EntryIndex(GRID, DIM, "float16", 288, False, {"backbone": "random features (bench/scale.py)"})
    generator = torch.Generator().manual_seed(0)
    for first in range(0, images, part_size):
        count = min(part_size, images - first)
        features = torch.randn((count, PATCHES, DIM), generator=generator).to(torch.float16)
        name = part_name(first, first + count - 1)
        write_part(fs, path, name, as_numpy(features))
        index.add_part(
            name, range(first, first + count), [f"train/good/{i:06d}" for i in range(first, first + count)]
        )
    index.write(fs, path)


def memory_mib() -> dict[str, float]:
    """This process's resident memory now and at its peak (MiB)."""
    status = Path("/proc/self/status").read_text().splitlines()
    values = {line.split(":")[0]: float(line.split()[1]) / 1024 for line in status if line.startswith("Vm")}
    return {"rss": values.get("VmRSS", float("nan")), "peak": values.get("VmHWM", float("nan"))}


def worker_loop(config: dict) -> dict | None:
    """One Ray Train worker: read this worker's shard of the entry, train ``epochs`` CoMet epochs."""
    import pyarrow.fs as pafs
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from comet_ray.comet.collective import Collective
    from comet_ray.comet.trainer import CometTrainer
    from comet_ray.config import TrainConfig
    from comet_ray.distributed.batchnorm import DataParallelCollective
    from comet_ray.features.entry import FeatureEntry
    from comet_ray.features.store import place_store
    from comet_ray.models import build_detector

    start = memory_mib()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    collective = DataParallelCollective(device) if dist.is_initialized() else Collective()
    entry = FeatureEntry.open(pafs.LocalFileSystem(), config["entry"])
    store = entry.store(entry.ids, collective.shard_rows(len(entry)) if collective.world_size > 1 else None)
    store = place_store(store, device)
    loaded = memory_mib()
    train_config = TrainConfig.from_dict(config["train_config"])
    torch.manual_seed(train_config.seed)
    model = build_detector("simplenet", DIM, train_config.model, GRID)
    trainer = CometTrainer(model, store, train_config, device, collective)
    seconds = []
    for _ in range(train_config.epochs):
        begin = time.perf_counter()
        trainer.train_epoch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - begin)
    timed = seconds[1:] or seconds
    gpu_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    mine = torch.tensor(
        [
            [
                memory_mib()["peak"],
                start["rss"],
                store.nbytes / 2**20,
                float(np.mean(timed)),
                gpu_peak,
                loaded["peak"],
            ]
        ],
        dtype=torch.float64,
    )
    every = collective.all_gather_cat(mine)
    ray.train.report({"done": True})
    return every.tolist() if collective.rank == 0 else None


def run(workers: int, entry: str, cores: int, gpus: int, args, storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from comet_ray.config import ModelConfig, TrainConfig

    train_config = TrainConfig(
        epochs=args.epochs,
        passes=1,
        batch_size=args.batch_size,
        precision=args.precision,
        model=ModelConfig(discriminator_hidden=args.hidden),
    )
    train_config.comet.meta_tasks = args.meta_tasks
    threads = max(1, cores // workers)
    resources = {"CPU": cores / workers, **({"GPU": 1} if gpus else {})}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"entry": entry, "train_config": train_config.to_dict(), "threads": threads},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus), resources_per_worker=resources),
        run_config=RunConfig(name=f"scale-{workers}-{time.time_ns()}", storage_path=storage),
    )
    rows = trainer.fit().return_value
    peaks, starts, held, epoch_s, gpu_peaks, loaded = (list(column) for column in zip(*rows))
    images = args.images
    per_unit = gpus if gpus else cores
    return {
        "peak_rss_mib": max(peaks),
        "start_rss_mib": max(starts),
        "loaded_peak_mib": max(loaded),
        "held_mib": max(held),
        "epoch_s": max(epoch_s),
        "images_per_s_per_core": images / max(epoch_s) / per_unit,
        "gpu_peak_mib": max(gpu_peaks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=768, help="training images K")
    parser.add_argument(
        "--epochs", type=int, default=1, help="epochs per run; with more, the first is not timed"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--hidden", type=int, default=256, help="SimpleNet discriminator width")
    parser.add_argument("--meta-tasks", type=int, default=2)
    parser.add_argument(
        "--precision", default="bf16", help="bf16 (autocast, CPUs too), fp32, or auto (bf16 on GPUs)"
    )
    parser.add_argument("--workers", default=None, help="comma-separated N's (default: 1,2 on CPUs, 1..GPUs)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the N's this many times; medians")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="total CPU cores the workers share")
    args = parser.parse_args()

    import ray

    gpus = torch.cuda.device_count()
    counts = (
        [int(n) for n in args.workers.split(",")]
        if args.workers
        else (list(range(1, gpus + 1)) if gpus else [1, 2])
    )
    with tempfile.TemporaryDirectory(prefix="comet-scale-") as tmp:
        entry = str(Path(tmp) / "entry")
        start = time.perf_counter()
        write_entry(entry, args.images)
        size = args.images * PATCHES * DIM * 2 / 2**30
        print(
            f"category: {args.images} images x {PATCHES} x {DIM} fp16 = {size:.2f} GiB "
            f"(written in {time.perf_counter() - start:.0f} s); {args.cores} cores, {gpus} GPUs; SimpleNet "
            f"hidden {args.hidden}, batch {args.batch_size} per worker, {args.precision}, {args.epochs} epoch(s)"
        )
        ray.init(num_cpus=args.cores, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        try:
            results: dict[int, list[dict]] = {n: [] for n in counts}
            for _ in range(args.repeats):
                for n in counts:
                    results[n].append(
                        run(n, entry, args.cores, gpus if gpus else 0, args, str(Path(tmp) / "ray"))
                    )
        finally:
            ray.shutdown()
    median = {
        n: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for n, runs in results.items()
    }
    unit = "GPU" if gpus else "core"
    for n in counts:
        m = median[n]
        print(f"N={n} peak RSS per worker MiB: {m['peak_rss_mib']:.0f}")
        print(f"N={n} RSS per worker before loading MiB: {m['start_rss_mib']:.0f}")
        print(f"N={n} features held per worker MiB: {m['held_mib']:.0f}")
        print(f"N={n} peak RSS per worker once loaded (before training) MiB: {m['loaded_peak_mib']:.0f}")
        if gpus:
            print(f"N={n} peak GPU memory per worker MiB: {m['gpu_peak_mib']:.0f}")
        print(f"N={n} epoch s: {m['epoch_s']:.1f}")
        print(f"N={n} images/s per {unit}: {m['images_per_s_per_core']:.3f}")
    base = median[counts[0]]
    for n in counts[1:]:
        m = median[n]
        print(
            f"ratio peak RSS per worker N={n}/N={counts[0]}: {m['peak_rss_mib'] / base['peak_rss_mib']:.3f}"
        )
        grown = (m["peak_rss_mib"] - m["start_rss_mib"]) / (base["peak_rss_mib"] - base["start_rss_mib"])
        print(f"ratio peak RSS above the worker's start N={n}/N={counts[0]}: {grown:.3f}")
        print(
            f"ratio images/s per {unit} N={n}/N={counts[0]}: "
            f"{m['images_per_s_per_core'] / base['images_per_s_per_core']:.3f}"
        )


if __name__ == "__main__":
    main()
