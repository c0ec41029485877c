"""BatchNorm over the global batch of data-parallel workers, for the Ray Train layer.

SimpleNet's discriminator normalises the true and fake patches of a whole batch together; with the
batch sharded over workers, plain BatchNorm would normalise each shard by its own statistics and N
workers would no longer compute what one process computes. :class:`DataParallelCollective` (what a
Ray Train worker passes to the core) converts the detector's BatchNorm layers before wrapping it in DDP.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from comet_ray.comet.collective import TorchDistributedCollective

_sync_state = threading.local()


@contextmanager
def _synchronised_statistics():
    previous = getattr(_sync_state, "active", False)
    _sync_state.active = True
    try:
        yield
    finally:
        _sync_state.active = previous


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a summed statistic is the summed gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class CrossWorkerBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of every worker (CPU/gloo).

    Why not ``nn.SyncBatchNorm``: in this torch (2.14) ``DistributedDataParallel`` refuses a module that
    contains ``SyncBatchNorm`` unless it is on a GPU ("SyncBatchNorm layers only work with GPU
    modules"), so CPU data-parallel runs (tests, CPU clusters) need their own. SimpleNet's
    discriminator normalises the true and fake patches of a whole batch together; with the batch
    sharded over workers, plain BatchNorm would normalise each shard by its own statistics and N
    workers would no longer compute what one process computes.

    Forward in training mode, inside the data-parallel wrapper only: all-reduce (per-channel sum,
    row count), then all-reduce the per-channel sum of squared deviations from the global mean (two
    passes, numerically like the single-process kernel), normalise with the biased variance, and move
    the running statistics with the unbiased one, as ``BatchNorm1d`` does. Both all-reduces are
    differentiable, so gradients through the statistics are exact too.

    It synchronises only while a forward runs through ``SyncingDistributedDataParallel`` (the main
    phase, where every rank runs the same steps in lockstep). The meta phase's private copies
    (``CometTrainer._local_copy``) and evaluation call the module directly, on one rank's tasks only,
    and so must not enter a collective: there it is plain BatchNorm1d.
    """

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> CrossWorkerBatchNorm:
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        tensors = [*bn.parameters(), *bn.buffers()]
        return new.to(tensors[0].device) if tensors else new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            self.training
            and getattr(_sync_state, "active", False)
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        local_count = x.numel() // max(x.shape[1], 1)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_tensor([float(local_count)])]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply(centered.square().sum(dims)) / count
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                tracked = float(self.num_batches_tracked)
                momentum = self.momentum if self.momentum is not None else 1.0 / tracked
                n = float(count)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d in ``module`` by ``CrossWorkerBatchNorm`` in place (root included)."""
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, CrossWorkerBatchNorm):
        return CrossWorkerBatchNorm.from_batchnorm(module)
    for name, child in list(module.named_children()):
        converted = convert_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


class SyncingDistributedDataParallel(DistributedDataParallel):
    """DDP whose forward switches ``CrossWorkerBatchNorm`` to cross-worker statistics."""

    def forward(self, *args, **kwargs):
        with _synchronised_statistics():
            return super().forward(*args, **kwargs)


class DataParallelCollective(TorchDistributedCollective):
    """``TorchDistributedCollective`` that makes BatchNorm cross-worker before wrapping in DDP.

    The conversion happens in ``wrap_model``, i.e. inside ``CometTrainer.__init__`` before the
    optimisers are built and before any state is loaded, and mutates the model in place, so the model
    ``train_category`` evaluates and saves is the converted one (same state-dict keys as plain
    BatchNorm, so saved detectors load as plain SimpleNet). On CUDA it uses ``nn.SyncBatchNorm``
    (which the core's ``_local_copy`` already turns back into plain BatchNorm for the meta phase).
    """

    def wrap_model(self, module: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        if self.world_size <= 1:
            return module  # nothing to average: DDP's per-step bucket copies would be pure cost
        if self.device.type == "cuda":
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            if converted is not module:  # only when the root itself is a BatchNorm
                raise ValueError("the detector's root module must not be a BatchNorm layer")
            return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
        if convert_batchnorm(module) is not module:
            raise ValueError("the detector's root module must not be a BatchNorm layer")
        return SyncingDistributedDataParallel(module, device_ids=None, forward_sync_buffers=False)
