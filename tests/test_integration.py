"""Behaviour on real and on deliberately hard data: assertions that fail if CoMet stops working.

Both use the demo's small settings (MobileNetV2 at 128 px, 8 epochs) so the suite stays quick on two
CPU cores. Final numbers come from the report split only; nothing selects an epoch.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from comet_ray.data.synthetic import make_texture_category
from comet_ray.demo import demo_config
from comet_ray.pipeline import train_category
from comet_ray.prepare import prepare_data

pytestmark = pytest.mark.integration
SEEDS = (0, 1)


def run(root, category: str, contamination: float, strategy: str, seed: int, cache) -> dict:
    config = demo_config(str(root), epochs=8, seed=seed)
    config.category = category
    config.contamination = contamination
    config.comet.strategy = strategy
    data = prepare_data(config, torch.device("cpu"), cache_dir=str(cache))
    return train_category(config, data, torch.device("cpu")).metrics


def test_bottle_scl_finds_injected_anomalies_and_comet_does_no_harm(
    bottle_root, imagenet_torch_home, tmp_path_factory
):
    cache = tmp_path_factory.mktemp("bottle-features")
    baseline = [run(bottle_root, "mvtec_bottle", 0.15, "baseline", s, cache) for s in SEEDS]
    comet = [run(bottle_root, "mvtec_bottle", 0.15, "comet", s, cache) for s in SEEDS]
    for metrics in comet:
        assert metrics["achieved_contamination"] == pytest.approx(0.15, abs=0.01)
        # The proof that SCL works: the injected anomalies get clearly lower weight than the rest.
        assert metrics["mean_weight_injected"] < metrics["mean_weight_nominal"] - 0.1
    for key in ("image_auroc", "pixel_auroc"):
        base = statistics.mean(m[key] for m in baseline)
        ours = statistics.mean(m[key] for m in comet)
        assert ours >= base - 0.005, f"{key}: comet {ours:.4f} vs baseline {base:.4f}"


def test_comet_recovers_part_of_what_contamination_costs(tmp_path_factory, imagenet_torch_home):
    """A texture where one defect type sits in 20% of the training images: the baseline learns it as normal."""
    root = tmp_path_factory.mktemp("hard")
    make_texture_category(
        root, "weave", n_train=60, n_test_good=24, defects={"spot": 40, "scratch": 16}, seed=0
    )
    cache = tmp_path_factory.mktemp("hard-features")
    clean = statistics.mean(run(root, "weave", 0.0, "baseline", s, cache)["image_auroc"] for s in SEEDS)
    dirty = statistics.mean(run(root, "weave", 0.2, "baseline", s, cache)["image_auroc"] for s in SEEDS)
    ours = statistics.mean(run(root, "weave", 0.2, "comet", s, cache)["image_auroc"] for s in SEEDS)
    loss = clean - dirty
    # Measured with these defaults (bn_recalibrate on): clean 1.000, contaminated 0.952, CoMet 0.958, so
    # about 13 % recovered. BatchNorm recalibration makes both more robust: with it off the baseline falls
    # to 0.902 and CoMet to 0.920 (18 % of a larger loss), so the loss and share asserted here are smaller.
    assert loss > 0.03, f"contamination should hurt the baseline: clean {clean:.4f}, contaminated {dirty:.4f}"
    recovered = (ours - dirty) / loss
    assert recovered >= 0.10, (
        f"comet recovered {recovered:.0%} of {loss:.4f} (baseline {dirty:.4f}, comet {ours:.4f})"
    )


def test_knn_bank_without_what_scl_flags_is_no_worse_on_bottle(
    bottle_root, imagenet_torch_home, tmp_path_factory
):
    """--model knn --strategy scl against plain knn on bottle at ρ = 0.2 (defaults, seeds 0-2): pixel AUROC.

    Measured on this tree: knn 0.9827, knn + scl 0.9846 (mean of 3); leaving the flagged images out whole
    (bank_leave_out=images) gave 0.9821, below plain knn: their nominal surface is coverage the bank needs.
    """
    cache = tmp_path_factory.mktemp("bottle-knn-features")
    metrics: dict[str, list] = {"baseline": [], "scl": []}
    for seed in (0, 1, 2):
        for strategy in ("baseline", "scl"):
            config = demo_config(str(bottle_root), epochs=1, seed=seed)
            config.features.feature_dim = None  # as bench/quality.py measures it
            config.category, config.contamination = "mvtec_bottle", 0.2
            config.model.model, config.comet.strategy = "knn", strategy
            data = prepare_data(config, torch.device("cpu"), cache_dir=str(cache))
            metrics[strategy].append(train_category(config, data, torch.device("cpu")).metrics)
    for run in metrics["scl"]:
        assert run["mean_weight_injected"] < run["mean_weight_nominal"] - 0.3
        assert run["bank_patches_left_out"] > 0 and run["bank_images_left_out"] == 0
    pixel = {strategy: statistics.mean(m["pixel_auroc"] for m in runs) for strategy, runs in metrics.items()}
    assert pixel["scl"] >= pixel["baseline"], pixel
