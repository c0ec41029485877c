"""The CoMet epoch loop on synthetic features: SCL finds planted outliers, resume is exact, strategies differ."""

from __future__ import annotations

import pytest
import torch

from comet_ray.comet.collective import Collective
from comet_ray.comet.trainer import CometTrainer
from comet_ray.config import ModelConfig, TrainConfig
from comet_ray.features.store import FeatureStore
from comet_ray.models import build_detector
from comet_ray.models.protocol import seeded_normal

N, P, D = 40, 16, 24
OUTLIER_ROWS = [3, 17, 29, 34]


def make_store(seed: int = 0) -> FeatureStore:
    generator = torch.Generator().manual_seed(seed)
    # Nominal patches sit near a few prototypes (texture); outlier images carry off-pattern patches.
    prototypes = torch.randn(4, D, generator=generator)
    choice = torch.randint(0, 4, (N, P), generator=generator)
    features = prototypes[choice] + 0.1 * torch.randn(N, P, D, generator=generator)
    for row in OUTLIER_ROWS:
        features[row, :8] = torch.randn(8, D, generator=generator) * 2.0
    return FeatureStore([f"img{i:02d}" for i in range(N)], features, (4, 4))


def make_config(strategy: str, epochs: int = 3) -> TrainConfig:
    config = TrainConfig(epochs=epochs, passes=1, batch_size=8, seed=0)
    config.model = ModelConfig(noise_std=0.1, discriminator_hidden=32)
    config.comet.strategy = strategy
    config.comet.meta_tasks = 2
    config.comet.task_size = 6
    config.comet.inner_steps = 2
    return config


def make_trainer(strategy: str, epochs: int = 3, store: FeatureStore | None = None) -> CometTrainer:
    config = make_config(strategy, epochs)
    torch.manual_seed(0)
    model = build_detector("simplenet", D, config.model)
    store = store or make_store()
    return CometTrainer(model, store, config, injected_ids={store.ids[r] for r in OUTLIER_ROWS})


def test_scl_downweights_planted_outliers_by_identity() -> None:
    trainer = make_trainer("scl")
    logs = trainer.fit(3)
    assert logs[0].low_confidence == 0, "warm-up epoch trains unweighted"
    weights = trainer.sample_weights
    outliers = torch.zeros(N, dtype=torch.bool)
    outliers[OUTLIER_ROWS] = True
    # SimpleNet's discriminator extrapolates freely far from the data, so one planted image may
    # still score low; most must be caught, and weights must follow the images, not batch positions.
    assert (weights[outliers] < 1.0).sum() >= 3
    assert weights[outliers].mean() < weights[~outliers].mean() - 0.1
    assert weights[~outliers].mean() > 0.95
    assert logs[-1].mean_weight_injected < logs[-1].mean_weight_nominal


def test_resume_from_state_equals_uninterrupted_run() -> None:
    straight = make_trainer("comet", epochs=3)
    straight.fit(3)
    first = make_trainer("comet", epochs=3)
    first.fit(2)
    state = first.state_dict()
    resumed = make_trainer("comet", epochs=3)
    resumed.load_state_dict(state)
    assert resumed.epoch == 2
    resumed.fit(3)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(straight.sample_weights, resumed.sample_weights)
    assert list(straight.history.pairs) == list(resumed.history.pairs) and resumed.lam == straight.lam


@pytest.mark.parametrize("strategy", ["baseline", "scl", "meta", "comet"])
def test_strategies_switch_their_parts(strategy: str) -> None:
    trainer = make_trainer(strategy, epochs=2)
    logs = trainer.fit(2)
    uses_meta = strategy in ("meta", "comet")
    uses_scl = strategy in ("scl", "comet")
    assert (logs[-1].meta_l_tr is not None) == uses_meta
    assert (trainer.lam > 0) == uses_meta
    assert (logs[-1].low_confidence > 0) == uses_scl


def test_noise_depends_on_the_sample_not_the_batch() -> None:
    seeds = torch.tensor([11, 22, 33])
    together = seeded_normal((4, 5), seeds, torch.device("cpu"))
    alone = seeded_normal((4, 5), seeds[1:2], torch.device("cpu"))
    torch.testing.assert_close(together[1], alone[0])


class _Rank(Collective):
    """A rank of a world, without communication: enough to build the trainer of one worker."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


def test_more_workers_than_training_images_is_refused() -> None:
    config = make_config("comet")
    with pytest.raises(ValueError, match=f"{N} training images cannot be shared by {N + 1} workers"):
        CometTrainer(
            build_detector("simplenet", D, config.model), make_store(), config, collective=_Rank(0, N + 1)
        )


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_worker_takes_the_same_steps_over_its_own_shard(world: int) -> None:
    """Per-worker batches of batch_size: the same number of steps on every worker (DDP steps in lockstep),
    each pass covering the worker's shard exactly once, the shards covering every image once."""
    config = make_config("comet")
    store = make_store()
    seen, steps, global_batches = [], set(), set()
    for rank in range(world):
        trainer = CometTrainer(
            build_detector("simplenet", D, config.model), store, config, collective=_Rank(rank, world)
        )
        batches = trainer._batches(torch.Generator().manual_seed(rank))
        steps.add(len(batches))
        global_batches.add(tuple(trainer.global_batch))
        assert all(b.numel() >= config.batch_size // 2 for b in batches)
        assert sorted(torch.cat(batches).tolist()) == trainer.rows.tolist()
        seen += trainer.rows.tolist()
    assert len(steps) == 1 and len(global_batches) == 1
    assert sorted(seen) == list(range(N)) and sum(next(iter(global_batches))) == N


def test_shards_cover_every_row_once_and_gather_back_in_order() -> None:
    class Gathered(Collective):
        """Rank 0 of 3 whose all-gather returns given parts (as torch.distributed would, in rank order)."""

        world_size = 3

        def __init__(self, parts: list[torch.Tensor] | None = None) -> None:
            self.parts = parts or []

        def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat(self.parts)

    n = 10
    shards = [Gathered().shard_rows(n, rank) for rank in range(3)]
    assert Gathered().shard_sizes(n) == [4, 3, 3] == [s.numel() for s in shards]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    scores = [rows.float() * 10 for rows in shards]  # what each worker computed for its rows
    assert torch.equal(Gathered(scores).gather_rows(scores[0], n), torch.arange(n).float() * 10)
