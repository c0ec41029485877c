"""The normalizing-flow detector: exact inverse and log-det, numerics on degenerate inputs, CoMet training."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from comet_ray.checkpoint import load_detector, save_detector
from comet_ray.comet.trainer import CometTrainer
from comet_ray.config import ModelConfig, TrainConfig
from comet_ray.errors import CometError
from comet_ray.features.store import FeatureStore
from comet_ray.models import build_detector, detector_from_hparams
from comet_ray.models.flow import AffineCoupling, PatchFlow, positional_encoding_2d
from comet_ray.models.protocol import Detector


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared CPU cores: keep each test on one thread, and give the setting back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised last subnet layers random values, so the flow is not the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, AffineCoupling):
                last = layer.subnet[-1]
                last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * std)
                last.bias.copy_(torch.randn(last.bias.shape, generator=generator) * std)
    return module


def small_flow(dim: int = 12, grid: tuple[int, int] = (2, 3), blocks: int = 3, **kwargs) -> PatchFlow:
    torch.manual_seed(0)
    return randomise(PatchFlow(dim, grid=grid, blocks=blocks, hidden=16, pos_dim=8, **kwargs))


# ---------------------------------------------------------------------- the flow itself
def test_flow_starts_as_the_identity() -> None:
    torch.manual_seed(0)
    flow = PatchFlow(10, grid=(2, 2), blocks=2, hidden=8)
    x = torch.randn(3, 4, 10)
    z, log_det = flow.transform(x)
    # Only the fixed permutations act at initialisation: same values, zero log-det.
    torch.testing.assert_close(z.sort(dim=-1).values, x.sort(dim=-1).values)
    assert torch.all(log_det == 0)


def test_round_trip_x_to_z_to_x() -> None:
    flow = small_flow()
    x = torch.randn(4, 6, 12) * 2 + 0.5
    z, _ = flow.transform(x)
    assert (z - x).abs().max() > 0.1, "the randomised flow should not be the identity"
    torch.testing.assert_close(flow.inverse(z), x, atol=1e-4, rtol=1e-4)
    z_again = torch.randn(2, 6, 12)
    torch.testing.assert_close(flow.transform(flow.inverse(z_again))[0], z_again, atol=1e-4, rtol=1e-4)


def test_coupling_log_det_matches_autograd_jacobian() -> None:
    torch.manual_seed(1)
    coupling = randomise(AffineCoupling(4, cond_dim=4, hidden=8, clamp=2.0), std=0.5)
    x = torch.randn(4)
    cond = torch.randn(1, 4)
    jacobian = torch.autograd.functional.jacobian(lambda v: coupling(v[None], cond)[0][0], x)
    expected = torch.linalg.slogdet(jacobian).logabsdet
    _, log_det = coupling(x[None], cond)
    assert abs(float(expected)) > 0.05, "a non-trivial log-det makes the comparison meaningful"
    torch.testing.assert_close(log_det[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(coupling.inverse(coupling(x[None], cond)[0], cond)[0], x, atol=1e-5, rtol=1e-5)


def test_flow_log_det_and_nll_match_autograd_jacobian() -> None:
    torch.manual_seed(2)
    flow = randomise(PatchFlow(4, grid=(1, 1), blocks=3, hidden=8, pos_dim=4), std=0.5)
    x = torch.randn(1, 1, 4)
    jacobian = torch.autograd.functional.jacobian(
        lambda v: flow.transform(v.view(1, 1, 4))[0].reshape(4), x.reshape(4)
    )
    expected = torch.linalg.slogdet(jacobian).logabsdet
    z, log_det = flow.transform(x)
    assert abs(float(expected)) > 0.05
    torch.testing.assert_close(log_det[0, 0], expected, atol=1e-5, rtol=1e-5)
    # NLL = -(log N(z; 0, I) + log|det J|) / D - 0.5 log(2 pi): the constant is dropped, nothing else.
    log_density = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum() + expected
    nll = flow.patch_losses(x, torch.tensor([0]))
    expected_nll = -log_density / 4 - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(nll[0, 0], expected_nll, atol=1e-5, rtol=1e-5)


def test_patches_are_independent_and_position_conditions_the_density() -> None:
    flow = small_flow()
    x = torch.randn(2, 6, 12)
    base = flow.patch_scores(x)
    moved = x.clone()
    moved[1, 4] += 1.0
    changed = flow.patch_scores(moved) != base
    assert changed[1, 4] and int(changed.sum()) == 1, "a patch's NLL depends on that patch only"
    same_vector = x[:1, :1].expand(1, 6, 12).contiguous()
    scores = flow.patch_scores(same_vector)[0]
    assert scores.unique().numel() == 6, "the same feature vector scores differently at each grid position"


def test_positional_encoding_is_row_major_and_bounded() -> None:
    encoding = positional_encoding_2d(3, 5, 8)
    assert encoding.shape == (15, 8)
    assert encoding.abs().max() <= 1.0
    torch.testing.assert_close(encoding[7, :4], encoding[5, :4])  # same row (1), different column
    torch.testing.assert_close(encoding[7, 4:], encoding[2, 4:])  # same column (2), different row
    assert len({tuple(row.tolist()) for row in encoding}) == 15
    with pytest.raises(ValueError):
        positional_encoding_2d(2, 2, 6)


def test_grid_must_match_the_patches() -> None:
    flow = small_flow(grid=(2, 3))
    with pytest.raises(ValueError, match="grid"):
        flow.patch_scores(torch.randn(1, 5, 12))
    gridless = PatchFlow(12, grid=None, blocks=1, hidden=8)
    assert gridless.patch_scores(torch.randn(2, 9, 12)).shape == (2, 9)  # a square grid is inferred


# ---------------------------------------------------------------------- numerics
@pytest.mark.parametrize("value", [0.0, 1.0, 1e3, -1e3])
@pytest.mark.parametrize("bf16", [False, True])
def test_constant_features_stay_finite_even_when_trained_on(value: float, bf16: bool) -> None:
    """All-equal features have unbounded likelihood without the clamp; with it, loss and grads stay finite."""
    torch.manual_seed(0)
    dim, blocks, clamp = 16, 3, 2.0
    flow = PatchFlow(dim, grid=(2, 2), blocks=blocks, hidden=16, clamp=clamp, lr=1e-2)
    (optimiser,) = flow.make_optimizers()
    features = torch.full((4, 4, dim), value)
    seeds = torch.arange(4)
    bound = -clamp * blocks * math.ceil(dim / 2) / dim  # the NLL can never go below this
    for _ in range(25):
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = flow(features, seeds)
        assert losses.dtype == torch.float32 and losses.shape == (4, 4)
        assert torch.isfinite(losses).all()
        assert float(losses.detach().min()) >= bound - 1e-3
        losses.mean().backward()
        for parameter in flow.parameters():
            assert parameter.grad is None or torch.isfinite(parameter.grad).all()
        optimiser.step()
    flow.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        scores = flow.patch_scores(features)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    if value == 0.0:  # the flow squeezes the constant as far as the clamp allows
        assert float(scores.mean()) < bound / 2


def test_bf16_autocast_keeps_the_log_det_in_float32() -> None:
    flow = small_flow()
    x = torch.randn(2, 6, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, log_det = flow.transform(x)
        losses = flow.patch_losses(x, torch.arange(2))
    assert z.dtype == log_det.dtype == losses.dtype == torch.float32
    torch.testing.assert_close(losses, flow.patch_losses(x, torch.arange(2)), atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------- protocol, registry, checkpoints
def test_protocol_registry_and_json_hparams() -> None:
    config = ModelConfig(model="flow", flow_blocks=2, flow_hidden=24, flow_lr=1e-3, flow_clamp=1.5)
    flow = build_detector("flow", 20, config, (4, 4))
    assert isinstance(flow, Detector) and flow.name == "flow"
    hparams = flow.hparams()
    assert json.loads(json.dumps(hparams)) == hparams
    assert (hparams["blocks"], hparams["hidden"], hparams["clamp"], hparams["grid"]) == (2, 24, 1.5, [4, 4])
    (optimiser,) = flow.make_optimizers(lr_scale=0.5)
    assert isinstance(optimiser, torch.optim.Adam) and optimiser.param_groups[0]["lr"] == pytest.approx(5e-4)
    regularised = flow.regularised_parameters()
    assert len(regularised) == 2 * 2 and all(p.dim() == 2 for p in regularised)
    assert len(flow.regularised_parameters(include_norm_and_bias=True)) == len(list(flow.parameters()))
    rebuilt = detector_from_hparams("flow", hparams)
    assert rebuilt.hparams() == hparams
    with pytest.raises(CometError, match="flow"):
        build_detector("nope", 20, config)


def test_checkpoint_round_trip(tmp_path) -> None:
    flow = small_flow()
    path = tmp_path / "model.pt"
    save_detector(path, flow, {"backbone": "test"}, (2, 3), {"model": {"model": "flow"}}, 1.5, 0.2)
    loaded, meta = load_detector(path)
    assert isinstance(loaded, PatchFlow) and meta["model_name"] == "flow"
    assert not loaded.training
    x = torch.randn(3, 6, 12)
    torch.testing.assert_close(loaded.patch_scores(x), flow.patch_scores(x))
    torch.testing.assert_close(loaded.inverse(loaded.transform(x)[0]), x, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- the unchanged CoMet trainer
N, P, D = 40, 16, 24
OUTLIER_ROWS = [3, 17, 29, 34]


def make_store(seed: int = 0) -> FeatureStore:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(N, P, D, generator=generator) * 0.5
    for row in OUTLIER_ROWS:  # a few images whose patches sit far from the rest
        features[row, :6] += 3.0
    return FeatureStore([f"img{i:02d}" for i in range(N)], features, (4, 4))


def test_comet_trainer_trains_the_flow_and_downweights_planted_outliers() -> None:
    config = TrainConfig(epochs=4, passes=1, batch_size=8, seed=0)
    config.model = ModelConfig(model="flow", flow_blocks=2, flow_hidden=32, flow_lr=1e-3)
    config.comet.strategy = "comet"
    config.comet.meta_tasks = 2
    config.comet.task_size = 6
    config.comet.inner_steps = 2
    store = make_store()
    torch.manual_seed(0)
    model = build_detector("flow", D, config.model, store.grid)
    trainer = CometTrainer(model, store, config, injected_ids={store.ids[r] for r in OUTLIER_ROWS})
    logs = trainer.fit(config.epochs)
    assert logs[0].low_confidence == 0, "warm-up epoch trains unweighted"
    assert all(math.isfinite(log.loss) for log in logs)
    assert logs[-1].loss < logs[0].loss - 0.1
    assert logs[-1].meta_l_tr is not None and trainer.lam > 0
    weights = trainer.sample_weights
    outliers = torch.zeros(N, dtype=torch.bool)
    outliers[OUTLIER_ROWS] = True
    assert weights[outliers].max() < 1.0
    assert weights[~outliers].mean() > 0.95
    assert logs[-1].mean_weight_injected < logs[-1].mean_weight_nominal - 0.2
    scores, _ = trainer.score_training_set()
    assert scores[outliers].min() > scores[~outliers].max()


# ---------------------------------------------------------------------- real data
BOTTLE_SEEDS = (0, 1)
BOTTLE_EPOCHS = 4


@pytest.mark.integration
def test_bottle_flow_comet_does_no_harm(bottle_root, imagenet_torch_home, tmp_path_factory) -> None:
    from comet_ray.demo import demo_config
    from comet_ray.pipeline import train_category
    from comet_ray.prepare import prepare_data

    cache = tmp_path_factory.mktemp("bottle-flow-features")
    results: dict[str, list[dict]] = {"baseline": [], "comet": []}
    for seed in BOTTLE_SEEDS:
        config = demo_config(str(bottle_root), epochs=BOTTLE_EPOCHS, seed=seed)
        config.category = "mvtec_bottle"
        config.contamination = 0.15
        config.model.model = "flow"
        config.model.flow_blocks = 4
        config.model.flow_hidden = 64
        config.model.flow_lr = 1e-3
        data = prepare_data(config, torch.device("cpu"), cache_dir=str(cache))
        for strategy, runs in results.items():
            config.comet.strategy = strategy
            runs.append(train_category(config, data, torch.device("cpu")).metrics)
    for metrics in results["comet"]:
        assert metrics["model"] == "flow"
        assert metrics["mean_weight_injected"] < metrics["mean_weight_nominal"] - 0.1
    for key in ("image_auroc", "pixel_auroc"):
        base = statistics.mean(m[key] for m in results["baseline"])
        ours = statistics.mean(m[key] for m in results["comet"])
        assert base > 0.9, f"{key}: the flow baseline should work on bottle ({base:.4f})"
        assert ours >= base - 0.01, f"{key}: comet {ours:.4f} vs baseline {base:.4f}"
