"""What Ray Train costs per epoch: one Ray Train worker given every core vs the plain process.

Same category, configuration, cached features and thread count (all cores) in both; the plain process
is ``train_category`` in this process with a per-epoch state save (what ``comet-ray train`` does), the
Ray run is ``fit_distributed`` with one worker of all the CPUs (what ``comet-ray train --workers 1
--cpus-per-worker C`` does: per epoch it also scores the validation split, writes a checkpoint and
reports). Seconds per epoch are epoch-to-epoch times after the first epoch, wall and the process's
CPU time (all its threads: steadier than wall time on a machine that others load); ``--repeats R``
alternates plain and Ray R times (so machine load drifts into both alike) and the medians are printed,
one line per figure.

    python bench/ray_overhead.py                 # bottle from ../shared if present (else synthetic)
    python bench/ray_overhead.py --synthetic     # a synthetic 120-image category

``ray.train.report`` puts its result on a queue of size 1 that the controller drains when it polls the
workers (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, default 2 s), so a run whose epochs are shorter
than that goes at one epoch per poll: with bottle's 2 passes (1.2 s epochs) one worker took 1.6x the
plain process's epoch time for that reason alone; with the paper's 4 passes (default here) it does not
wait. (Reporting in the background, ``CheckpointUploadMode.ASYNC``, only moves the wait: the reports
pile up and the run ends when the controller has taken them all, and a restart resumes from further
back, so comet-ray reports synchronously.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning, here and in the Ray workers (they inherit it): on a
# machine that other processes load, a spinning team whose sibling lost its core made 2-thread torch
# 4-10x slower than 1 thread (and bimodal from run to run), which would swamp every figure here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/support: local env, S3 server
from support import use_local_env

use_local_env()

from comet_ray.demo import demo_config
from comet_ray.pipeline import train_category
from comet_ray.prepare import prepare_data

SHARED = Path(__file__).resolve().parents[2] / "shared"


def category(args, work: Path):
    weights = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
    if not args.synthetic and (SHARED / "data" / "mvtec_bottle").is_dir() and weights.is_file():
        config = demo_config(str(SHARED / "data"), args.epochs, 0)
        config.category, config.contamination, config.features.weights = "mvtec_bottle", 0.15, str(weights)
    else:
        from comet_ray.data.synthetic import make_texture_category

        make_texture_category(
            work / "data", "weave", n_train=120, n_test_good=24, defects={"spot": 24}, seed=0
        )
        config = demo_config(str(work / "data"), args.epochs, 0)
        config.features.pretrained = False
    config.passes, config.device = args.passes, "cpu"
    return config


def _steps(values: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(values)]


def plain_epochs(config, cache: str, work: Path) -> tuple[list[float], list[float]]:
    """Epoch-to-epoch (wall, CPU) seconds of the plain process (state saved every epoch, as `comet-ray
    train` does)."""
    device = torch.device("cpu")
    data = prepare_data(config, device, cache_dir=cache)
    walls, cpus = [], []

    def on_epoch_end(trainer, log) -> None:
        torch.save(trainer.state_dict(), work / "plain_state.pt")
        walls.append(time.time())
        cpus.append(time.process_time())

    train_category(config, data, device, on_epoch_end=on_epoch_end)
    return _steps(walls), _steps(cpus)


def ray_epochs(
    config, cache: str, work: Path, cores: int, name: str
) -> tuple[list[float], list[float], float]:
    from comet_ray.distributed.train import fit_distributed

    start = time.perf_counter()
    metrics = fit_distributed(
        config,
        workers=1,
        cpus_per_worker=cores,
        storage_path=str(work / "ray"),
        run_name=name,
        feature_cache=cache,
        out=str(work / name),
    )
    total = time.perf_counter() - start
    history = json.loads((Path(metrics["out"]) / "history.json").read_text())
    return _steps([e["finished_at"] for e in history]), _steps([e["process_cpu_s"] for e in history]), total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--passes", type=int, default=4, help="the paper's 4: epochs longer than Ray's 2 s poll"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument(
        "--synthetic", action="store_true", help="a synthetic category even if bottle is there"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.cores)

    import ray

    with tempfile.TemporaryDirectory(prefix="comet-ray-bench-") as tmp:
        work = Path(tmp)
        config = category(args, work)
        cache = str(work / "features")
        prepare_data(config, torch.device("cpu"), cache_dir=cache)  # fill the cache once, for both
        figures: dict[str, list[float]] = {"plain wall": [], "plain cpu": [], "ray wall": [], "ray cpu": []}
        totals = []
        for repeat in range(args.repeats):
            wall, cpu = plain_epochs(
                config, cache, work
            )  # no Ray in this process meanwhile, as in `comet-ray train`
            figures["plain wall"] += wall
            figures["plain cpu"] += cpu
            ray.init(num_cpus=args.cores, include_dashboard=False, address="local", log_to_driver=False)
            try:
                wall, cpu, total = ray_epochs(config, cache, work, args.cores, f"run{repeat}")
            finally:
                ray.shutdown()
            figures["ray wall"] += wall
            figures["ray cpu"] += cpu
            totals.append(total)
    m = {key: statistics.median(values) for key, values in figures.items()}
    print(
        f"category: {config.category}, {config.epochs} epochs x {config.passes} passes, {args.cores} threads, "
        f"{args.repeats} alternations"
    )
    print(f"plain process s/epoch (wall): {m['plain wall']:.3f}")
    print(f"ray train 1 worker ({args.cores} CPUs) s/epoch (wall): {m['ray wall']:.3f}")
    print(f"ratio ray / plain (wall): {m['ray wall'] / m['plain wall']:.3f}")
    print(f"plain process CPU s/epoch: {m['plain cpu']:.3f}")
    print(f"ray train 1 worker CPU s/epoch: {m['ray cpu']:.3f}")
    print(f"ratio ray / plain (CPU): {m['ray cpu'] / m['plain cpu']:.3f}")
    print(
        f"ray end-to-end s per run (start, features read, final evaluation, shutdown): {statistics.median(totals):.1f}"
    )


if __name__ == "__main__":
    main()
