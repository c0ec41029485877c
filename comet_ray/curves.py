"""The shared core of comet_ray.metrics: input conversion, and one descending sort with cumulative sums at
the end of every run of tied scores (exact under ties, vectorised, float32 on the CPU by bit order)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, TypeAlias

import numpy as np
import torch

ArrayLike: TypeAlias = torch.Tensor | np.ndarray


def _to_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """Return ``x`` as a tensor without copying when possible (numpy shares memory, tensors keep device)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array or tensor, got an object array")
    if not arr.dtype.isnative:  # torch cannot wrap non-native byte order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if not arr.flags.writeable:  # torch warns on read-only memory (memmaps, broadcasts); copy instead
        arr = arr.copy()
    return torch.from_numpy(np.ascontiguousarray(arr))


def _scores_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """Scores as a floating tensor. Half precision is widened (exactly) so sorting and comparisons are
    well supported on every device; integers become float64 (exact up to 2**53)."""
    t = _to_tensor(x, name)
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif not t.is_floating_point():
        t = t.double()
    # the sum is a cheap NaN screen (NaN propagates); confirm, since inf + -inf is NaN as well
    if t.numel() and bool(torch.isnan(t.sum())) and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN; a NaN score cannot be ranked")
    return t


def _binary_tensor(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    """Labels/masks as a bool tensor on ``device`` (bool as is, anything else ``> 0``)."""
    t = _to_tensor(x, name)
    if t.dtype != torch.bool:
        t = t > 0
    return t.to(device)


def _as_stack(t: torch.Tensor, name: str) -> torch.Tensor:
    """Normalise a map/mask batch to ``[N, H, W]``: accepts ``[H, W]``, ``[N, H, W]`` and ``[N, 1, H, W]``."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 4 and t.shape[1] == 1:
        return t.squeeze(1)
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape [N, H, W] (or [H, W] / [N, 1, H, W]), got {tuple(t.shape)}")
    return t


def _paired(
    scores: ArrayLike, labels: ArrayLike, s_name: str, l_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (scores, bool labels) on the scores' device, with matching sizes checked."""
    s = _scores_tensor(scores, s_name)
    y = _binary_tensor(labels, l_name, s.device)
    if s.shape != y.shape:
        raise ValueError(
            f"{s_name} and {l_name} must have the same shape, got {tuple(s.shape)} and {tuple(y.shape)}"
        )
    return s.reshape(-1), y.reshape(-1)


def _last_of_runs(sorted_scores: torch.Tensor) -> torch.Tensor:
    """Indices of the last element of each run of equal values in a sorted 1-D tensor.

    Thresholding ``score >= t`` can only select whole runs of tied scores, so the curve points of every
    metric are taken at these indices: a threshold falls *between* distinct values, never inside a tie.
    """
    last = torch.ones_like(sorted_scores, dtype=torch.bool)
    last[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    return last.nonzero().squeeze(1)


class _TieCurve(NamedTuple):
    """Cumulative statistics at every distinct threshold ``t`` (descending), i.e. over ``score >= t``."""

    values: torch.Tensor  # the distinct score values, descending
    count: torch.Tensor  # float64: number of samples with score >= t
    sums: list[torch.Tensor]  # float64: for each table, sum of table[payload] over samples with score >= t


def _flip_order_bits(bits: np.ndarray, out: np.ndarray) -> None:
    """``out = bits ^ ((bits >> 31) & 0x7FFFFFFF)``: maps float32 bit patterns (viewed as int32) to int32s
    whose signed order equals the float order, and back (the map is an involution). ``out`` is used as
    scratch, so it must not alias ``bits``."""
    np.right_shift(bits, 31, out=out)
    np.bitwise_and(out, np.int32(0x7FFFFFFF), out=out)
    np.bitwise_xor(out, bits, out=out)


def _tie_curve_cpu_float32(
    scores: np.ndarray, payload: np.ndarray, tables: Sequence[np.ndarray]
) -> _TieCurve:
    """CPU fast path of :func:`_tie_curve` (float32 scores, 0 <= payload < 2**31).

    An argsort + gather of millions of pixels is dominated by random memory access and, in numpy and
    torch alike, is several times slower than numpy's vectorised sort of plain int64s. So each score is
    turned into an int32 with the same order, bit-inverted (ascending key == descending score), and
    written into the high half of an int64 whose low half holds the payload; a single ``ndarray.sort``
    then orders scores and payloads together. The payload only orders samples *within* a tie, which
    never matters because every metric reads whole runs of tied scores. All large buffers are allocated
    once and updated in place: on CPU, fresh multi-megabyte allocations cost as much as the arithmetic.
    """
    n = scores.size
    key = np.empty(n, dtype=np.int64)
    halves = key.view(np.int32).reshape(n, 2)
    lo, hi = (halves[:, 0], halves[:, 1]) if np.little_endian else (halves[:, 1], halves[:, 0])
    np.add(scores, np.float32(0.0), out=hi.view(np.float32))  # -0.0 + 0.0 == +0.0: the zeros tie
    _flip_order_bits(hi, out=lo)  # lo = order-preserving int32 of the score
    np.invert(lo, out=hi)  # descending
    np.copyto(lo, payload, casting="unsafe")
    key.sort()

    last = np.empty(n, dtype=bool)
    last[-1] = True
    np.not_equal(hi[1:], hi[:-1], out=last[:-1])
    ends = np.flatnonzero(last)
    del last
    ordered = ~hi[ends]
    values = np.empty_like(ordered)
    _flip_order_bits(ordered, out=values)

    buf = np.empty(n, dtype=np.float64)
    sums = []
    for table in tables:
        np.take(table, lo, out=buf)
        np.cumsum(buf, out=buf)
        sums.append(torch.from_numpy(buf[ends]))
    count = ends.astype(np.float64)
    count += 1.0
    return _TieCurve(torch.from_numpy(values.view(np.float32)), torch.from_numpy(count), sums)


def _tie_curve(scores: torch.Tensor, payload: torch.Tensor, tables: Sequence[torch.Tensor]) -> _TieCurve:
    """Sort 1-D ``scores`` descending and accumulate ``table[payload]`` for each table at every run end.

    This is the single kernel behind every metric here: AUROC and F1 use the payload "is anomalous"
    with the table ``[0, 1]`` (cumulative true positives), AUPRO uses the region label with per-region
    PRO weights and a normal-pixel indicator. ``payload`` holds small non-negative integers (< 2**31)
    indexing float64 ``tables``. On CPU, float32 scores (and float64 scores that are exactly
    representable in float32) take a packed-key sort, several times faster than ``torch.sort`` there.
    Everything else (CUDA tensors, genuine float64 scores) uses a plain ``torch.sort`` with indices;
    on CPU that is the slow path (~3x), which is why models should hand over float32 maps.
    Counts and sums are float64: integer counts stay exact up to 2**53 samples.
    """
    if scores.device.type == "mps":  # no float64 on Apple GPUs; the curve is computed on CPU instead
        scores, payload = scores.cpu(), payload.cpu()
    if scores.device.type == "cpu" and 0 < scores.numel():
        if scores.dtype == torch.float64:
            narrowed = scores.float()
            if torch.equal(narrowed.double(), scores):  # exact in float32: same ties, same order
                scores = narrowed
        if scores.dtype == torch.float32:
            return _tie_curve_cpu_float32(
                scores.numpy(),
                payload.cpu().numpy(),
                [t.cpu().numpy().astype(np.float64, copy=False) for t in tables],
            )
    sorted_scores, order = torch.sort(scores, descending=True)
    ends = _last_of_runs(sorted_scores)
    sorted_payload = payload.to(scores.device)[order].long()  # integer index, never a mask
    del order
    sums = [torch.cumsum(t.to(scores.device, torch.float64)[sorted_payload], 0)[ends] for t in tables]
    return _TieCurve(sorted_scores[ends], (ends + 1).double(), sums)


def _positive_curve(
    scores: torch.Tensor, positive: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, cum_pos, cum_all)`` at every distinct threshold, descending (counts as float64)."""
    table = torch.tensor([0.0, 1.0], dtype=torch.float64)  # moved to the scores' device by _tie_curve
    curve = _tie_curve(scores, positive.to(torch.int32), [table])
    return curve.values, curve.sums[0], curve.count


def _class_counts(positive: torch.Tensor) -> tuple[int, int]:
    n_pos = int(torch.count_nonzero(positive))
    return n_pos, positive.numel() - n_pos
