"""The audit's ranking and metrics: plain arrays (ids, weights, scores, injected ids) in, numbers out,
so benchmarks score any ranking the same way."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FLAG_RULE = "SCL weight below 1 after the last epoch (the image scored above SCL's outlier fence)"


def rank_order(
    weights: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray | None = None
) -> np.ndarray:
    """Row indices from most to least suspect: lowest weight first, then highest score, then row order.

    To rank by score alone (a model without SCL weights), pass weights of 1. A NaN score ranks lowest.
    """
    weights = np.asarray(weights, dtype=np.float64)
    scores = np.zeros_like(weights) if scores is None else np.asarray(scores, dtype=np.float64)
    if scores.shape != weights.shape:
        raise ValueError(f"rank_order: {weights.shape[0]} weights but {scores.shape[0]} scores")
    by_score = np.where(np.isnan(scores), -np.inf, scores)
    return np.lexsort((np.arange(weights.size), -by_score, weights))


def flagged_mask(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """The images SCL distrusts: final weight below 1."""
    return np.asarray(weights, dtype=np.float64) < 1.0


def precision_at_k(order: Sequence[int] | np.ndarray, injected: np.ndarray, k: int) -> float | None:
    """Share of known anomalies among the ``k`` first images of ``order`` (None when k is 0)."""
    if k <= 0:
        return None
    top = np.asarray(order)[:k]
    return float(np.asarray(injected, dtype=bool)[top].sum()) / k


def audit_metrics(
    ids: Sequence[str],
    weights: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray | None,
    injected_ids: set[str] | Sequence[str] | None = None,
    k: int | None = None,
) -> dict:
    """Flagged count and share; with known anomalies, precision/recall of the flagged set and precision@k.

    ``k`` defaults to the number of known anomalies, where precision@k equals recall@k. Undefined
    ratios (no flagged image, no anomaly) are None.
    """
    weights = np.asarray(weights, dtype=np.float64)
    n = len(ids)
    if weights.shape != (n,):
        raise ValueError(f"audit_metrics: {n} ids but {weights.size} weights")
    flagged = flagged_mask(weights)
    n_flagged = int(flagged.sum())
    result: dict = {
        "n_images": n,
        "n_flagged": n_flagged,
        "flagged_share": n_flagged / n if n else None,
        "flagged_weight_min": float(weights[flagged].min()) if n_flagged else None,
        "flagged_weight_median": float(np.median(weights[flagged])) if n_flagged else None,
        "flagged_weight_max": float(weights[flagged].max()) if n_flagged else None,
    }
    if not injected_ids:
        return result
    wanted = set(injected_ids)
    injected = np.array([i in wanted for i in ids], dtype=bool)
    n_injected = int(injected.sum())
    hits = int((flagged & injected).sum())
    k = n_injected if k is None else int(k)
    order = rank_order(weights, scores)
    result.update(
        {
            "n_injected": n_injected,
            "n_flagged_injected": hits,
            "precision": hits / n_flagged if n_flagged else None,
            "recall": hits / n_injected if n_injected else None,
            "k": k,
            "precision_at_k": precision_at_k(order, injected, k),
        }
    )
    return result


def first_below_one(per_epoch: np.ndarray) -> list[int | None]:
    """Per image, the first epoch (1-based) whose weight was below 1; None when it never was."""
    below = np.asarray(per_epoch, dtype=np.float64) < 1.0  # NaN (not recorded) compares False
    return [int(np.argmax(column)) + 1 if column.any() else None for column in below.T]


# --- one run's audit -----------------------------------------------------------------------------
