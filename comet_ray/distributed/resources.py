"""What the Ray cluster has, or can get: nodes, GPUs and capacity, autoscaling node types included.

An autoscaling cluster (``clusters/aws-gpu.yaml``, KubeRay) starts with its head alone: GPU nodes
appear only once work asks for GPUs. Reading ``ray.cluster_resources()`` alone, a fresh cluster has
no GPU, so trials would never ask for one and no GPU node would ever start. The autoscaler publishes
its node types (resources and maximum count of each) in the GCS; Ray Train reads them through
``ray._private.state`` to check a worker group can ever fit, and so does this module.
"""

from __future__ import annotations


def _autoscaler_config():
    """The autoscaler's node types as the GCS holds them, or None (a fixed cluster, a local Ray)."""
    try:
        from ray._private.state import state

        return state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler, or a Ray without this record
        return None


def cluster_capacity() -> dict[str, float]:
    """The most of each resource the cluster has now or can scale up to (per resource: the larger)."""
    import ray

    current = {k: float(v) for k, v in ray.cluster_resources().items()}
    configured = {}
    if _autoscaler_config() is not None:
        from ray._private.state import state

        configured = {k: float(v) for k, v in (state.get_max_resources_from_cluster_config() or {}).items()}
    return {key: max(current.get(key, 0.0), configured.get(key, 0.0)) for key in {*current, *configured}}


def cluster_nodes() -> int:
    """How many nodes the cluster has or may get: 1 is a single machine; autoscaling node types count as more."""
    import ray

    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    config = _autoscaler_config()
    if config is not None and any(group.max_count != 0 for group in config.node_group_configs):
        return max(alive, 2)
    return alive


def auto_gpus(requested: float | None, count: int = 1) -> float:
    """GPUs for each of ``count`` workers (or one trial): ``requested`` as given; when None ("auto"),
    1 if the cluster has or can get a GPU for each of them, else 0 (train on CPUs)."""
    if requested is not None:
        return float(requested)
    return 1.0 if cluster_capacity().get("GPU", 0.0) >= count else 0.0
