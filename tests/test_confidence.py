"""Soft Confident Learning: fence and weight forms."""

from __future__ import annotations

import pytest
import torch

from comet_ray.comet.confidence import confidence_weights, outlier_fence


def test_fence_is_tukey_upper_fence() -> None:
    scores = torch.arange(1.0, 101.0)
    fence = outlier_fence(scores, 1.5)
    q1, q3 = torch.quantile(scores.double(), torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    assert fence.tau == pytest.approx(q3 + 1.5 * (q3 - q1))


@pytest.mark.parametrize("form", ["hyperbolic", "exponential", "hard"])
def test_weights_are_one_below_fence_and_monotone(form: str) -> None:
    torch.manual_seed(0)
    scores = torch.cat([torch.randn(90), torch.randn(10) + 8])
    weights, fence = confidence_weights(scores, 1.5, form)
    assert torch.all(weights[scores <= fence.tau] == 1)
    assert torch.all(weights[scores > fence.tau] < 1)
    order = torch.argsort(scores)
    assert torch.all(torch.diff(weights[order]) <= 1e-7), "weights must not increase with the score"
    assert weights[90:].mean() < weights[:90].mean()


def test_hyperbolic_weights_need_no_positive_scores() -> None:
    """The authors' tau/s breaks on signed scores; (tau - m)/(s - m) is invariant to a shift."""
    torch.manual_seed(0)
    scores = torch.cat([torch.randn(50), torch.tensor([6.0, 9.0])])
    base, _ = confidence_weights(scores, 1.5, "hyperbolic")
    shifted, _ = confidence_weights(scores - 100.0, 1.5, "hyperbolic")
    torch.testing.assert_close(base, shifted, rtol=1e-4, atol=1e-5)
    assert (base > 0).all() and (base[:50] == 1).sum() >= 45


def test_floor_and_unknown_form() -> None:
    scores = torch.cat([torch.zeros(20), torch.tensor([100.0])])
    scores[:20] = torch.linspace(0, 1, 20)
    weights, _ = confidence_weights(scores, 1.5, "hard", floor=0.1)
    assert weights[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        confidence_weights(scores, 1.5, "cosine")
