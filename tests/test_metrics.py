"""Tests for comet_ray.metrics: every vectorised metric is checked against a brute-force definition
written with plain Python loops / numpy on small seeded random inputs, with and without tied scores."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from comet_ray.metrics import anomaly_metrics, aupro, auroc, f1_at_threshold, f1_max, pixel_auroc

SEEDS = list(range(8))


# --------------------------------------------------------------------------------------------------------
# brute-force references
# --------------------------------------------------------------------------------------------------------


def brute_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney by explicit pair counting: win = 1, tie = 1/2."""
    pos = [float(s) for s, y in zip(scores, labels) if y]
    neg = [float(s) for s, y in zip(scores, labels) if not y]
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


def brute_auroc_pairwise(scores: np.ndarray, labels: np.ndarray) -> float:
    """Same definition, numpy broadcasting over all (pos, neg) pairs (for a few thousand pixels)."""
    pos = scores[labels.astype(bool)].astype(np.float64)
    neg = scores[~labels.astype(bool)].astype(np.float64)
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def brute_f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Try every distinct score as threshold (descending); keep the first (highest) best."""
    n_pos = int(sum(bool(y) for y in labels))
    best_f1, best_t = -1.0, None
    for t in sorted({float(s) for s in scores}, reverse=True):
        tp = sum(1 for s, y in zip(scores, labels) if s >= t and y)
        fp = sum(1 for s, y in zip(scores, labels) if s >= t and not y)
        f1 = 2.0 * tp / (tp + fp + n_pos)
        if f1 > best_f1:
            best_f1, best_t = f1, t
    return best_f1, best_t


def brute_trapezoid(x: list[float], y: list[float], x_max: float) -> float:
    """MVTec reference trapezoid with interpolation at x_max."""
    correction = 0.0
    if x_max not in x:
        ins = bisect.bisect(x, x_max)
        assert 0 < ins < len(x)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    area = 0.0
    for i in range(1, len(x)):
        if x[i] <= x_max:
            area += 0.5 * (y[i] + y[i - 1]) * (x[i] - x[i - 1])
    return area + correction


def brute_pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[list[float], list[float]]:
    """Threshold sweep over all distinct scores; per-region overlaps with explicit loops over regions."""
    regions = []  # (image index, boolean region mask)
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3), dtype=int))
        for k in range(1, n + 1):
            regions.append((i, lab == k))
    normal = ~masks.astype(bool)
    n_normal = int(normal.sum())
    fprs, pros = [0.0], [0.0]
    for t in sorted({float(v) for v in maps.ravel()}, reverse=True):
        above = maps >= t
        fprs.append(int((above & normal).sum()) / n_normal)
        overlaps = []
        for i, region in regions:
            overlaps.append(int((above[i] & region).sum()) / int(region.sum()))
        pros.append(sum(overlaps) / len(overlaps))
    fprs.append(1.0)
    pros.append(1.0)
    return fprs, pros


def brute_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    fprs, pros = brute_pro_curve(maps, masks)
    return brute_trapezoid(fprs, pros, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------------------------------------
# random inputs
# --------------------------------------------------------------------------------------------------------


def random_image_data(seed: int, n: int = 60, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    labels[0], labels[1] = True, False  # both classes present
    scores = rng.normal(size=n) + 0.8 * labels
    if ties:
        scores = np.round(scores, 1)
    return scores, labels.astype(np.int64)


def random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Blobby masks with several regions per image (some diagonal-only contacts), one empty image."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if i == n - 1:
            continue  # a normal image with an empty mask
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, h), rng.integers(0, w)
            rh, rw = rng.integers(1, 4), rng.integers(1, 5)
            masks[i, r : r + rh, c : c + rw] = True
        masks[i] |= rng.random((h, w)) < 0.04  # speckle: single pixels, diagonal neighbours
    masks[0, 0, 0] = True
    masks[0, -1, -1] = False
    return masks


def random_pixel_data(
    seed: int, ties: bool, dtype: type = np.float32, n: int = 4, h: int = 13, w: int = 11
) -> tuple[np.ndarray, np.ndarray]:
    """float32 maps take the packed-key CPU sort; float64 maps (not exact in float32) take torch.sort."""
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, n, h, w)
    maps = rng.random((n, h, w)) - 0.5 + 0.5 * masks * rng.random((n, h, w))  # negative and positive
    if ties:
        maps = np.round(maps, 1)
    return maps.astype(dtype), masks


# --------------------------------------------------------------------------------------------------------
# image-level metrics
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_matches_pair_counting(seed: int, ties: bool, dtype: type) -> None:
    scores, labels = random_image_data(seed, ties=ties)
    scores = scores.astype(dtype)
    assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels), abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_special_values_sort_correctly(dtype: type) -> None:
    # negatives, both zeros (-0.0 == 0.0 is a tie), infinities; float64 values exact in float32 and not
    scores = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 0.0, -0.0, 1e-30, 2.0, np.inf, 0.1, -0.1, 7.0, -7.0])
    labels = np.array([0, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1])
    scores = scores.astype(dtype)
    assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    assert f1_max(scores, labels) == pytest.approx(brute_f1_max(scores, labels), abs=1e-12)
    assert auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == auroc(scores, labels)


def test_auroc_all_tied_is_half() -> None:
    assert auroc(np.zeros(10), np.arange(10) % 2) == 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_auroc_tie_at_the_top_and_bottom(dtype: type) -> None:
    # the highest and lowest scores are ties between both classes (first/last ROC segments diagonal)
    scores = np.array([0.9, 0.9, 0.9, 0.5, 0.3, 0.1, 0.1], dtype=dtype)
    labels = np.array([1, 0, 0, 1, 0, 1, 0])
    assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    assert f1_max(scores, labels) == pytest.approx(brute_f1_max(scores, labels), abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_f1_max_matches_threshold_sweep(seed: int, ties: bool, dtype: type) -> None:
    scores, labels = random_image_data(seed, ties=ties)
    scores = scores.astype(dtype)
    f1, t = f1_max(scores, labels)
    bf1, bt = brute_f1_max(scores, labels)
    assert f1 == pytest.approx(bf1, abs=1e-12)
    assert t == bt
    # the returned threshold really achieves the returned F1 with the rule "score >= t"
    pred = scores >= t
    tp = int((pred & (labels == 1)).sum())
    assert 2 * tp / (pred.sum() + labels.sum()) == pytest.approx(f1, abs=1e-12)


def test_f1_max_threshold_never_splits_ties() -> None:
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    labels = np.array([1, 1, 0, 0, 0])
    f1, t = f1_max(scores, labels)
    # splitting the 0.5 tie would give F1 = 1.0; legal thresholds give 2/3 (t=0.9) or 4/6 (t=0.5)
    assert f1 == pytest.approx(2 / 3)
    assert t == 0.9  # the highest threshold among equal F1s


def test_f1_at_a_fixed_threshold() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.5])
    labels = np.array([0, 0, 1, 1, 1, 0])
    # >= 0.4 flags 0.4, 0.5, 0.8, 0.9: two of the three anomalies among four alarms
    assert f1_at_threshold(scores, labels, 0.4) == pytest.approx((4 / 7, 0.5, 2 / 3), abs=1e-12)
    assert f1_at_threshold(scores, labels, 0.35) == pytest.approx((0.75, 0.6, 1.0), abs=1e-12)
    assert f1_at_threshold(scores, labels, 2.0) == (0.0, 0.0, 0.0)  # no alarm at all
    best, cut = f1_max(scores, labels)
    assert f1_at_threshold(scores, labels, cut)[0] == pytest.approx(best)


def test_perfect_and_inverted_detector() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert auroc(scores, labels) == 1.0
    assert auroc(-scores, labels) == 0.0
    assert f1_max(scores, labels) == (1.0, 0.8)


@pytest.mark.parametrize("labels", [np.zeros(5, dtype=int), np.ones(5, dtype=int)])
def test_single_class_raises(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="one class"):
        auroc(np.arange(5.0), labels)
    with pytest.raises(ValueError, match="one class"):
        pixel_auroc(np.random.rand(1, 1, 5), labels.reshape(1, 1, 5))


def test_f1_without_positives_raises() -> None:
    with pytest.raises(ValueError, match="no positive"):
        f1_max(np.arange(5.0), np.zeros(5))


def test_nan_and_shape_errors() -> None:
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        auroc(np.arange(3.0), np.array([0, 1]))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.random.rand(1, 4, 4), np.eye(4)[None], fpr_limit=0.0)


# --------------------------------------------------------------------------------------------------------
# pixel-level metrics
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_auroc_matches_brute(seed: int, ties: bool, dtype: type) -> None:
    maps, masks = random_pixel_data(seed, ties, dtype)
    expected = brute_auroc_pairwise(maps.ravel(), masks.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_aupro_matches_brute(seed: int, ties: bool, dtype: type) -> None:
    maps, masks = random_pixel_data(seed, ties, dtype)
    fprs, pros = brute_pro_curve(maps, masks)  # one sweep, integrated to several limits
    for fpr_limit in (0.3, 0.05, 0.5, 1.0):
        expected = brute_trapezoid(fprs, pros, fpr_limit) / fpr_limit
        assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-6), fpr_limit


def test_aupro_limit_hits_a_curve_point_exactly() -> None:
    # 10 normal pixels with distinct scores: FPR steps of 0.1, so 0.3 is an exact curve point
    rng = np.random.default_rng(0)
    maps = rng.random((1, 4, 5))
    masks = np.zeros((1, 4, 5), dtype=bool)
    masks[0, :2, :] = True  # one region of 10 pixels, 10 normal pixels
    assert aupro(maps, masks) == pytest.approx(brute_aupro(maps, masks), abs=1e-12)


def test_aupro_regions_are_weighted_equally_and_8_connected() -> None:
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 0:3, 0:3] = True  # big region, 9 px
    masks[0, 5, 5] = True  # small region, 1 px
    masks[0, 4, 4] = True  # diagonal neighbour of (5,5): same region under 8-connectivity
    maps = np.zeros((1, 6, 6))
    maps[0, 0:3, 0:3] = 1.0  # only the big region is detected
    # curve (0,0) -> (0,0.5) [t=1: one of two regions] -> (1,1) [t=0]; at FPR 0.3 PRO interpolates to
    # 0.65, area 0.3 * (0.5 + 0.65) / 2, normalised: 0.575. (4-connectivity would give 3 regions.)
    assert aupro(maps, masks) == pytest.approx(0.575)
    assert aupro(maps, masks) == pytest.approx(brute_aupro(maps, masks))


def test_perfect_detector_pixel_metrics() -> None:
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 5, 16, 16)
    maps = masks + 0.1 * rng.random(masks.shape) * masks  # anomalous > every normal pixel (score 0)
    assert aupro(maps, masks) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(maps, masks) == 1.0
    assert pixel_auroc(-maps, masks) == 0.0


# --------------------------------------------------------------------------------------------------------
# input types, devices, helper
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_torch_and_numpy_inputs_agree(seed: int) -> None:
    scores, labels = random_image_data(seed, ties=True)
    maps, masks = random_pixel_data(seed, ties=True)
    assert auroc(torch.from_numpy(scores), torch.from_numpy(labels).bool()) == auroc(scores, labels)
    assert f1_max(torch.from_numpy(scores), torch.from_numpy(labels)) == f1_max(scores, labels)
    assert f1_max(list(scores), list(labels)) == f1_max(scores, labels)
    tm, tk = torch.from_numpy(maps), torch.from_numpy(masks)
    assert pixel_auroc(tm, tk) == pixel_auroc(maps, masks)
    assert aupro(tm, tk) == aupro(maps, masks)
    # float64 maps that are exact in float32 are narrowed to the packed-key CPU path: same result
    assert aupro(maps.astype(np.float64), masks) == aupro(maps, masks)
    assert pixel_auroc(maps.astype(np.float64), masks) == pixel_auroc(maps, masks)
    # uint8 0/255 masks and [N, 1, H, W] layout
    assert aupro(tm[:, None], (tk.to(torch.uint8) * 255)[:, None]) == aupro(maps, masks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    scores, labels = random_image_data(0, ties=True)
    maps, masks = random_pixel_data(0, ties=True)
    dev = torch.device("cuda")
    assert auroc(torch.from_numpy(scores).to(dev), torch.from_numpy(labels).to(dev)) == pytest.approx(
        auroc(scores, labels), abs=1e-12
    )
    assert aupro(torch.from_numpy(maps).to(dev), torch.from_numpy(masks).to(dev)) == pytest.approx(
        aupro(maps, masks), abs=1e-9
    )


def test_anomaly_metrics_helper() -> None:
    scores, labels = random_image_data(1, ties=True)
    maps, masks = random_pixel_data(1, ties=True)
    only_image = anomaly_metrics(scores, labels)
    assert set(only_image) == {"image_auroc", "f1_max", "f1_threshold"}
    full = anomaly_metrics(scores, labels, maps, masks)
    assert set(full) == {"image_auroc", "f1_max", "f1_threshold", "pixel_auroc", "aupro"}
    assert all(isinstance(v, float) for v in full.values())
    assert full["image_auroc"] == auroc(scores, labels)
    assert (full["f1_max"], full["f1_threshold"]) == f1_max(scores, labels)
    assert full["pixel_auroc"] == pixel_auroc(maps, masks)
    assert full["aupro"] == aupro(maps, masks)

    no_defects = anomaly_metrics(scores, labels, maps, np.zeros_like(masks))
    assert math.isnan(no_defects["pixel_auroc"]) and math.isnan(no_defects["aupro"])
    assert no_defects["image_auroc"] == full["image_auroc"]

    with pytest.raises(ValueError, match="both"):
        anomaly_metrics(scores, labels, maps=maps)
