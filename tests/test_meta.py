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


def test_covariance_lambda_spans_lambda0_to_its_ceiling() -> None:
    """d(Sigma) spans [0, 1] over det Sigma in [0, 1] (C = 1): lambda goes from lambda0 to lambda0 (1 + gamma)."""
    assert covariance_lambda(0.0, 0.005, 0.5) == pytest.approx(0.005)
    assert covariance_lambda(1.0, 0.005, 0.5) == pytest.approx(0.0075)
    assert covariance_lambda(0.2, 0.005, 0.5) < covariance_lambda(0.6, 0.005, 0.5)
    assert covariance_lambda(0.2, 0.005, 0.5, det_clip=0.2) == pytest.approx(0.0075)  # a smaller C saturates
    assert covariance_lambda(0.5, 0.005, 0.5) == pytest.approx(
        0.005 * (1 + 0.5 * math.log1p(0.5) / math.log(2))
    )


def test_history_keeps_a_window_of_epochs() -> None:
    history = CovarianceHistory(window=3)
    for pair in [(1.0, 2.0), (2.0, 1.0), (3.0, 5.0), (4.0, 4.0)]:
        history.append(*pair)
    assert list(history.pairs) == [(2.0, 1.0), (3.0, 5.0), (4.0, 4.0)]
    restored = CovarianceHistory()
    restored.load_state(history.state())
    assert list(restored.pairs) == list(history.pairs) and restored.pairs.maxlen == 3


def _history(pairs) -> CovarianceHistory:
    history = CovarianceHistory(window=len(pairs))
    for pair in pairs:
        history.append(*pair)
    return history


def test_determinant_is_one_minus_r_squared_whatever_the_loss_scale() -> None:
    """Standardised coordinates: det Sigma = 1 - r^2, the same for losses of 1e-4 or of 1e3."""
    l_tr = torch.tensor([1.0, 0.8, 0.7, 0.65, 0.5], dtype=torch.float64)
    l_val = torch.tensor([1.1, 0.7, 0.75, 0.6, 0.55], dtype=torch.float64)
    r = float(torch.corrcoef(torch.stack([l_tr, l_val]))[0, 1])
    for scale in (1e-4, 1.0, 1e3):
        det = _history(list(zip((scale * l_tr).tolist(), (scale * l_val).tolist()))).determinant()
        assert det == pytest.approx(1 - r * r, rel=1e-9)
    falling_together = _history([(1.0, 1.1), (0.8, 0.9), (0.6, 0.7), (0.4, 0.5)]).determinant()
    unrelated = _history([(1.0, 1.0), (0.9, 1.0), (1.0, 0.9), (0.9, 0.9)]).determinant()
    assert falling_together == pytest.approx(0.0, abs=1e-12) and unrelated == pytest.approx(1.0)


def test_determinant_of_degenerate_windows() -> None:
    """Under 3 pairs: 0 (no evidence yet). Both losses still: 0. One still while the other moves: 1."""
    assert _history([]).determinant() == 0.0
    assert _history([(1.0, 2.0), (0.5, 3.0)]).determinant() == 0.0
    assert _history([(0.5, 0.7)] * 4).determinant() == 0.0
    assert _history([(1.0, 0.7), (0.9, 0.7), (0.8, 0.7)]).determinant() == 1.0


# ---------------------------------------------------------------- lambda(Sigma) in training runs
# A small synthetic set SimpleNet learns steadily in a few epochs (tight prototypes, noise 0.3), so the
# two meta losses fall together for about eight epochs and then flatten out into noise.
N, P, D = 48, 16, 16


def lambda_run(
    epochs: int, lr_scale: float = 20.0, outliers: int = 0, strategy: str = "comet", seed: int = 0
):
    from comet_ray.comet.trainer import CometTrainer
    from comet_ray.config import ModelConfig, TrainConfig
    from comet_ray.features.store import FeatureStore
    from comet_ray.models import build_detector

    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(4, D, generator=generator)
    features = prototypes[torch.randint(0, 4, (N, P), generator=generator)]
    features = features + 0.02 * torch.randn(N, P, D, generator=generator)
    for row in range(outliers):
        features[row, : P // 2] = 2.0 * torch.randn(P // 2, D, generator=generator)
    store = FeatureStore([f"img{i:02d}" for i in range(N)], features, (4, 4))
    config = TrainConfig(epochs=epochs, passes=2, batch_size=8, seed=0)
    config.model = ModelConfig(
        noise_std=0.3, discriminator_hidden=64, adaptor_lr=1e-4 * lr_scale, discriminator_lr=2e-4 * lr_scale
    )
    config.comet.strategy = strategy
    torch.manual_seed(0)
    trainer = CometTrainer(build_detector("simplenet", D, config.model), store, config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: faster, and the same sums whatever the machine's core count
    try:
        return trainer.fit(epochs), config.comet
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def steady_run():
    return lambda_run(12)


def test_lambda_stays_at_lambda0_while_training_is_stable(steady_run) -> None:
    """While L_tr and L_val fall together, det Sigma stays near 0 and lambda near lambda0."""
    logs, comet = steady_run
    assert logs[7].meta_l_tr < 0.5 * logs[0].meta_l_tr  # the run does learn over these epochs
    for log in logs[:8]:
        assert log.det_sigma < 0.1, (log.epoch, log.det_sigma)
        assert log.lam <= comet.lambda0 * (1 + comet.gamma * 0.15)


def test_lambda_moves_across_a_run(steady_run) -> None:
    """Once the losses flatten into noise, they stop moving together: lambda leaves lambda0 (the old
    per-task raw covariance kept it within 1e-5 of lambda0 for a whole run)."""
    logs, comet = steady_run
    lambdas = [log.lam for log in logs]
    assert max(lambdas) - min(lambdas) > 0.3 * comet.gamma * comet.lambda0
    assert len({round(x, 9) for x in lambdas}) > len(lambdas) // 2


def test_lambda_rises_when_training_is_unstable(steady_run) -> None:
    """A learning rate 15x too high (the detector stalls and its losses turn to noise) and heavy
    contamination without SCL (tasks with and without anomalies) both push lambda far above lambda0."""
    steady, comet = steady_run
    steady_peak = max(log.lam for log in steady[:9])
    too_fast, _ = lambda_run(9, lr_scale=300.0)
    assert max(log.lam for log in too_fast) > comet.lambda0 * (1 + comet.gamma * 0.5) > steady_peak
    contaminated, _ = lambda_run(9, outliers=12, strategy="meta")
    late = [log.lam for log in contaminated[5:]]
    assert max(late) > comet.lambda0 * (1 + comet.gamma * 0.5) and sum(late) / len(late) > steady_peak


def test_fan_in_l2_is_width_independent_at_init() -> None:
    from comet_ray.comet.meta import l2_penalty

    penalties = []
    for width in (64, 1536):
        layer = nn.Linear(width, width)
        nn.init.xavier_normal_(layer.weight)
        penalties.append(float(l2_penalty([layer.weight], "fan_in")))
        assert float(l2_penalty([layer.weight], "sum")) == pytest.approx(width, rel=0.1)
    assert penalties[0] == pytest.approx(1.0, rel=0.2) and penalties[1] == pytest.approx(1.0, rel=0.05)


def test_lambda_moves_on_a_small_contaminated_comet_run() -> None:
    """The issue-22 check at test scale: CoMet with its defaults on a contaminated set (8 of 48 images
    carry off-pattern patches); lambda's range over the run is at least 5 % of its first value."""
    logs, _ = lambda_run(12, outliers=8, strategy="comet")
    lambdas = [log.lam for log in logs]
    assert (max(lambdas) - min(lambdas)) / lambdas[0] >= 0.05, lambdas
