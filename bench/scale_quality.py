"""Does data parallelism keep quality? Image AUROC of N = 1 and N = 2 Ray Train workers on MVTec bottle.

N workers each take ``batch_size`` images per step from their own shard, so N = 2 trains with a global
batch twice as large and half the steps per epoch; the learning rates follow ``--set lr_scaling=...``
(default "sqrt"). Same seeds, same split, same cached features (ImageNet MobileNetV2, the offline
weights file), the README's bottle configuration at 15 % injected contamination; the runs alternate
N = 1, N = 2 per seed. Prints one line per run and per figure: the AUROCs, the mean of each N, and the
largest and mean |N=2 - N=1| gap over the seeds.

    python bench/scale_quality.py                                # seeds 0 1 2, lr_scaling sqrt
    python bench/scale_quality.py --lr-scaling none --seeds 0

Needs ../shared/data/mvtec_bottle and ../shared/weights/mobilenet_v2-b0353104.pth (or --data/--weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/support: local env, S3 server
from support import use_local_env

use_local_env()

SHARED = Path(__file__).resolve().parents[2] / "shared"


def bottle_config(data: Path, weights: Path, seed: int, lr_scaling: str, epochs: int):
    """The demo's small settings (the README's bottle configuration) on bottle at 15 % contamination."""
    from comet_ray.demo import demo_config

    config = demo_config(str(data), epochs, seed)
    config.category, config.contamination, config.device = "mvtec_bottle", 0.15, "cpu"
    config.features.weights, config.lr_scaling = str(weights), lr_scaling
    return config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2-b0353104.pth")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr-scaling", default="sqrt")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--cores", type=int, default=2, help="total CPUs: N = 1 gets them all, N = 2 half each"
    )
    args = parser.parse_args()
    if not (args.data / "mvtec_bottle").is_dir() or not args.weights.is_file():
        sys.exit(f"needs {args.data / 'mvtec_bottle'} and {args.weights}")

    import ray

    from comet_ray.distributed.train import fit_distributed

    seeds = [int(s) for s in args.seeds.split(",")]
    auroc: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="comet-scale-quality-") as tmp:
        ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
        try:
            for seed in seeds:
                config = bottle_config(args.data, args.weights, seed, args.lr_scaling, args.epochs)
                for workers in (1, 2):
                    metrics = fit_distributed(
                        config,
                        workers,
                        0,
                        args.cores / workers,
                        storage_path=f"{tmp}/ray",
                        run_name=f"s{seed}-n{workers}",
                        feature_cache=f"{tmp}/features",
                        out=f"{tmp}/out-s{seed}-n{workers}",
                    )
                    auroc[workers].append(metrics["image_auroc"])
                    print(
                        f"seed {seed} N={workers} lr_scaling {args.lr_scaling}: image AUROC "
                        f"{metrics['image_auroc']:.4f} (validation {metrics['validation_image_auroc']:.4f}, "
                        f"{metrics['train_seconds']:.0f} s)",
                        flush=True,
                    )
        finally:
            ray.shutdown()
    gaps = [abs(b - a) for a, b in zip(auroc[1], auroc[2])]
    for workers in (1, 2):
        print(f"N={workers} image AUROC mean over seeds {args.seeds}: {statistics.mean(auroc[workers]):.4f}")
    print(f"largest |N=2 - N=1| image AUROC: {max(gaps):.4f}")
    print(f"mean |N=2 - N=1| image AUROC: {statistics.mean(gaps):.4f}")


if __name__ == "__main__":
    main()
