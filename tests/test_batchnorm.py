"""Cross-worker BatchNorm: two gloo workers (Ray tasks, half a CPU each) compute what one process computes.

The rows of one global batch are sharded as a data-parallel run shards them (``Collective.shard_rows``, 15
rows: 8 and 7); the model goes through ``DataParallelCollective.wrap_model`` (BatchNorm made cross-worker,
then DDP). After two training steps every worker's outputs, running mean and variance, and gradients
(DDP averages them, so the world size times them) equal plain ``BatchNorm1d`` in one process on all rows.
"""

from __future__ import annotations

import socket
import sys

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.ray

ROWS, FEATURES, CHANNELS, STEPS, WORLD = 15, 5, 4, 2, 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, CHANNELS), nn.BatchNorm1d(CHANNELS, momentum=0.3), nn.Linear(CHANNELS, 1)
    )


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(ROWS, FEATURES, generator=generator) * 3 + 1 for _ in range(STEPS)]


def _steps(model: nn.Module, batches: list[torch.Tensor], rows: torch.Tensor | None = None) -> dict:
    """Forward and backward of each batch (or its ``rows``); outputs, BatchNorm buffers and gradients."""
    outputs, grads = [], []
    for batch in batches:
        model.zero_grad()
        out = model(batch if rows is None else batch[rows])
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    return {
        "outputs": outputs,
        "grads": grads,
        "mean": bn.running_mean.clone(),
        "var": bn.running_var.clone(),
    }


def _worker(rank: int, port: int) -> dict:
    import os

    import torch.distributed as dist

    from comet_ray.distributed.batchnorm import CrossWorkerBatchNorm, DataParallelCollective

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        collective = DataParallelCollective(torch.device("cpu"))
        model = _model()
        wrapped = collective.wrap_model(model)
        assert any(isinstance(m, CrossWorkerBatchNorm) for m in model.modules())
        rows = collective.shard_rows(ROWS)
        result = _steps(wrapped, _batches(), rows)
        result["outputs"] = [collective.gather_rows(out, ROWS) for out in result["outputs"]]
        return {**result, "rows": len(rows)}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_workers() -> list[dict]:
    import ray

    with pytest.MonkeyPatch.context() as env:
        for name, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():
            env.setenv(name, value)
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            address="local",
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
        try:
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is no package on workers
            task = ray.remote(num_cpus=0.5)(_worker)
            port = _free_port()
            yield ray.get([task.remote(rank, port) for rank in range(WORLD)], timeout=300)
        finally:
            ray.shutdown()


def test_two_workers_batchnorm_statistics_equal_one_process_over_the_same_rows(two_workers) -> None:
    single = _steps(_model(), _batches())
    assert [w["rows"] for w in two_workers] == [8, 7]
    for worker in two_workers:
        for step in range(STEPS):
            torch.testing.assert_close(worker["outputs"][step], single["outputs"][step], atol=1e-5, rtol=1e-5)
            for mine, one in zip(worker["grads"][step], single["grads"][step]):
                torch.testing.assert_close(mine * WORLD, one, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(worker["mean"], single["mean"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(worker["var"], single["var"], atol=1e-6, rtol=1e-5)
    # plain BatchNorm on one worker's shard would give other statistics: the comparison can tell them apart
    shard_only = _steps(_model(), [batch[::WORLD] for batch in _batches()])
    assert not torch.allclose(shard_only["mean"], single["mean"], atol=1e-3)
    assert not torch.allclose(shard_only["var"], single["var"], atol=1e-3)
