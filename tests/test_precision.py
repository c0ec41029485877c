"""bf16 autocast gives the same detector quality as float32 (the GPU path's numerical parity, checked on CPU)."""

from __future__ import annotations

import pytest
import torch

from comet_ray.config import use_bf16
from comet_ray.data.synthetic import make_texture_category
from comet_ray.demo import demo_config
from comet_ray.pipeline import train_category
from comet_ray.prepare import prepare_data


def test_precision_setting() -> None:
    assert use_bf16("auto", "cuda") and not use_bf16("auto", "cpu")
    assert use_bf16("bf16", "cpu") and not use_bf16("fp32", "cuda")
    with pytest.raises(ValueError):
        use_bf16("fp8", "cpu")


@pytest.mark.integration  # two trainings per seed on ImageNet features (../shared)
def test_bf16_autocast_matches_fp32_image_auroc(tmp_path, imagenet_torch_home) -> None:
    """Same data, same seeds, the whole training and scoring under bf16 autocast vs float32."""
    make_texture_category(
        tmp_path, "weave", n_train=40, n_test_good=60, defects={"spot": 40, "scratch": 30}, size=128, seed=5
    )
    gaps = []
    for seed in (0, 1):
        results = {}
        for precision in ("fp32", "bf16"):
            config = demo_config(str(tmp_path), epochs=6, seed=seed)
            config.precision = precision
            data = prepare_data(config, torch.device("cpu"), cache_dir=str(tmp_path / "cache"))
            results[precision] = train_category(config, data, torch.device("cpu")).metrics["image_auroc"]
        gaps.append(results["bf16"] - results["fp32"])
    assert abs(sum(gaps) / len(gaps)) <= 0.005, gaps
