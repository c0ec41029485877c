"""The few cross-worker operations CoMet needs, behind one small interface.

The epoch loop is the same code single-process and data-parallel; only the collective differs. The
single-process one is the identity, so "distributed equals single-process" is a testable statement.
It also says which rows of a set each worker holds (:meth:`Collective.shard_rows`), so a worker's
feature store holds 1/N of the features and what it computes per row is put back together in order.
"""

from __future__ import annotations

import torch


class Collective:
    """Single process: every reduction is the identity."""

    rank: int = 0
    world_size: int = 1

    def shard_rows(self, n: int, rank: int | None = None) -> torch.Tensor:
        """The rows of a set of ``n`` that ``rank`` (default: this one) holds: every ``world_size``-th row
        from its rank on, so shards differ in size by one row at most and each is a spread of the set."""
        return torch.arange(self.rank if rank is None else rank, n, self.world_size)

    def shard_sizes(self, n: int) -> list[int]:
        """How many of ``n`` rows every rank holds, in rank order."""
        return [len(range(rank, n, self.world_size)) for rank in range(self.world_size)]

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's ``local`` (one entry per row of its :meth:`shard_rows`), as one tensor in row order."""
        gathered = self.all_gather_cat(local)
        if self.world_size == 1:
            return gathered
        order = torch.cat([self.shard_rows(n, rank) for rank in range(self.world_size)]).to(gathered.device)
        rows = torch.empty_like(gathered)
        rows[order] = gathered
        return rows

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order (sizes may differ)."""
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def wrap_model(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module the main phase runs forward/backward through (DDP when distributed)."""
        return module

    def barrier(self) -> None:
        return None


class TorchDistributedCollective(Collective):
    """``torch.distributed`` implementation (gloo on CPU, NCCL on GPU); the process group must exist."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        local = tensor.to(self.device).contiguous()
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world_size)]
        self.dist.all_gather(sizes, torch.tensor([local.shape[0]], device=self.device))
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: local.shape[0]] = local
        gathered = [torch.zeros_like(padded) for _ in range(self.world_size)]
        self.dist.all_gather(gathered, padded)
        parts = [g[: int(s)] for g, s in zip(gathered, sizes)]
        return torch.cat(parts).to(tensor.device)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        local = tensor.to(self.device).clone()
        self.dist.all_reduce(local)
        return local.to(tensor.device)

    def wrap_model(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    def barrier(self) -> None:
        self.dist.barrier()
