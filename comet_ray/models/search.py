"""Nearest-bank-row search for the kNN reference: faiss on the CPU, chunked torch matmul on a GPU.

``flat`` (the default) is faiss's exact ``IndexFlatL2``: the same distances as brute force, without
the [queries x bank] distance matrix that a matmul materialises. ``hnsw`` (a graph, 32 links per
node, ``efSearch`` 64) and ``ivf`` (``4 sqrt(M)`` lists, 8 probed) are approximate: faster on large
banks, at a recall and AUROC cost that ``bench/knn_scale.py`` and the README measure. On CUDA the
features stay on the GPU and torch's matmul does the search (:func:`torch_nearest`). Queries go in
chunks of any float dtype: only one chunk is ever widened to float32.

The leave-one-out search (:func:`nearest_excluding`) asks for ``r + 1`` neighbours, ``r`` the most
bank rows any one group (image) owns, and drops the query's own group's rows: with an exact index
that is the exact nearest row of another group.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SEARCHES = ("flat", "hnsw", "ivf")
CHUNK = 8192


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).sum(dim=-1)


def torch_nearest(
    queries: torch.Tensor,
    bank: torch.Tensor,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk: int = 2048,
) -> torch.Tensor:
    """Euclidean distance from every query row [Q, D] to its nearest bank row [M, D] by chunked matmul
    (float32, on the bank's device). ``exclude = (query_groups [Q], bank_groups [M])``: a bank row of the
    query's own group is never its neighbour."""
    bank = bank.float()
    bank_norms = _squared_norms(bank)
    out = []
    for start in range(0, queries.shape[0], chunk):
        block = queries[start : start + chunk].to(bank.device).float()
        squared = torch.addmm(bank_norms[None, :], block, bank.T, alpha=-2.0).add_(
            _squared_norms(block)[:, None]
        )
        if exclude is not None:
            same = exclude[0][start : start + chunk, None].to(bank.device) == exclude[1][None, :].to(
                bank.device
            )
            squared = squared.masked_fill(same, float("inf"))
        out.append(squared.min(dim=1).values.clamp_min(0).sqrt())
    return torch.cat(out) if out else torch.zeros(0, device=bank.device)


def build_index(bank: torch.Tensor, kind: str = "flat"):
    """A faiss index over ``bank`` [M, D] (CPU)."""
    import faiss

    from comet_ray.errors import CometError

    if kind not in SEARCHES:
        raise CometError(f"unknown knn search {kind!r}; choose one of {', '.join(SEARCHES)}")
    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    data = np.ascontiguousarray(bank.detach().cpu().float().numpy())
    m, dim = data.shape
    if kind == "hnsw" and m > 1:
        index = faiss.IndexHNSWFlat(dim, 32)
        index.hnsw.efConstruction = 64
        index.hnsw.efSearch = 64
    elif kind == "ivf" and m >= 64:
        lists = max(1, min(m // 39, int(4 * math.sqrt(m))))  # faiss wants >= 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, lists)
        index.train(data)
        index.nprobe = min(8, lists)
    else:
        index = faiss.IndexFlatL2(dim)
    index.add(data)
    return index


def _search(index, block: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    return index.search(np.ascontiguousarray(block.detach().cpu().float().numpy()), k)


def nearest(queries: torch.Tensor, index, chunk: int = CHUNK) -> torch.Tensor:
    """Euclidean distance [Q] from every query row to its nearest row of ``index``'s bank."""
    out = [
        torch.from_numpy(_search(index, queries[s : s + chunk], 1)[0][:, 0].copy())
        for s in range(0, queries.shape[0], chunk)
    ]
    return torch.cat(out).clamp_min(0).sqrt() if out else torch.zeros(0)


def nearest_excluding(
    queries: torch.Tensor, query_groups: torch.Tensor, index, bank_groups: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """As :func:`nearest`, never matching a query to a bank row of its own group (leave-one-group-out)."""
    own = int(torch.bincount(bank_groups).max()) if bank_groups.numel() else 0
    k = min(own + 1, index.ntotal)
    chunk = max(1, min(chunk, (64 << 20) // (12 * k)))  # the [chunk, k] results stay under 64 MiB
    groups = bank_groups.cpu().numpy()
    out = []
    for start in range(0, queries.shape[0], chunk):
        squared, ids = _search(index, queries[start : start + chunk], k)
        mine = query_groups[start : start + chunk].cpu().numpy()[:, None]
        drop = (ids < 0) | (groups[np.clip(ids, 0, None)] == mine)
        out.append(torch.from_numpy(np.where(drop, np.inf, squared).min(axis=1)))
    return torch.cat(out).clamp_min(0).sqrt() if out else torch.zeros(0)
