"""Data parallelism keeps quality: N = 2 Ray Train workers (global batch twice as large, half the steps,
learning rates scaled by sqrt(2)) against N = 1 on MVTec bottle, same seed, split and cached features.

One seed here (about 2 minutes on two CPU cores); ``bench/scale_quality.py`` runs the three-seed
comparison whose figures are in the README. Skips without ../shared (real data and ImageNet weights).
"""

from __future__ import annotations

import pytest

from support import use_local_env

use_local_env()
ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.integration, pytest.mark.ray]


def test_two_workers_match_one_on_bottle(bottle_root, imagenet_torch_home, tmp_path) -> None:
    from comet_ray.demo import demo_config
    from comet_ray.distributed.train import fit_distributed

    weights = (
        imagenet_torch_home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    )  # COMET_RAY_TEST_SHARED's
    # bench/scale_quality.py's configuration: the demo's settings on bottle at 15 % contamination
    config = demo_config(str(bottle_root), epochs=8, seed=0)
    config.category, config.contamination, config.device = "mvtec_bottle", 0.15, "cpu"
    config.features.weights = str(weights)
    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False)
    try:
        runs = {
            workers: fit_distributed(
                config,
                workers,
                0,
                2 / workers,
                storage_path=str(tmp_path / "ray"),
                run_name=f"n{workers}",
                feature_cache=str(tmp_path / "features"),
                out=str(tmp_path / f"n{workers}"),
            )
            for workers in (1, 2)
        }
    finally:
        ray.shutdown()
    assert runs[1]["image_auroc"] > 0.9  # it learned (measured 0.964)
    assert abs(runs[2]["image_auroc"] - runs[1]["image_auroc"]) <= 0.02, runs  # measured 0.004
    assert abs(runs[2]["validation_image_auroc"] - runs[1]["validation_image_auroc"]) <= 0.05
