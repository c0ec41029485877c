"""One CoMet category end to end on a GPU, next to the bare-PyTorch ceiling measured in the same run.

Builds a synthetic 200-train / 80-test category of 512 px images, runs CoMet's full default schedule
(WideResNet-50-2 at 288 px, 40 epochs x 4 passes, SCL + meta + main phases, final evaluation) and
prints one line per figure: feature img/s, head img/s, seconds per epoch, end-to-end seconds, peak
GPU memory, then the bare ceiling loops (trunk forward; SimpleNet head step on cached features, both
bf16 + channels_last, batch 64) and the ratios. Needs only torch/torchvision (no Ray).

    python bench/gpu.py            # on a GPU machine
    python bench/gpu.py --quick    # tiny settings: checks the script itself (used on CPU)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout without installing

from comet_ray.config import FeatureConfig, TrainConfig
from comet_ray.data.synthetic import make_texture_category
from comet_ray.features.aggregation import aggregate_patches
from comet_ray.features.backbone import build_backbone
from comet_ray.models.simplenet import SimpleNet
from comet_ray.pipeline import train_category
from comet_ray.prepare import prepare_data


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ceiling_trunk(device: torch.device, backbone: str, size: int, batch: int, steps: int) -> float:
    """Bare frozen-trunk throughput (img/s): the most feature extraction could reach."""
    trunk, _ = build_backbone(backbone, pretrained=False)
    trunk = trunk.to(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        trunk = trunk.to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, size, size, device=device)
    if on_cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
        trunk(images)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            maps = trunk(images)
            aggregate_patches(
                maps,
                1536 if backbone == "wide_resnet50_2" else 256,
                1536 if backbone == "wide_resnet50_2" else 256,
            )
        sync(device)
    return batch * steps / (time.perf_counter() - start)


def ceiling_head(device: torch.device, patches: int, dim: int, batch: int, steps: int) -> float:
    """Bare SimpleNet head training step on cached features (img/s): no CoMet, no seeding, no bookkeeping."""
    model = SimpleNet(dim).to(device)
    optimisers = model.make_optimizers()
    features = torch.randn(batch, patches, dim, device=device)
    on_cuda = device.type == "cuda"

    def step() -> None:
        for o in optimisers:
            o.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            adapted = model.adaptor(features)
            scores = model._discriminate(torch.cat([adapted, adapted + 0.015 * torch.randn_like(adapted)]))
            true_scores, fake_scores = scores.chunk(2)
            loss = (torch.clamp(0.5 - true_scores, min=0) + torch.clamp(0.5 + fake_scores, min=0)).mean()
        loss.backward()
        for o in optimisers:
            o.step()

    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings to check the script (CPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        print("CUDA is not available: running a CPU check with tiny settings; the GPU figures await a GPU")
        args.quick = True
    if args.quick:
        n_train, n_good, n_bad, size, image, backbone, epochs, passes = (
            16,
            8,
            8,
            128,
            64,
            "mobilenet_v2",
            2,
            1,
        )
    else:
        n_train, n_good, n_bad, size, image, backbone, epochs, passes = (
            200,
            40,
            40,
            512,
            288,
            "wide_resnet50_2",
            40,
            4,
        )

    root = Path(tempfile.mkdtemp(prefix="comet-gpu-bench-"))
    make_texture_category(
        root, "weave", n_train=n_train, n_test_good=n_good, defects={"spot": n_bad}, size=size
    )
    config = TrainConfig(
        data_root=str(root), category="weave", epochs=epochs, passes=passes, validation_fraction=0.3
    )
    config.features = FeatureConfig(backbone=backbone, image_size=image, pretrained=False, batch_size=64)
    if args.quick:
        config.features.feature_dim = 64
        config.model.discriminator_hidden = 64
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    data = prepare_data(config, device)
    sync(device)
    features_s = time.perf_counter() - start
    n_images = len(data.train.store) + len(data.validation.store) + len(data.report.store)
    result = train_category(config, data, device)
    sync(device)
    total_s = time.perf_counter() - start
    epoch_s = result.metrics["train_seconds"] / epochs
    head_img_s = len(data.train.store) * passes / max(epoch_s, 1e-9)
    feature_img_s = n_images / features_s
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"feature extraction: {feature_img_s:.0f} img/s (decode + trunk + aggregation, {n_images} images)")
    print(f"head training: {head_img_s:.0f} img/s (main-phase images per second of epoch time)")
    print(f"seconds per epoch: {epoch_s:.3f}")
    print(f"end-to-end: {total_s:.1f} s (image AUROC {result.metrics['image_auroc']:.3f})")
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    steps = 3 if args.quick else 20
    trunk_ceiling = ceiling_trunk(device, backbone, image, 8 if args.quick else 64, steps)
    head_ceiling = ceiling_head(
        device, data.train.store.num_patches, data.feature_dim, 8 if args.quick else 64, steps
    )
    print(f"ceiling trunk: {trunk_ceiling:.0f} img/s (bare loop, batch {8 if args.quick else 64})")
    print(f"ceiling head step: {head_ceiling:.0f} img/s (bare loop)")
    print(f"feature ratio (ours / ceiling): {feature_img_s / trunk_ceiling:.2f}")
    print(f"head ratio (ours / ceiling): {head_img_s / head_ceiling:.2f}")
    ceiling_total = n_images / trunk_ceiling + len(data.train.store) * passes * epochs / head_ceiling
    print(f"end-to-end vs ceiling schedule ({ceiling_total:.1f} s): {total_s / ceiling_total:.1f}x")


if __name__ == "__main__":
    main()
