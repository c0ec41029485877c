"""Scale-free SimpleNet noise, the learning check, the knn reference and the knn confidence signal."""

from __future__ import annotations

import pytest
import torch

from comet_ray.checkpoint import load_detector, save_detector
from comet_ray.comet.trainer import NOT_LEARNING_AFTER, CometTrainer
from comet_ray.config import ModelConfig, TrainConfig
from comet_ray.errors import CometError
from comet_ray.features.store import FeatureStore
from comet_ray.models import build_detector, detector_from_hparams
from comet_ray.models.knn import PatchKNN, coreset_rows, leave_one_out_scores, nearest_distances

N, P, D = 30, 16, 24
OUTLIER_ROWS = [4, 11, 23]


def make_store(scale: float = 1.0, seed: int = 0) -> FeatureStore:
    """Nominal patches near a few prototypes; the outlier images carry off-pattern patches."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(4, D, generator=generator)
    features = prototypes[torch.randint(0, 4, (N, P), generator=generator)]
    features = features + 0.1 * torch.randn(N, P, D, generator=generator)
    for row in OUTLIER_ROWS:
        features[row, :6] = 2.0 * torch.randn(6, D, generator=generator)
    return FeatureStore([f"img{i:02d}" for i in range(N)], features * scale, (4, 4))


def config(strategy: str = "baseline", **comet) -> TrainConfig:
    result = TrainConfig(epochs=2, passes=1, batch_size=8, seed=0)
    result.model = ModelConfig(discriminator_hidden=32)
    result.comet.strategy = strategy
    for key, value in comet.items():
        setattr(result.comet, key, value)
    return result


def test_store_scale_is_rms_of_per_dimension_std() -> None:
    store = make_store()
    flat = store.features.reshape(-1, D).double()
    assert store.scale(chunk=7) == pytest.approx(float(flat.std(dim=0).pow(2).mean().sqrt()), rel=1e-9)
    constant = FeatureStore(["a", "b"], torch.ones(2, 4, 3), (2, 2))
    assert constant.scale() == 1.0


def test_simplenet_noise_is_relative_to_the_training_features_scale() -> None:
    """Features x100 with the model built from them train exactly as features x1: nothing depends on units."""
    losses = []
    for scale in (1.0, 100.0):
        store = make_store(scale)
        torch.manual_seed(0)
        model = build_detector("simplenet", D, config().model, train_store=store)
        assert float(model.feature_scale) == pytest.approx(store.scale())
        trainer = CometTrainer(model, store, config())
        losses.append([log.loss for log in trainer.fit(2)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_feature_scale_travels_in_checkpoints_and_old_ones_load(tmp_path) -> None:
    store = make_store(7.0)
    model = build_detector("simplenet", D, config().model, train_store=store)
    save_detector(tmp_path / "model.pt", model, {}, (4, 4), {}, 0.0, 0.0)
    loaded, _ = load_detector(tmp_path / "model.pt")
    assert float(loaded.feature_scale) == pytest.approx(store.scale())
    old_state = {k: v for k, v in model.state_dict().items() if k != "feature_scale"}
    old = detector_from_hparams("simplenet", model.hparams())
    old.load_state_dict(old_state)  # a checkpoint from before the scale-free noise: absolute noise
    assert float(old.feature_scale) == 1.0


def test_learning_check_rises_when_the_discriminator_learns_and_warns_when_it_does_not() -> None:
    store = make_store()
    torch.manual_seed(0)
    visible = config()
    visible.passes = 4
    visible.model.discriminator_lr = visible.model.adaptor_lr = 2e-3  # a short run that learns
    visible.model.noise_std = 1.0
    learning = CometTrainer(build_detector("simplenet", D, visible.model, train_store=store), store, visible)
    logs = learning.fit(5)
    assert logs[-1].extra["separation"] > 0.9 and "warning" not in logs[-1].extra
    torch.manual_seed(0)
    invisible = config()
    invisible.model.noise_std = 1e-4  # noise far below the features' spread: nothing to tell apart
    stuck = CometTrainer(build_detector("simplenet", D, invisible.model, train_store=store), store, invisible)
    logs = stuck.fit(NOT_LEARNING_AFTER)
    assert all(
        "warning" not in log.extra for log in logs[:-1]
    )  # early epochs may still be finding their feet
    assert logs[-1].extra["separation"] < 0.6
    assert "not learning" in logs[-1].extra["warning"] and "not learning" in logs[-1].line(NOT_LEARNING_AFTER)


def test_nearest_distances_match_brute_force_with_and_without_exclusion() -> None:
    generator = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(50, 8, generator=generator), torch.randn(30, 8, generator=generator)
    brute = torch.cdist(queries, bank)
    assert torch.allclose(nearest_distances(queries, bank, chunk=7), brute.min(dim=1).values, atol=1e-4)
    groups_q, groups_b = torch.arange(50) % 5, torch.arange(30) % 5
    masked = brute.masked_fill(groups_q[:, None] == groups_b[None, :], float("inf"))
    excluded = nearest_distances(queries, bank, exclude=(groups_q, groups_b), chunk=7)
    assert torch.allclose(excluded, masked.min(dim=1).values, atol=1e-4)


def test_greedy_coreset_covers_better_than_random() -> None:
    """k-center picks every cluster, including a small one that a random draw of the same size misses."""
    generator = torch.Generator().manual_seed(2)
    big = torch.randn(990, 16, generator=generator) * 0.1
    small = torch.randn(10, 16, generator=generator) * 0.1 + 5.0
    points = torch.cat([big, small])
    radius = {}
    for method in ("greedy", "random"):
        rows = coreset_rows(points, 20, method, torch.Generator().manual_seed(0), projection_dim=8)
        assert rows.unique().numel() == 20
        radius[method] = float(nearest_distances(points, points[rows]).max())
    assert radius["greedy"] < 1.0 < radius["random"]
    assert coreset_rows(points, 5000, "greedy", torch.Generator()).numel() == 1000
    with pytest.raises(CometError, match="unknown coreset"):
        coreset_rows(points, 5, "kmeans", torch.Generator())


def test_knn_reference_scores_outliers_and_round_trips(tmp_path) -> None:
    store = make_store()
    clean = store.subset([i for r, i in enumerate(store.ids) if r not in OUTLIER_ROWS])
    model = build_detector("knn", D, ModelConfig(knn_bank_fraction=0.25), train_store=clean)
    assert model.bank.shape == (round(0.25 * len(clean) * P), D) and not model.trainable
    scores = model.patch_scores(store.features).max(dim=1).values
    outliers = torch.zeros(N, dtype=torch.bool)
    outliers[OUTLIER_ROWS] = True
    assert scores[outliers].min() > scores[~outliers].max()
    save_detector(tmp_path / "model.pt", model, {}, (4, 4), {}, 0.0, 0.0)
    loaded, _ = load_detector(tmp_path / "model.pt")
    assert torch.equal(loaded.patch_scores(store.features), model.patch_scores(store.features))
    with pytest.raises(CometError, match="training-free"):
        model.patch_losses(store.features, torch.zeros(N))
    with pytest.raises(CometError, match="training features"):
        build_detector("knn", D, ModelConfig())


def test_leave_one_out_scores_never_match_an_image_to_itself() -> None:
    store = make_store()
    features = torch.cat([store.features, store.features[:1]])  # image 0 twice: each is the other's neighbour
    scores = leave_one_out_scores(PatchKNN(D, bank_fraction=1.0), features, torch.Generator().manual_seed(0))
    assert float(scores[0].max()) < 0.01 and float(scores[-1].max()) < 0.01  # up to float32 rounding
    assert float(scores[1:-1].min()) > 0.05  # no other image has a duplicate


def test_knn_confidence_signal_downweights_the_outlier_images() -> None:
    store = make_store()
    injected = {store.ids[r] for r in OUTLIER_ROWS}
    run = config("scl", confidence_signal="knn", warmup_epochs=0)
    model = build_detector("simplenet", D, run.model, train_store=store)
    trainer = CometTrainer(model, store, run, injected_ids=injected)
    log = trainer.fit(1)[0]
    weights = trainer.sample_weights
    outliers = torch.zeros(N, dtype=torch.bool)
    outliers[OUTLIER_ROWS] = True
    assert bool((weights[outliers] < 1).all()) and bool((weights[~outliers] == 1).all())
    assert log.mean_weight_injected < log.mean_weight_nominal


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_knn_from_the_cli_trains_nothing_and_exports(tmp_path, capsys) -> None:
    """``--model knn``: a note that epochs and strategy do not apply, a run folder like any other, and an
    exported graph (free batch size) that scores like the unfused path."""
    import json

    import numpy as np

    from comet_ray.cli import main
    from comet_ray.data.synthetic import make_texture_category
    from comet_ray.export import ExportedDetector, export_detector
    from comet_ray.model import extractor_for
    from comet_ray.models.anomaly_map import image_scores

    from support import TINY_TRAIN_ARGS

    make_texture_category(
        tmp_path / "data", "weave", n_train=8, n_test_good=4, defects={"spot": 4}, size=64, seed=2
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(tmp_path / "data"),
                "--category",
                "weave",
                "--model",
                "knn",
                "--out",
                str(out),
                *TINY_TRAIN_ARGS,
            ]
        )
        == 0
    )
    assert "training-free" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["strategy"] == "none"
    assert json.loads((out / "history.json").read_text()) == []
    assert set(json.loads((out / "weights.json").read_text())["weights"].values()) == {1.0}
    model, meta = load_detector(out)
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = image_scores(model.patch_scores(extractor_for(meta, torch.device("cpu"))(images))).numpy()
        np.testing.assert_allclose(
            ExportedDetector.from_checkpoint(out)(images)[0].numpy(), expected, atol=1e-4
        )
        loaded = torch.jit.load(str(export_detector(out, tmp_path / "model.ts", "torchscript")))
        np.testing.assert_allclose(loaded(images)[0].numpy(), expected, atol=1e-4)
