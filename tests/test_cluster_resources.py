"""What comet-ray asks a cluster for: GPUs and concurrency from node types that are not up yet.

A fresh autoscaling cluster is its head alone; its GPU node types exist only in the autoscaler's
configuration, which the autoscaler publishes in the GCS (``ray._private.state``, as Ray Train reads
it). Here a real local Ray (no GPU) gets such a configuration written into its GCS: two node types,
4 GPU nodes at most, and trials, Train workers and the sweep's concurrency must follow it.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from comet_ray.distributed.resources import auto_gpus, cluster_capacity, cluster_nodes
from comet_ray.distributed.tune import SweepSettings, _max_concurrent, _training_resources
from comet_ray.errors import CometError
from comet_ray.storage import require_shared


@pytest.fixture(scope="module")
def autoscaling_ray():
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_put

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, address="local", log_to_driver=False)
    try:
        config = autoscaler_pb2.ClusterConfig()
        for name, count, resources in (
            ("gpu-spot", 4, {"CPU": 4, "GPU": 1}),
            ("cpu-ondemand", 2, {"CPU": 8}),
        ):
            group = config.node_group_configs.add(name=name, min_count=0, max_count=count)
            group.resources.update(resources)
        _internal_kv_put(
            GCS_AUTOSCALER_CLUSTER_CONFIG_KEY,
            config.SerializeToString(),
            overwrite=True,
            namespace=GCS_AUTOSCALER_STATE_NAMESPACE,
        )
        yield
    finally:
        ray.shutdown()


def test_gpus_are_asked_for_when_the_cluster_can_autoscale_them(autoscaling_ray) -> None:
    assert ray.cluster_resources().get("GPU", 0) == 0  # none up yet
    capacity = cluster_capacity()
    assert capacity["GPU"] == 4 and capacity["CPU"] == 2 * 8 + 4 * 4
    assert auto_gpus(None) == 1.0  # a trial (or a repeat) on a GPU
    assert (
        auto_gpus(None, count=4) == 1.0 and auto_gpus(None, count=5) == 0.0
    )  # one per worker, if they all fit
    assert auto_gpus(0.0) == 0.0 and auto_gpus(0.5, count=8) == 0.5  # the user's choice stands


def test_concurrency_follows_the_largest_cluster(autoscaling_ray) -> None:
    gpu_trials = SweepSettings(levels=[0.0], cpus_per_trial=1.0, gpus_per_trial=1.0)
    assert _max_concurrent(gpu_trials) == 4  # four GPU nodes at most, none up now
    assert _training_resources(gpu_trials) == {"num_cpus": 1.0, "num_gpus": 1.0}  # what each repeat reserves
    assert _max_concurrent(SweepSettings(levels=[0.0], cpus_per_trial=2.0)) == 16  # CPU trials: 32 CPUs
    assert _max_concurrent(SweepSettings(levels=[0.0], max_concurrent_trials=3, gpus_per_trial=1.0)) == 3
    train_trials = SweepSettings(
        levels=[0.0], workers=2, cpus_per_trial=0.5, cpus_per_worker=1.0, gpus_per_worker=1.0
    )
    assert _training_resources(train_trials) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert _max_concurrent(train_trials) == 2  # 2 GPUs per trial


def test_an_autoscaling_cluster_counts_as_several_nodes(autoscaling_ray, tmp_path) -> None:
    nodes = cluster_nodes()
    assert nodes >= 2  # only the head is up, but worker nodes will join: they share no disk with it
    with pytest.raises(CometError) as refused:
        require_shared(str(tmp_path / "ray"), "--storage-path", nodes)
    line = str(refused.value)
    assert "\n" not in line and "pass --storage-path s3://bucket/prefix" in line
    require_shared("s3://bucket/ray", "--storage-path", nodes)  # shared storage passes
    require_shared(str(tmp_path / "ray"), "--storage-path", 1)  # one machine: a local folder is shared
