"""Anomaly-detection metrics: image AUROC, F1-max, pixel AUROC and AUPRO.

Why this module exists rather than calling scikit-learn:

* Evaluation runs on whole test sets of anomaly maps (millions of pixels). Every metric here is computed
  from ONE sort plus cumulative sums, never a Python loop over pixels or thresholds, so a full MVTec
  category evaluates in well under a second on CPU.
* Inputs may be numpy arrays or torch tensors. They are wrapped as torch tensors (no copy) and stay on
  their device, so maps produced on the GPU are scored on the GPU without a round trip. The one
  exception is connected-component labelling of the ground-truth masks for AUPRO, which runs
  ``scipy.ndimage`` on the small boolean masks; the float maps never leave their device. On CPU the
  sort itself uses a numpy packed-key fast path (see :func:`_tie_curve_cpu_float32`), because a plain
  argsort of millions of pixels costs several times more there.
* Tied scores are handled exactly. Anomaly maps are often quantised (fp16 features, upsampled patches,
  clipped scores), so ties are common; a metric that silently breaks ties by sort order would depend on
  pixel order. Here a threshold is only ever placed *between* distinct score values, and AUROC counts a
  tied (anomalous, normal) pair as 1/2 (the Mann-Whitney convention).
* AUPRO follows the standard MVTec AD definition (Bergmann et al.) and mirrors the reference
  ``compute_pro`` / ``trapezoid`` code, so numbers are comparable with published results.

Labels and masks: ``bool`` tensors are used as is; any other dtype is binarised with ``> 0`` (so uint8
masks stored as 0/255 work). Label 1 / ``True`` means anomalous.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, TypeAlias

import numpy as np
import torch
from scipy import ndimage

__all__ = ["ArrayLike", "anomaly_metrics", "aupro", "auroc", "f1_at_threshold", "f1_max", "pixel_auroc"]

ArrayLike: TypeAlias = torch.Tensor | np.ndarray


# --------------------------------------------------------------------------------------------------------
# input conversion
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# shared core: one descending sort, cumulative sums at the end of every run of tied scores
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# public metrics
# --------------------------------------------------------------------------------------------------------


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve, computed exactly as the Mann-Whitney statistic.

    ``AUROC = P(score_anomalous > score_normal) + 1/2 * P(score_anomalous == score_normal)`` over all
    (anomalous, normal) pairs. It is evaluated as the trapezoidal area under the ROC staircase in
    *counts* (normal vs anomalous samples above each distinct threshold), where a run of tied scores is
    one diagonal segment, which is exactly the 1/2 tie rule. Every trapezoid is a half-integer, so the
    float64 sum is exact (below 2**52) and the result does not depend on pixel order or on float error
    accumulated over millions of points. O(n log n): one sort.

    Args:
        scores: 1-D float array/tensor, higher = more anomalous.
        labels: same shape, bool or int (1 / True = anomalous).

    Raises:
        ValueError: if only one class is present (AUROC is undefined), or scores contain NaN.
    """
    s, y = _paired(scores, labels, "scores", "labels")
    n_pos, n_neg = _class_counts(y)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            "AUROC is undefined with only one class present "
            f"(got {n_pos} anomalous and {n_neg} normal samples)"
        )
    _, cum_pos, cum_all = _positive_curve(s, y)
    cum_neg = cum_all - cum_pos
    # trapezoids in counts; the curve starts at (0, 0), so the first segment is added by hand rather
    # than concatenating a zero. (A dot product is exact here too and much faster than torch.trapezoid.)
    twice_u = torch.dot(cum_neg[1:] - cum_neg[:-1], cum_pos[1:] + cum_pos[:-1]) + cum_pos[0] * cum_neg[0]
    u = 0.5 * twice_u
    return float(u.item()) / (float(n_pos) * float(n_neg))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Best F1 score over all thresholds ``score >= t`` and the threshold ``t`` that achieves it.

    Candidate thresholds are the distinct score values, so a tie is never split (a split tie would be a
    threshold no real deployment could use). ``F1 = 2 TP / (TP + FP + P)`` at each candidate. If several
    thresholds reach the same best F1, the highest one is returned (fewest alarms).

    Args:
        scores: 1-D float array/tensor, higher = more anomalous.
        labels: same shape, bool or int (1 / True = anomalous).

    Returns:
        ``(best_f1, threshold)`` as Python floats; classify as anomalous when ``score >= threshold``.

    Raises:
        ValueError: if there is no anomalous sample (F1 would be 0 at every threshold), or scores
            contain NaN.
    """
    s, y = _paired(scores, labels, "scores", "labels")
    n_pos, _ = _class_counts(y)
    if n_pos == 0:
        raise ValueError("F1 is undefined without anomalous samples (labels contain no positive)")
    values, tp, predicted = _positive_curve(s, y)
    f1 = (2.0 * tp) / (predicted + n_pos)
    best = int(torch.argmax(f1).item())  # first maximum = highest threshold
    return float(f1[best].item()), float(values[best].item())


def f1_at_threshold(scores: ArrayLike, labels: ArrayLike, threshold: float) -> tuple[float, float, float]:
    """``(F1, precision, recall)`` calling ``score >= threshold`` anomalous, at a threshold chosen elsewhere."""
    s, y = _paired(scores, labels, "scores", "labels")
    hit = s >= threshold
    tp, predicted, n_pos = int((hit & y).sum().item()), int(hit.sum().item()), int(y.sum().item())
    precision = tp / predicted if predicted else 0.0
    return (
        (2.0 * tp / (predicted + n_pos) if n_pos else float("nan")),
        precision,
        tp / n_pos if n_pos else float("nan"),
    )


def _pixels(maps: ArrayLike, masks: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``[N, H, W]`` float maps and bool masks, the masks on the maps' device."""
    m = _as_stack(_scores_tensor(maps, "maps"), "maps")
    g = _as_stack(_binary_tensor(masks, "masks", m.device), "masks")
    if m.shape != g.shape:
        raise ValueError(
            f"maps and masks must have the same shape, got {tuple(m.shape)} and {tuple(g.shape)}"
        )
    return m, g


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel-level AUROC: :func:`auroc` over every pixel of every image pooled together.

    Args:
        maps: ``[N, H, W]`` float anomaly maps (``[H, W]`` and ``[N, 1, H, W]`` are also accepted).
        masks: same shape, ground truth (bool, or int/float binarised with ``> 0``).

    Raises:
        ValueError: if the masks contain only anomalous or only normal pixels.
    """
    m, g = _pixels(maps, masks)
    return auroc(m.reshape(-1), g.reshape(-1))


def _trapezoid_to(x: torch.Tensor, y: torch.Tensor, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` for ``x`` in ``[x[0], x_max]`` (``x`` non-decreasing, x[0] <= x_max).

    Identical to MVTec's reference ``trapezoid``: all points with ``x <= x_max`` are integrated and, when
    ``x_max`` is not itself a curve point, the segment up to ``x_max`` is added with ``y`` linearly
    interpolated at ``x_max``.
    """
    target = torch.tensor([x_max], dtype=x.dtype, device=x.device)
    ins = int(torch.searchsorted(x, target, right=True).item())  # == bisect.bisect_right
    area = 0.5 * float(torch.dot(x[1:ins] - x[: ins - 1], y[1:ins] + y[: ins - 1]).item()) if ins > 1 else 0.0
    if ins < x.numel():
        x0, x1, y0, y1 = (float(v) for v in (x[ins - 1], x[ins], y[ins - 1], y[ins]))
        if x0 != x_max:
            y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            area += 0.5 * (y_interp + y0) * (x_max - x0)
    return area


def _pro_curve(
    maps: torch.Tensor, masks: torch.Tensor, fpr_max: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (FPR, PRO) curve like MVTec's ``compute_pro``, up to the first point past ``fpr_max``.

    Every ground-truth connected component (8-connectivity, per image) is one region. Sorting all pixels
    by score descending, an anomalous pixel of region ``r`` raises PRO by ``1 / (|r| * n_regions)`` and a
    normal pixel raises the false-positive count by one; cumulative sums therefore give PRO(t) and
    FPR(t) for every threshold at once (float64). Only the last index of each run of tied scores is
    kept. The curve starts at (0, 0); points beyond the first one with FPR > ``fpr_max`` are dropped
    because they cannot influence the integral (the reference appends (1, 1), which never matters either).
    """
    mask_np = masks.cpu().numpy()
    # 3x3 ones in-plane, nothing across images: one call labels the whole stack, with labels that are
    # unique across images (equivalent to labelling each image with a 3x3 ones structure).
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, n_regions = ndimage.label(mask_np, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n_regions + 1)
    n_normal = int(sizes[0])
    if n_regions == 0 or n_normal == 0:
        raise ValueError(
            f"AUPRO needs at least one anomalous and one normal pixel "
            f"(got {mask_np.size - n_normal} anomalous and {n_normal} normal)"
        )
    pro_weight = np.zeros(n_regions + 1, dtype=np.float64)
    pro_weight[1:] = 1.0 / (sizes[1:].astype(np.float64) * n_regions)
    normal_indicator = np.zeros(n_regions + 1, dtype=np.float64)
    normal_indicator[0] = 1.0  # counted, then divided once, so FPR = k / n_normal exactly

    curve = _tie_curve(  # payload and tables are moved to the maps' device there
        maps.reshape(-1),
        torch.from_numpy(labels.reshape(-1)),
        [torch.from_numpy(pro_weight), torch.from_numpy(normal_indicator)],
    )
    pro, fp = curve.sums
    fpr = fp / n_normal
    target = torch.tensor([fpr_max], dtype=fpr.dtype, device=fpr.device)
    keep = min(int(torch.searchsorted(fpr, target, right=True).item()) + 1, fpr.numel())
    zero = fpr.new_zeros(1)
    return (
        torch.cat([zero, fpr[:keep].clamp(0.0, 1.0)]),
        torch.cat([zero, pro[:keep].clamp(0.0, 1.0)]),
    )


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit`` (MVTec AD standard).

    Pixel AUROC is dominated by large defects; PRO weights every connected defect region equally, so a
    missed small scratch costs as much as a missed large stain. Definition (Bergmann et al., no mask
    dilation): regions are 8-connected components of each ground-truth mask; at threshold ``t``,
    ``PRO(t)`` is the mean over all regions (all images) of the fraction of the region with
    ``map >= t``, and ``FPR(t)`` the fraction of normal pixels (all images) with ``map >= t``. The exact
    curve over all thresholds is integrated with the trapezoid rule from FPR 0 to ``fpr_limit``
    (interpolating the point at exactly ``fpr_limit``) and divided by ``fpr_limit``, so a perfect
    detector scores 1.0.

    Args:
        maps: ``[N, H, W]`` float anomaly maps (``[H, W]`` and ``[N, 1, H, W]`` are also accepted).
        masks: same shape, ground truth (bool, or int/float binarised with ``> 0``).
        fpr_limit: upper FPR integration limit, in ``(0, 1]``; 0.3 is the MVTec AD convention.

    Raises:
        ValueError: on a bad ``fpr_limit`` or shape mismatch, or if the masks have no anomalous or no
            normal pixel (AUPRO is undefined; :func:`anomaly_metrics` reports NaN instead).
    """
    if not (0.0 < fpr_limit <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m, g = _pixels(maps, masks)
    fpr, pro = _pro_curve(m, g, fpr_limit)
    return _trapezoid_to(fpr, pro, float(fpr_limit)) / fpr_limit


def anomaly_metrics(
    image_scores: ArrayLike,
    image_labels: ArrayLike,
    maps: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All standard metrics of one evaluation in a dict of Python floats (ready for logging / Ray Tune).

    Keys: ``image_auroc``, ``f1_max``, ``f1_threshold`` and, when ``maps`` and ``masks`` are given,
    ``pixel_auroc`` and ``aupro``. Pixel metrics are reported as ``float('nan')`` instead of raising when
    the masks contain no anomalous pixel (or no normal pixel): a category or split whose test defects
    have no masks must still report its image-level numbers.

    Raises:
        ValueError: if image labels contain a single class (image AUROC undefined), or only one of
            ``maps`` / ``masks`` is given.
    """
    result: dict[str, float] = {"image_auroc": auroc(image_scores, image_labels)}
    result["f1_max"], result["f1_threshold"] = f1_max(image_scores, image_labels)
    if maps is None and masks is None:
        return result
    if maps is None or masks is None:
        raise ValueError("pass both maps and masks for pixel metrics, or neither")
    result.update(pixel_metrics(maps, masks, fpr_limit))
    return result


def pixel_metrics(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> dict[str, float]:
    """``pixel_auroc`` and ``aupro``; both ``nan`` when the masks hold a single class of pixel.

    Separate from the image metrics because a split can have usable masks but one image class
    (a test split with anomalies only): its pixel numbers are still defined.
    """
    m, g = _pixels(maps, masks)
    n_anomalous = int(torch.count_nonzero(g))
    if n_anomalous == 0 or n_anomalous == g.numel():
        return {"pixel_auroc": math.nan, "aupro": math.nan}
    return {"pixel_auroc": pixel_auroc(m, g), "aupro": aupro(m, g, fpr_limit)}
