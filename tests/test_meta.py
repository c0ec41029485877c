"""Meta phase pieces: task sampling, Reptile direction, lambda(Sigma)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from comet_ray.comet.meta import CovarianceHistory, covariance_lambda, reptile_step, sample_tasks, split_task


def test_tasks_sampled_proportional_to_weight() -> None:
    weights = torch.tensor([1.0] * 10 + [0.01] * 10)
    generator = torch.Generator().manual_seed(0)
    tasks = sample_tasks(weights, 200, 4, generator)
    drawn = torch.cat(tasks)
    assert (drawn < 10).float().mean() > 0.9
    assert all(t.unique().numel() == 4 for t in tasks)


def test_split_task_keeps_both_parts() -> None:
    support, query = split_task(torch.arange(8), 0.3)
    assert support.numel() == 6 and query.numel() == 2
    support, query = split_task(torch.arange(2), 0.9)
    assert support.numel() == 1 and query.numel() == 1


def test_reptile_moves_towards_adapted_weights() -> None:
    """The authors' release had the sign reversed: theta must move towards theta'."""
    model = nn.Linear(3, 2)
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    direction = torch.ones_like(before)
    reptile_step(model, direction, 0.5)
    after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    torch.testing.assert_close(after - before, 0.5 * direction)


def test_covariance_lambda_grows_with_instability() -> None:
    assert covariance_lambda(0.0, 0.005, 0.5, 100.0) == pytest.approx(0.005 * (1 + 0.5 * math.log1p(1e-6) / math.log1p(100)))
    assert covariance_lambda(1e9, 0.005, 0.5, 100.0) == pytest.approx(0.005 * 1.5)
    assert covariance_lambda(1.0, 0.005, 0.5, 100.0) < covariance_lambda(10.0, 0.005, 0.5, 100.0)


def test_history_window_and_determinant() -> None:
    history = CovarianceHistory(window=3)
    assert history.determinant() == 0.0
    history.extend([(1.0, 2.0), (2.0, 1.0), (3.0, 5.0), (4.0, 4.0)])
    assert len(history.pairs) == 3
    data = torch.tensor([(2.0, 1.0), (3.0, 5.0), (4.0, 4.0)], dtype=torch.float64).T
    assert history.determinant() == pytest.approx(float(torch.linalg.det(torch.cov(data))))
    restored = CovarianceHistory()
    restored.load_state(history.state())
    assert list(restored.pairs) == list(history.pairs)


def test_fan_in_l2_is_width_independent_at_init() -> None:
    from comet_ray.comet.meta import l2_penalty

    penalties = []
    for width in (64, 1536):
        layer = nn.Linear(width, width)
        nn.init.xavier_normal_(layer.weight)
        penalties.append(float(l2_penalty([layer.weight], "fan_in")))
        assert float(l2_penalty([layer.weight], "sum")) == pytest.approx(width, rel=0.1)
    assert penalties[0] == pytest.approx(1.0, rel=0.2) and penalties[1] == pytest.approx(1.0, rel=0.05)
