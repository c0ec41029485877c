"""Seconds per CoMet epoch with cached features vs recomputing them every step (as the authors' code does).

Both loops run in this process on the same images, model and schedule; only where features come from
differs, so the printed ratio is the speed-up the feature cache buys. With a GPU, ``--gpu`` also times
the paper's full schedule end to end on a 200-image category.

    python bench/train_speed.py                       # bottle from ../shared if present, else synthetic
    python bench/train_speed.py --gpu                 # adds the full-schedule GPU figure
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from comet_ray.comet.trainer import CometTrainer
from comet_ray.config import FeatureConfig, ModelConfig, TrainConfig
from comet_ray.data.images import load_samples
from comet_ray.data.layout import build_sample_table, open_dataset_filesystem
from comet_ray.data.synthetic import make_texture_category
from comet_ray.features.extractor import PatchFeatureExtractor, extract_features
from comet_ray.features.store import FeatureStore
from comet_ray.models import build_detector

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_bottle"


class RecomputingStore(FeatureStore):
    """A store that runs the frozen backbone on every read: the uncached baseline."""

    def __init__(self, ids, images: torch.Tensor, extractor: PatchFeatureExtractor, grid) -> None:
        self.images = images
        self.extractor = extractor
        dim = extractor.feature_dim
        super().__init__(ids, torch.zeros(len(ids), grid[0] * grid[1], dim), grid)

    def batch(self, rows: torch.Tensor, device="cpu") -> torch.Tensor:
        return self.extractor(self.images.index_select(0, rows)).to(device).clone()  # leave inference mode


def dataset(args) -> tuple[str, str]:
    if BOTTLE.is_dir() and not args.synthetic:
        return str(BOTTLE.parent), "mvtec_bottle"
    root = Path(tempfile.mkdtemp(prefix="comet-bench-"))
    make_texture_category(root, "weave", n_train=args.n_train, n_test_good=10, defects={"spot": 10}, size=160)
    return str(root), "weave"


def epoch_seconds(store: FeatureStore, config: TrainConfig, dim: int, device, epochs: int) -> float:
    torch.manual_seed(0)
    trainer = CometTrainer(build_detector("simplenet", dim, config.model), store, config, device)
    trainer.train_epoch()  # warm-up epoch (unweighted) excluded from the timing
    start = time.perf_counter()
    for _ in range(epochs):
        trainer.train_epoch()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / epochs


def cached_vs_uncached(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    root, category = dataset(args)
    filesystem, _ = open_dataset_filesystem(root)
    samples = [s for s in build_sample_table(root, category, filesystem) if s.split == "train"][
        : args.n_train
    ]
    features = FeatureConfig(
        backbone=args.backbone, image_size=args.image_size, feature_dim=args.feature_dim, pretrained=False
    )
    extractor = PatchFeatureExtractor(features, device)
    config = TrainConfig(epochs=args.epochs + 1, passes=1, batch_size=8)
    config.model = ModelConfig(noise_std=0.1, discriminator_hidden=args.hidden)
    config.comet.meta_tasks, config.comet.inner_steps = 2, 2

    start = time.perf_counter()
    cached = extract_features(samples, extractor, filesystem).store.to(device)
    extract_s = time.perf_counter() - start
    loaded = load_samples(samples, args.image_size, filesystem, with_masks=False)
    uncached = RecomputingStore(loaded.sample_ids, loaded.images, extractor, cached.grid)

    cached_s = epoch_seconds(cached, config, extractor.feature_dim, device, args.epochs)
    uncached_s = epoch_seconds(uncached, config, extractor.feature_dim, device, args.epochs)
    tag = f"{category} n={len(samples)} {args.backbone}@{args.image_size} {device.type}"
    print(f"feature extraction once: {extract_s:.2f} s ({len(samples) / extract_s:.1f} img/s) [{tag}]")
    print(f"epoch with cached features: {cached_s:.2f} s [{tag}]")
    print(f"epoch recomputing features: {uncached_s:.2f} s [{tag}]")
    print(f"speed-up from caching: {uncached_s / cached_s:.1f}x [{tag}]")


def gpu_full_schedule(args) -> None:
    if not torch.cuda.is_available():
        print("gpu full schedule: skipped, CUDA is not available on this machine", file=sys.stderr)
        return
    from comet_ray.pipeline import train_category
    from comet_ray.prepare import prepare_data

    root = Path(tempfile.mkdtemp(prefix="comet-bench-gpu-"))
    make_texture_category(root, "weave", n_train=200, n_test_good=40, defects={"spot": 40}, size=512)
    config = TrainConfig(data_root=str(root), category="weave", contamination=0.1, epochs=40, passes=4)
    config.features = FeatureConfig(
        backbone="wide_resnet50_2", image_size=288, pretrained=False, batch_size=64
    )
    device = torch.device("cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    data = prepare_data(config, device)
    result = train_category(config, data, device)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    print(
        f"gpu end-to-end, 200-image category, 40x4 schedule: {total:.1f} s "
        f"(train {result.metrics['train_seconds']:.1f} s, image AUROC {result.metrics['image_auroc']:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--feature-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    parser.add_argument(
        "--synthetic", action="store_true", help="use a synthetic category even if bottle exists"
    )
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="also time the full paper schedule on a GPU")
    args = parser.parse_args()
    cached_vs_uncached(args)
    if args.gpu:
        gpu_full_schedule(args)


if __name__ == "__main__":
    main()
