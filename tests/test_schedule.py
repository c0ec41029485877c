"""The schedule around the epoch loop: the floor in optimizer steps, the oracle weights, BatchNorm recalibration."""

from __future__ import annotations

import pytest
import torch
from test_trainer import OUTLIER_ROWS, N, make_config, make_store

from comet_ray.comet.schedule import check_experiment_knobs, passes_per_epoch
from comet_ray.comet.trainer import CometTrainer
from comet_ray.errors import CometError
from comet_ray.models import build_detector


def trainer_for(config, injected: bool = True) -> CometTrainer:
    torch.manual_seed(0)
    store = make_store()
    model = build_detector("simplenet", store.dim, config.model)
    ids = {store.ids[r] for r in OUTLIER_ROWS} if injected else set()
    return CometTrainer(model, store, config, injected_ids=ids)


def optimizer_steps(trainer: CometTrainer) -> int:
    state = trainer.optimizers[0].state_dict()["state"]
    return int(next(iter(state.values()))["step"])


def test_passes_per_epoch_reach_the_floor() -> None:
    assert passes_per_epoch(1, 0, 6, 7) == 1  # no floor
    assert passes_per_epoch(1, 300, 6, 7) == 8  # 6 x 8 x 7 = 336 >= 300, 6 x 7 x 7 = 294 < 300
    assert passes_per_epoch(4, 300, 40, 26) == 4  # a large set already has the steps: passes stay
    with pytest.raises(CometError):
        passes_per_epoch(1, -1, 6, 7)


def test_a_small_set_takes_the_floor_in_optimizer_steps() -> None:
    """40 images at batch 8 are 5 steps a pass: 3 epochs take 15 steps, with min_steps=40 they take 45."""
    plain = trainer_for(make_config("baseline", epochs=3))
    plain.fit(3)
    assert optimizer_steps(plain) == 15
    config = make_config("baseline", epochs=3)
    config.min_steps = 40
    floored = trainer_for(config)
    assert floored.passes == 3
    floored.fit(3)
    assert optimizer_steps(floored) == 45


def test_oracle_weights_zero_the_injected_images_from_the_first_epoch() -> None:
    config = make_config("comet", epochs=2)
    config.contamination = 0.1
    config.comet.oracle_weights = True
    trainer = trainer_for(config)
    trainer.fit(2)
    injected = torch.zeros(N, dtype=torch.bool)
    injected[OUTLIER_ROWS] = True
    for weights in trainer.weight_history:
        assert torch.equal(weights, (~injected).float())


def test_oracle_weights_are_refused_without_contamination() -> None:
    config = make_config("comet")
    config.comet.oracle_weights = True
    with pytest.raises(CometError, match="needs --contamination") as error:
        check_experiment_knobs(config)
    assert "\n" not in str(error.value)
    with pytest.raises(CometError, match="needs --contamination"):
        trainer_for(config)


def test_bn_recalibration_holds_the_final_models_training_statistics() -> None:
    """After the run each BatchNorm's running mean is the exact mean of its input over one pass of the
    training set's true and synthetic patches under the final model (not a lagging momentum average)."""
    config = make_config("baseline", epochs=2)
    config.bn_recalibrate = True
    trainer = trainer_for(config)
    trainer.fit(2)
    model = trainer.model
    norm = model.discriminator[1]
    assert norm.momentum == pytest.approx(0.1)  # restored
    rows = torch.arange(N)
    with torch.no_grad():
        adapted = model.adaptor(trainer.store.batch(rows, "cpu"))
        patches = torch.cat([adapted, adapted + model._noise(adapted, trainer._sample_seeds(rows, 17))])
        hidden = model.discriminator[0](patches.reshape(-1, patches.shape[-1]))
    # 40 images = 5 equal batches: the average of the batch means is the mean over every patch.
    assert torch.allclose(norm.running_mean, hidden.mean(dim=0), atol=1e-5)
    config = make_config("baseline", epochs=2)
    config.bn_recalibrate = False
    plain = trainer_for(config)
    plain.fit(2)
    lagging = plain.model.discriminator[1].running_mean
    assert not torch.allclose(lagging, hidden.mean(dim=0), atol=1e-3)
