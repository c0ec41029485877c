"""Soak: 3 Ray Train trainings and 1 Tune sweep on ONE local Ray; does anything pile up between runs?

One ``ray.init`` (2 CPUs, no dashboard), then, back to back on a tiny synthetic category (random-init
MobileNetV2 at 64 px, feature_dim 32, 3 epochs, 16 training images):

    training 1..3  ``fit_distributed``, 1 Ray Train worker with 0.5 CPU, a new run name each time
                   (same storage path and feature cache, as repeated runs of one project would)
    sweep          ``tune.sweep``, 1 contamination level, 3 in-process trials (``--sweep-workers 1``:
                   each trial fits its own TorchTrainer), no seed repeats (they would train in the driver)

A sampler thread records every 0.5 s: driver RSS, RSS summed over Ray's worker processes (the
driver's descendants titled ``ray::...``: the raylet's workers, not the GCS/raylet/dashboard/agent
daemons), over the busy ones among them (not ``ray::IDLE`` in the pool) and over every Ray process,
and plasma bytes in use. At every phase boundary, after a GC in the driver and up to 15 s for Ray to
reap the run's actors and their processes, it records alive actors, placement groups, free CPUs,
temp entries, RSS and the object store.

Temp files: ``TMPDIR`` points at a private, initially empty folder before anything imports
``tempfile`` or starts Ray, so ``tempfile.gettempdir()`` of the driver and of every Ray worker is that
folder and other jobs on the machine cannot blur the count. Leaked = any new entry there other than
Ray's session folder ``ray/`` and torch's per-user inductor cache folder (``torchinductor_<user>``,
created empty by DDP, one per user and reused, not per run), plus ``*.tmp`` files and ``tmp*``
folders under the run outputs. (A writer that hard-codes ``/tmp`` would escape this.)

Alive actors come from the GCS actor table (``ray._private.state.actors()``):
``ray.util.state.list_actors`` asks the dashboard's HTTP API, which ``include_dashboard=False`` does
not start ("Failed to connect to API server"). Ray Data's detached ``AutoscalingCoordinator``
(one per cluster, ``get_if_exists``) is counted apart and must not grow. Object store bytes come from
the raylet's memory info (the figure ``ray memory --stats-only`` prints), falling back to
``cluster_resources() - available_resources()`` for ``object_store_memory``.

Bounds (exit status 1 when one is violated, so ``python bench/soak.py`` works as a check):

    DRIVER_GROWTH_MIB = 150   driver RSS after training 3 minus after training 1. The driver holds no
                              tensors; a per-run leak of anything sizeable (a feature set, a model, a
                              result grid with its dataframes) repeats every run and shows here, while
                              allocator noise (~1 MiB measured) stays far below. The driver's one-time
                              step during training 1 (Ray Train/Data imports, +110-280 MiB) is not
                              counted: training 1 is the baseline.
    WORKER_GROWTH_MIB = 300   the same for the busy Ray worker processes at the boundary (after a run
                              only the detached singleton is busy, ~190 MiB). Noise is ~1 MiB; a leaked
                              torch-loaded train worker is larger than the bound, the leaks found below
                              were ~200 MiB per cleaner and ~860 MiB for controller + DatasetManager.
    OBJECT_STORE_END_MIB = 8  plasma in use after the sweep: the runs only pass small results and
                              checkpoint paths; nothing of theirs should outlive them.
    ALIVE_ACTORS = 0          non-detached actors after every phase (Train's controller, workers and
                              DatasetManager, Tune's trial actors).
    LEAKED_GROUPS = 0         placement groups not removed after every phase, and all CPUs free.
    LEAKED_TEMP = 0           temp files/folders left by the four runs.

What it found (fixed):
  * ``TorchTrainer.fit`` called from the main thread leaves a SIGINT handler that holds the controller
    actor's handle, so the finished TrainController and its DatasetManager stayed alive until the next
    fit (alive actors 3 3 3 3; Ray worker RSS 1135 1136 1136 1059 MiB after the phases instead of
    270 270 270 192; the next Ctrl-C in the driver would only "abort" a finished run).
    ``fit_distributed`` now restores the previous handler.
  * ``--sweep-workers 1`` (``comet-ray tune --workers N``) failed at once: the per-epoch results that
    ``TuneReportCallback`` forwards had no ``objective`` (Tune's strict metric check). They now
    carry it, and the workers' final report is not forwarded (the trial reports the final result).
  * With that fixed, each trial ASHA stopped early left its Train placement group reserved (0.5 CPU:
    free CPUs 1.5 of 2 after the sweep) and Ray Train's detached PlacementGroupCleaner alive
    (~190 MiB), because the cleaner asks the state API, i.e. the dashboard, whether the controller
    died. Sweeps with Train workers on a Ray without the state API now run FIFO (warning).

Usage: python bench/soak.py [--data ROOT --category NAME | --data CATEGORY_DIR] [--trainings 3]
[--trials 3] [--epochs 3] [--sweep-workers 0] [--samples FILE.csv]
(about 2.5 minutes on 2 CPUs; 4 with --sweep-workers 1).

Measured (2 CPU cores shared with other jobs, defaults; --sweep-workers 1 in brackets where it differs):
    seconds per run training 1/2/3 and sweep       36.1 30.3 28.9 25.7  [sweep 123.8]
    driver RSS at start, after each phase          633, 876 876 877 893 MiB
    driver RSS growth training 3 vs 1              +1.0 MiB (bound 150)  [+1.3]
    Ray worker RSS after each phase                270 270 271 192 MiB (1 busy: the singleton; 1 1 1 0 idle)
    busy worker RSS growth training 3 vs 1         +0.5 MiB (bound 300)
    peak Ray worker RSS during each phase          2611 2599 2599 1897 MiB  [sweep 3495]
    object store used, peak and after each phase   0.00 MiB (a 4 MiB ray.put reads 4.00: the gauge works)
    alive actors after each phase                  0 0 0 0 (+ the detached AutoscalingCoordinator: 1 1 1 1)
    placement groups left / free CPUs              0 0 0 0 / 2 2 2 2 of 2
    leaked temp files                              0 (torchinductor_root cache: 1)
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/support: local env, S3 server
from support import use_local_env

use_local_env()

# A private temp folder for the driver and (through the raylet's environment) every Ray worker.
PRIVATE_TMP = tempfile.mkdtemp(prefix="comet-soak-")
os.environ["TMPDIR"] = PRIVATE_TMP
tempfile.tempdir = None  # re-read TMPDIR

import ray  # noqa: I001 - first: it puts its bundled psutil (ray/thirdparty_files) on sys.path
import numpy as np
import psutil

from comet_ray.config import FeatureConfig, ModelConfig, TrainConfig

DRIVER_GROWTH_MIB = 150
WORKER_GROWTH_MIB = 300
OBJECT_STORE_END_MIB = 8
ALIVE_ACTORS = 0
LEAKED_TEMP = 0
LEAKED_GROUPS = 0

MIB = 1024 * 1024
RAY_DAEMONS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
CACHE_PREFIXES = ("torchinductor_",)


# --------------------------------------------------------------------------- measurements
def ray_processes() -> tuple[list[psutil.Process], list[psutil.Process], list[psutil.Process]]:
    """(every Ray process this driver started, its worker processes, the workers not idle in the pool)."""
    everything, workers, busy = [], [], []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = (proc.cmdline() or [""])[0]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        everything.append(proc)
        if title.startswith("ray::") and not title.startswith(RAY_DAEMONS):
            workers.append(proc)
            if title != "ray::IDLE":
                busy.append(proc)
    return everything, workers, busy


def rss_sum(procs: list[psutil.Process]) -> int:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


def object_store_used() -> int:
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        return int(reply.store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001 - private API; the resource view is coarser but public
        total = ray.cluster_resources().get("object_store_memory", 0.0)
        return int(total - ray.available_resources().get("object_store_memory", 0.0))


def alive_actors() -> list[dict]:
    return [info for info in ray._private.state.actors().values() if info.get("State") == "ALIVE"]


def describe(actor: dict) -> str:
    name = f" {actor['Name']!r}" if actor.get("Name") else ""
    return f"{actor.get('ActorClassName', '?')}{name}"


def temp_entries(outputs: list[Path]) -> list[str]:
    """Temp leftovers: anything in the private TMPDIR but Ray's session folder, *.tmp / tmp* in outputs."""
    found = [os.path.join(PRIVATE_TMP, name) for name in os.listdir(PRIVATE_TMP) if name != "ray"]
    for root in outputs:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            if path.name.endswith(".tmp") or (path.is_dir() and path.name.startswith("tmp")):
                found.append(str(path))
    return sorted(found)


def is_cache(path: str) -> bool:
    """torch's per-user inductor cache folder (DDP creates it, empty): one per user, reused, not per run."""
    return os.path.dirname(path) == PRIVATE_TMP and os.path.basename(path).startswith(CACHE_PREFIXES)


class Sampler(threading.Thread):
    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.phase = "start"
        self.samples: list[dict] = []
        self.lost = 0
        self._halt = threading.Event()

    def sample(self) -> dict:
        everything, workers, busy = ray_processes()
        return {
            "t": time.perf_counter(),
            "phase": self.phase,
            "driver": psutil.Process().memory_info().rss,
            "workers": rss_sum(workers),
            "busy": rss_sum(busy),
            "ray_all": rss_sum(everything),
            "n_busy": len(busy),
            "n_idle": len(workers) - len(busy),
            "busy_pids": {proc.pid for proc in busy},
            "store": object_store_used(),
        }

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append(self.sample())
            except Exception:  # noqa: BLE001 - a sample lost while Ray shuts down is no result
                self.lost += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def peak(self, phase: str, key: str) -> int:
        return max((s[key] for s in self.samples if s["phase"] == phase), default=0)


def boundary(sampler: Sampler, outputs: list[Path], settle_s: float = 15.0) -> dict:
    """Figures at a phase boundary, after a GC and (up to ``settle_s``) for Ray to reap the run's actors
    and their processes: no alive actor but the detached singletons, no busy worker but theirs."""
    gc.collect()
    deadline = time.monotonic() + settle_s
    while True:
        actors = alive_actors()
        point = sampler.sample()
        singleton_pids = {a.get("Pid") for a in actors if a.get("IsDetached")}
        settled = all(a.get("IsDetached") for a in actors) and point["busy_pids"] <= singleton_pids
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    point["actors"] = [a for a in actors if not a.get("IsDetached")]
    point["detached"] = [a for a in actors if a.get("IsDetached")]
    point["temp"] = temp_entries(outputs)
    point["groups"] = sum(g.get("state") != "REMOVED" for g in ray.util.placement_group_table().values())
    point["cpu_free"] = ray.available_resources().get("CPU", 0.0)
    return point


# --------------------------------------------------------------------------- runs
def make_config(data_root: Path, category: str, epochs: int) -> TrainConfig:
    config = TrainConfig(
        data_root=str(data_root),
        category=category,
        contamination=0.1,
        epochs=epochs,
        passes=1,
        batch_size=4,
        device="cpu",
    )
    config.features = FeatureConfig(backbone="mobilenet_v2", image_size=64, feature_dim=32, pretrained=False)
    config.model = ModelConfig(noise_std=0.1, discriminator_hidden=32)
    config.comet.inner_steps = 1
    config.comet.meta_tasks = 2
    return config


def write_samples(path: str, samples: list[dict]) -> None:
    columns = ("t", "phase", "driver", "workers", "busy", "ray_all", "n_busy", "n_idle", "store")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        t0 = samples[0]["t"] if samples else 0.0
        for sample in samples:
            writer.writerow([f"{sample['t'] - t0:.2f}", *(sample[c] for c in columns[1:])])


def mib(value: float) -> str:
    return f"{value / MIB:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=None, help="MVTec root (with --category) or a category folder (default: synthetic)"
    )
    parser.add_argument("--category", default="weave")
    parser.add_argument("--trainings", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--sweep-workers", type=int, default=0, help="Ray Train workers per trial (0: in-process trials)"
    )
    parser.add_argument("--interval", type=float, default=0.5, help="sampler period, s")
    parser.add_argument("--samples", default=None, help="write every sample to this CSV")
    args = parser.parse_args()
    if args.trainings < 1:
        parser.error("--trainings must be >= 1")

    from comet_ray.data.synthetic import make_texture_category
    from comet_ray.distributed.train import fit_distributed
    from comet_ray.distributed.tune import SweepSettings, sweep

    work = Path(tempfile.mkdtemp(prefix="comet-soak-work-", dir=os.path.dirname(PRIVATE_TMP)))
    try:
        if args.data and (Path(args.data) / "train").is_dir():  # a category folder, e.g. mvtec_bottle
            data_root, category = Path(args.data).resolve().parent, Path(args.data).resolve().name
        elif args.data:
            data_root, category = Path(args.data), args.category
        else:
            data_root, category = work / "data", "weave"
            make_texture_category(
                data_root, category, n_train=16, n_test_good=8, defects={"spot": 10}, size=64, seed=3
            )
        config = make_config(data_root, category, args.epochs)
        storage, outputs = work / "ray", [work / "ray", work / "sweep-out"]
        before_tmp = temp_entries(outputs)

        ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False)
        ray_cpus = ray.cluster_resources().get("CPU", 0.0)
        probe = ray.put(np.zeros(4 * MIB, np.uint8))  # the gauge must see a 4 MiB object
        gauge_check = object_store_used() / MIB
        del probe
        deadline = time.monotonic() + 10.0
        while object_store_used() > 0 and time.monotonic() < deadline:  # freed asynchronously
            time.sleep(0.1)
        sampler = Sampler(args.interval)
        points: list[tuple[str, dict]] = []
        seconds: list[float] = []
        try:
            points.append(("start", boundary(sampler, outputs)))
            sampler.start()
            for i in range(1, args.trainings + 1):
                sampler.phase = f"training {i}"
                start = time.perf_counter()
                fit_distributed(
                    config,
                    workers=1,
                    cpus_per_worker=0.5,
                    storage_path=str(storage),
                    run_name=f"soak-{i}",
                    feature_cache=str(storage / "feature_cache"),
                )
                seconds.append(time.perf_counter() - start)
                points.append((sampler.phase, boundary(sampler, outputs)))
            sampler.phase = "sweep"
            start = time.perf_counter()
            settings = SweepSettings(
                levels=[0.1],
                trials=args.trials,
                storage_path=str(storage / "tune"),
                out=str(work / "sweep-out"),
                seeds=0,
                cpus_per_trial=1.0,
                workers=args.sweep_workers,
                cpus_per_worker=0.5,
                feature_cache=str(storage / "feature_cache"),
            )
            sweep(config, settings)
            seconds.append(time.perf_counter() - start)
            points.append(("sweep", boundary(sampler, outputs)))
        finally:
            sampler.stop()
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    after_shutdown = [name for name in os.listdir(PRIVATE_TMP) if name != "ray"]
    shutil.rmtree(PRIVATE_TMP, ignore_errors=True)

    if args.samples:
        write_samples(args.samples, sampler.samples)
    after = [p for _, p in points[1:]]
    phases = [name for name, _ in points[1:]]
    runs = dict(points)
    first, last, end = runs["training 1"], runs[f"training {args.trainings}"], after[-1]
    label = f"training {'/'.join(str(i) for i in range(1, args.trainings + 1))} and sweep"
    driver_growth = (last["driver"] - first["driver"]) / MIB
    worker_growth = (last["busy"] - first["busy"]) / MIB
    store_end = end["store"] / MIB
    actors = [len(p["actors"]) for p in after]
    singletons = [len(p["detached"]) for p in after]
    leaked = sorted(path for path in set(end["temp"]) - set(before_tmp) if not is_cache(path))
    caches = sorted(os.path.basename(path) for path in end["temp"] if is_cache(path))
    checks = {
        "driver": driver_growth <= DRIVER_GROWTH_MIB,
        "workers": worker_growth <= WORKER_GROWTH_MIB,
        "store": store_end <= OBJECT_STORE_END_MIB,
        "actors": all(n <= ALIVE_ACTORS for n in actors),
        "singletons": all(n <= singletons[0] for n in singletons),
        "temp": len(leaked) <= LEAKED_TEMP,
        "groups": all(p["groups"] <= LEAKED_GROUPS and p["cpu_free"] >= ray_cpus for p in after),
    }
    verdict = {k: "PASS" if v else "FAIL" for k, v in checks.items()}
    n = args.trainings

    def row(key: str, fmt=mib) -> str:
        return " ".join(fmt(p[key]) for p in after)

    def peaks(key: str, fmt=mib) -> str:
        return " ".join(fmt(sampler.peak(phase, key)) for phase in phases)

    def store(value: float) -> str:
        return f"{value / MIB:.2f}"

    def names(key: str) -> str:
        listed = {name: ", ".join(sorted(describe(a) for a in p[key])) for name, p in points[1:]}
        return "".join(f"  [{name}: {text}]" for name, text in listed.items() if text)

    print(f"soak seconds per run {label}: {' '.join(f'{s:.1f}' for s in seconds)}")
    print(f"soak driver RSS at start, after {label}: {mib(points[0][1]['driver'])}, {row('driver')} MiB")
    print(
        f"soak RSS growth training {n} vs training 1: {driver_growth:+.1f} MiB "
        f"(bound {DRIVER_GROWTH_MIB} MiB) {verdict['driver']}"
    )
    print(f"soak Ray worker RSS after {label}: {row('workers')} MiB")
    print(
        f"soak Ray worker processes after {label}: {row('n_busy', str)} busy (actors, tasks), "
        f"{row('n_idle', str)} idle in the pool"
    )
    print(f"soak busy Ray worker RSS after {label}: {row('busy')} MiB")
    print(
        f"soak busy Ray worker RSS growth training {n} vs training 1: {worker_growth:+.1f} MiB "
        f"(bound {WORKER_GROWTH_MIB} MiB) {verdict['workers']}"
    )
    print(f"soak all Ray processes RSS after {label}: {row('ray_all')} MiB")
    print(f"soak peak driver RSS during {label}: {peaks('driver')} MiB")
    print(f"soak peak Ray worker RSS during {label}: {peaks('workers')} MiB")
    print(f"soak peak object store used during {label}: {peaks('store', store)} MiB")
    print(f"soak object store used after {label}: {row('store', store)} MiB")
    print(f"soak object store gauge check: a 4 MiB ray.put read {gauge_check:.2f} MiB")
    print(
        f"soak object store used at end: {store_end:.2f} MiB (bound {OBJECT_STORE_END_MIB} MiB) "
        f"{verdict['store']}"
    )
    print(
        f"soak alive actors after each phase: {' '.join(map(str, actors))} (bound {ALIVE_ACTORS}) "
        f"{verdict['actors']}{names('actors')}"
    )
    print(
        f"soak placement groups not removed after {label}: {row('groups', str)}; free CPUs: "
        f"{row('cpu_free', lambda v: f'{v:g}')} of {ray_cpus:g} (bound {LEAKED_GROUPS}, all free) "
        f"{verdict['groups']}"
    )
    print(
        f"soak Ray's detached singleton actors after each phase: {' '.join(map(str, singletons))} "
        f"(must not grow) {verdict['singletons']}{names('detached')}"
    )
    counts = row("temp", lambda entries: str(len(entries)))
    print(f"soak temp entries after each phase: {counts} (caches: {', '.join(caches) or 'none'})")
    print(
        f"soak leaked temp files: {len(leaked)} (bound {LEAKED_TEMP}) {verdict['temp']}"
        + (f"  {leaked[:10]}" if leaked else "")
    )
    print(f"soak temp entries left after ray.shutdown (besides ray/): {len(after_shutdown)}")
    print(f"soak samples: {len(sampler.samples)} over {sum(seconds):.0f} s ({sampler.lost} failed)")
    failed = [k for k, ok in checks.items() if not ok]
    print(f"soak verdict: {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(PRIVATE_TMP, ignore_errors=True)
