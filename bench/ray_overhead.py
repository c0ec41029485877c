"""What Ray Train costs per epoch: 1 Ray Train worker vs the plain core (CometTrainer directly).

Same tiny synthetic category, same config, same thread count (1). Prints one line per figure:

    plain core          s/epoch (CometTrainer.fit, epochs after the first)
    ray worker train    s/epoch (the CometTrainer epoch itself inside the Ray worker)
    ray in-loop         s/epoch (epoch-to-epoch in the worker: training + validation AUROC +
                        checkpoint write + ray.train.report)
    ray end-to-end      s/epoch (TorchTrainer.fit wall time / epochs: adds controller and worker
                        start, data preparation in the worker, final evaluation, shutdown)
    ratios of the two Ray figures to the plain one

Usage: python bench/ray_overhead.py [--epochs 6] [--train-images 32] [--health-check-interval S]
(about 1.5 minutes on 2 CPUs).

``ray.train.report`` puts its result on a queue of size 1 that the controller drains when it polls
the workers (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, default 2 s), so an epoch much shorter
than the poll interval waits for it at the next report: on toy epochs the in-loop figure measures
the poll interval, not Ray's real per-epoch cost. ``--health-check-interval 0.25`` shows the latter.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from comet_ray.testing import use_local_env

use_local_env()

from comet_ray.comet.trainer import CometTrainer
from comet_ray.config import CometConfig, FeatureConfig, ModelConfig, TrainConfig
from comet_ray.models import build_detector
from comet_ray.pipeline import prepare_data


def write_category(root: Path, n_train: int, n_good: int = 6, n_defect: int = 8) -> None:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]
    layout = (("train", "good", n_train), ("test", "good", n_good), ("test", "dent", n_defect))
    for split, defect, count in layout:
        folder = root / "bench" / split / defect
        folder.mkdir(parents=True)
        for i in range(count):
            base = 128 + 60 * np.sin(x / 4.0 + rng.uniform(0, 6.3)) * np.cos(y / 9.0)
            pixels = np.clip(base[..., None] + rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
            if defect != "good":
                mask = np.zeros((64, 64), np.uint8)
                mask[10 + 3 * i : 24 + 3 * i, 12 + 2 * i : 28 + 2 * i] = 255
                pixels[mask > 0] = rng.integers(0, 256, 3).astype(np.uint8)
                (root / "bench" / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "bench" / "ground_truth" / defect / f"{i:03d}_mask.png")
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def make_config(data_root: Path, epochs: int) -> TrainConfig:
    return TrainConfig(
        data_root=str(data_root),
        category="bench",
        contamination=0.1,
        epochs=epochs,
        passes=1,
        batch_size=4,
        device="cpu",
        features=FeatureConfig(
            backbone="mobilenet_v2", pretrained=False, image_size=64, feature_dim=64, batch_size=16
        ),
        model=ModelConfig(discriminator_hidden=64, noise_std=0.1),
        comet=CometConfig(strategy="comet", warmup_epochs=1, meta_tasks=2, task_size=4, inner_steps=2),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-images", type=int, default=32)
    parser.add_argument(
        "--health-check-interval", type=float, default=None, help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    )
    args = parser.parse_args()
    if args.health_check_interval is not None:  # must be set before ray.init so the controller sees it
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.health_check_interval)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="comet-ray-bench-") as tmp:
        work = Path(tmp)
        write_category(work / "data", args.train_images)
        config = make_config(work / "data", args.epochs)
        cache = str(work / "features")
        device = torch.device("cpu")

        # Plain core: the same features (filling the cache the Ray worker then reads), CometTrainer.fit.
        data = prepare_data(config, device, cache_dir=cache)
        torch.manual_seed(config.seed)
        model = build_detector(config.model.model, data.feature_dim, config.model, data.grid)
        trainer = CometTrainer(model, data.train.store, config, device, None, data.injected_ids)
        logs = trainer.fit(config.epochs)
        plain = float(np.mean([log.seconds for log in logs[1:]]))  # the first epoch warms up allocators

        import ray

        from comet_ray.distributed.train import fit_distributed

        ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False)
        try:
            start = time.perf_counter()
            metrics = fit_distributed(
                config, workers=1, cpus_per_worker=1, storage_path=str(work / "ray"), run_name="bench",
                feature_cache=cache, out=str(work / "out"),
            )
            end_to_end = (time.perf_counter() - start) / config.epochs
        finally:
            ray.shutdown()
        history = json.loads((Path(metrics["out"]) / "history.json").read_text())
        ends = [e["finished_at"] for e in history]
        in_loop = float(np.mean(np.diff(ends))) if len(ends) > 1 else float("nan")
        worker_train = float(np.mean([e["seconds"] for e in history[1:]]))

    print(f"plain core      s/epoch: {plain:.4f}")
    print(f"ray worker train s/epoch: {worker_train:.4f}")
    print(f"ray in-loop     s/epoch: {in_loop:.4f}")
    print(f"ray per-epoch overhead s: {in_loop - worker_train:.4f}")
    print(f"ray end-to-end  s/epoch: {end_to_end:.4f}")
    print(f"ratio in-loop / plain:   {in_loop / plain:.2f}")
    print(f"ratio end-to-end / plain: {end_to_end / plain:.2f}")
    print(f"health check interval s: {os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S', '2.0 (default)')}")


if __name__ == "__main__":
    main()
