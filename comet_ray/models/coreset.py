"""Greedy k-center coresets of memory-bank size: exact, and per part with a merge-reduce (the default).

PatchCore's greedy k-center adds, ``size`` times, the point farthest from everything chosen so far:
one pass over every patch per bank row, so ``size x n`` distance evaluations (604k patches and a 10 %
bank: 60k Python iterations over a 604k-row array, minutes to hours on a CPU). The fast coreset is the
composable-coreset form of the same rule (Indyk et al., PODS 2014): the patches are split at random into
parts of about ``part_rows`` rows, greedy k-center picks each part's share of the bank within the part
(``size x part_rows`` evaluations in all, on a part that fits in the CPU cache, several parts per
batched step), and the parts' selections are the bank. With ``oversample`` > 1 each part picks that many
times its share and a reduce step runs the same per-part greedy again on their union, down to ``size``.
Both run on a fixed random projection of the features to ``projection_dim`` dimensions (PatchCore's
128; it only picks the rows, the bank holds the full features), computed part by part from the stored
dtype: the patches are never widened to float32 all at once. Every draw comes from ``generator``.
"""

from __future__ import annotations

import math

import torch

CORESETS = (
    "auto",
    "fast",
    "exact",
    "random",
    "greedy",
)  # greedy: the exact one's earlier name (saved models)
# auto: the exact greedy where it costs at most this many patch-to-centre distances (n x size; ELPV's
# 25.6k patches: 6.6e7, about 10 s on two CPU cores), the per-part one above (bottle's 53.5k: 40 s exact).
EXACT_BUDGET = 1e8
PART_ROWS = 4096  # a part's projected rows: 4096 x 128 float32 = 2 MiB, in cache
BATCH_BYTES = 16 << 20  # projected parts per batched greedy step, up to this many bytes


def projection_for(dim: int, projection_dim: int, generator: torch.Generator) -> torch.Tensor | None:
    """A fixed random projection [dim, projection_dim] (None: select on the features themselves)."""
    if not projection_dim or projection_dim >= dim:
        return None
    return torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)


def project(patches: torch.Tensor, rows: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """float32 points of ``patches[rows]`` (projected), without widening more than those rows."""
    points = patches[rows.to(patches.device)].float()
    return points if projection is None else points @ projection.to(points.device)


def exact_greedy(points: torch.Tensor, size: int, generator: torch.Generator, bar=None) -> torch.Tensor:
    """Greedy k-center on all ``points`` [n, d] (float32): ``size`` row indices, in order of choice."""
    n = points.shape[0]
    norms = points.pow(2).sum(dim=-1)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    # Greedy k-center: always add the point farthest from everything chosen so far.
    nearest = (norms - 2.0 * points @ points[chosen[0]] + norms[chosen[0]]).clamp_min(0)
    for i in range(1, size):
        chosen[i] = int(nearest.argmax())
        distance = (norms - 2.0 * points @ points[chosen[i]] + norms[chosen[i]]).clamp_min(0)
        nearest = torch.minimum(nearest, distance)
        if bar is not None and i % 256 == 0:
            bar.update(256)
    return chosen


def batched_greedy(
    points: torch.Tensor, valid: torch.Tensor, shares: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Greedy k-center in B parts at once: ``points`` [B, m, d], ``valid`` [B, m] (padding: False),
    ``shares`` [B] rows to pick per part. Returns [B, max(shares)] positions (a part's first ``share``)."""
    parts, m, _ = points.shape
    steps = int(shares.max())
    norms = points.pow(2).sum(dim=-1)
    columns = points.transpose(1, 2).contiguous()  # [B, d, m]: a row-vector bmm runs at mat-vec speed
    counts = valid.sum(dim=1)
    first = (torch.rand(parts, generator=generator) * counts).long().clamp_max(counts - 1)
    chosen = torch.empty(parts, steps, dtype=torch.long)
    nearest = torch.full((parts, m), float("inf"))
    nearest[~valid] = -1.0  # padding is never chosen
    index = torch.arange(parts)
    current = first
    for i in range(steps):
        chosen[:, i] = current
        centre = points[index, current]  # [B, d]
        distance = torch.bmm(centre[:, None, :], columns)[:, 0, :].mul_(-2.0).add_(norms)
        distance.add_(norms[index, current][:, None]).clamp_min_(0)
        nearest = torch.minimum(nearest, distance, out=nearest)
        current = nearest.argmax(dim=1)
    return chosen


def split_shares(total: int, sizes: list[int]) -> list[int]:
    """``total`` spread over parts of ``sizes`` in proportion (largest remainders), each at most its size."""
    n = sum(sizes)
    exact = [total * s / n for s in sizes]
    shares = [min(int(e), s) for e, s in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: shares[i] - exact[i])
    for i in order[: total - sum(shares)]:
        shares[i] = min(shares[i] + 1, sizes[i])
    return shares


def per_part_greedy(
    patches: torch.Tensor,
    rows: torch.Tensor,
    size: int,
    generator: torch.Generator,
    projection: torch.Tensor | None,
    part_rows: int = PART_ROWS,
    bar=None,
) -> torch.Tensor:
    """Rows of ``patches`` (a subset of ``rows``, ``size`` of them): a random split of ``rows`` into parts
    of about ``part_rows``, each part's share picked by greedy k-center within the part."""
    n = rows.numel()
    order = rows[torch.randperm(n, generator=generator)]
    count = max(1, math.ceil(n / part_rows))
    sizes = [len(range(i, n, count)) for i in range(count)]  # every count-th row: sizes differ by one at most
    shares = split_shares(size, sizes)
    m = sizes[0]
    dim = patches.shape[1] if projection is None else projection.shape[1]
    batch = max(1, BATCH_BYTES // (m * dim * 4))
    picked = []
    for start in range(0, count, batch):
        group = range(start, min(start + batch, count))
        points = torch.zeros(len(group), m, dim)
        valid = torch.zeros(len(group), m, dtype=torch.bool)
        members = torch.zeros(len(group), m, dtype=torch.long)
        for slot, part in enumerate(group):
            member = order[part::count]
            points[slot, : member.numel()] = project(patches, member, projection).cpu()
            valid[slot, : member.numel()] = True
            members[slot, : member.numel()] = member
        group_shares = torch.tensor([shares[p] for p in group])
        chosen = batched_greedy(points, valid, group_shares, generator)
        for slot, share in enumerate(group_shares.tolist()):
            picked.append(members[slot, chosen[slot, :share]])
        if bar is not None:
            bar.update(int(group_shares.sum()))
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)


def coreset_rows(
    patches: torch.Tensor,
    size: int,
    method: str,
    generator: torch.Generator,
    projection_dim: int = 128,
    part_rows: int = PART_ROWS,
    oversample: float = 1.0,
    progress: bool | None = False,
) -> torch.Tensor:
    """Sorted row indices of a ``size``-row coreset of ``patches`` [N, D] (any float dtype, any device);
    ``progress``: a bar with an estimate on stderr (None: when stderr is a terminal)."""
    from comet_ray.errors import CometError

    n = patches.shape[0]
    size = max(1, min(size, n))
    if method not in CORESETS:
        raise CometError(f"unknown coreset {method!r}; choose one of {', '.join(CORESETS[:4])}")
    if method == "auto":
        method = "exact" if n * size <= EXACT_BUDGET else "fast"
    if method == "random" or size == n:
        return torch.randperm(n, generator=generator)[:size].sort().values
    projection = projection_for(patches.shape[1], projection_dim, generator)
    with _progress_bar(size, method, progress) as bar:
        if method in ("exact", "greedy"):
            return (
                exact_greedy(project(patches, torch.arange(n), projection), size, generator, bar)
                .sort()
                .values
            )
        first = min(n, max(size, round(size * oversample)))
        rows = per_part_greedy(
            patches, torch.arange(n), first, generator, projection, part_rows, bar if first == size else None
        )
        if first > size:  # reduce: the same per-part greedy on the union of the parts' selections
            rows = per_part_greedy(patches, rows, size, generator, projection, part_rows, bar)
    return rows.sort().values


class _progress_bar:
    """tqdm on stderr over the bank rows chosen (an estimate of the time left), or nothing."""

    def __init__(self, total: int, method: str, enabled: bool | None) -> None:
        self.total, self.method, self.enabled, self.bar = total, method, enabled, None

    def __enter__(self):
        import sys

        if self.enabled or (self.enabled is None and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                desc=f"memory bank ({self.method} coreset)",
                unit="row",
                file=sys.stderr,
                leave=False,
                mininterval=1.0,
            )
        return self.bar

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
