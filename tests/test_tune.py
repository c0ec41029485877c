"""A real Ray Tune sweep on a tiny dataset: files, selection without test labels, resume."""

from __future__ import annotations

import csv
import json
import random
import time

import pytest

from comet_ray.config import FeatureConfig, ModelConfig, TrainConfig
from comet_ray.data.synthetic import make_texture_category
from comet_ray.distributed.tune import SweepSettings, load_search_space, select_best, sweep
from comet_ray.errors import CometError

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny_base(root) -> TrainConfig:
    base = TrainConfig(data_root=str(root), category="weave", epochs=3, passes=1, batch_size=4, device="cpu")
    base.features = FeatureConfig(backbone="mobilenet_v2", image_size=64, feature_dim=32, pretrained=False)
    base.model = ModelConfig(noise_std=0.1, discriminator_hidden=32)
    base.comet.inner_steps = 1
    base.comet.meta_tasks = 2
    return base


@pytest.fixture(scope="module")
def swept(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-data")
    make_texture_category(root, "weave", n_train=16, n_test_good=8, defects={"spot": 10}, size=64, seed=3)
    work = tmp_path_factory.mktemp("tune-work")
    settings = SweepSettings(levels=[0.0, 0.2], trials=3, storage_path=str(work / "store"), out=str(work / "out"),
                             seeds=1, cpus_per_trial=1.0)
    summary = sweep(tiny_base(root), settings)
    return root, work, settings, summary


def read_rows(path) -> list[dict]:
    rows = list(csv.DictReader(open(path)))
    for row in rows:
        row["level"] = float(row["level"])
        row["objective"] = float(row["objective"]) if row["objective"] else None
    return rows


def test_sweep_writes_results_best_and_plot(swept) -> None:
    _, work, _, summary = swept
    out = work / "out"
    rows = read_rows(out / "results.csv")
    assert len(rows) == 6 and {r["level"] for r in rows} == {0.0, 0.2}
    assert all(r["knob_fence_k"] and r["knob_lambda0"] for r in rows)
    for level in ("0", "0.2"):
        best = json.loads((out / f"rho_{level}" / "best.json").read_text())
        finished = [r for r in rows if r["level"] == float(level) and r["objective"] is not None]
        assert best["objective"] == pytest.approx(max(r["objective"] for r in finished))
    seeds = list(csv.DictReader(open(out / "seeds.csv")))
    assert {r["strategy"] for r in seeds} == {"baseline", "comet"} and len(seeds) == 4
    assert (out / "contamination.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_selection_never_reads_test_labels(swept) -> None:
    """Scrambling every test metric (as if the test labels were shuffled) must not change the choice."""
    _, work, _, _ = swept
    rows = read_rows(work / "out" / "results.csv")
    chosen = {level: row["trial_id"] for level, row in select_best(rows).items()}
    rng = random.Random(0)
    test_columns = [c for c in rows[0] if c.startswith("test_")]
    for _ in range(5):
        scrambled = [dict(r) for r in rows]
        for column in test_columns:
            values = [r[column] for r in scrambled]
            rng.shuffle(values)
            for row, value in zip(scrambled, values):
                row[column] = value
        assert {level: row["trial_id"] for level, row in select_best(scrambled).items()} == chosen


def test_rerun_with_same_storage_resumes_instead_of_retraining(swept) -> None:
    root, work, settings, _ = swept
    before = read_rows(work / "out" / "results.csv")
    settings.seeds = 0
    settings.out = str(work / "out-again")
    sweep(tiny_base(root), settings)
    after = read_rows(work / "out-again" / "results.csv")
    assert sorted(r["trial_id"] for r in after) == sorted(r["trial_id"] for r in before)


def test_search_space_is_validated(tmp_path) -> None:
    space = load_search_space()
    assert "fence_k" in space and "lambda0" in space
    assert "noise_std" not in load_search_space(objective="unsupervised")
    bad = tmp_path / "space.yaml"
    bad.write_text("fence_kappa: {uniform: [0, 1]}\n")
    with pytest.raises(CometError, match="not a comet-ray knob"):
        load_search_space(bad)


def test_flow_model_sweeps_with_the_same_tune_code(local_ray, tmp_path) -> None:
    """Model-agnostic: the normalizing flow goes through the same trial code as SimpleNet."""
    make_texture_category(tmp_path / "data", "weave", n_train=12, n_test_good=6, defects={"spot": 6}, size=64, seed=4)
    base = tiny_base(tmp_path / "data")
    base.epochs = 2
    base.model.model = "flow"
    base.model.flow_blocks = 2
    base.model.flow_hidden = 32
    settings = SweepSettings(levels=[0.2], trials=2, storage_path=str(tmp_path / "store"), out=str(tmp_path / "out"),
                             seeds=0, cpus_per_trial=1.0, space_file=None)
    sweep(base, settings)
    rows = read_rows(tmp_path / "out" / "results.csv")
    # ASHA may stop one trial early (trials race); at least one must finish with an objective.
    assert len(rows) == 2 and any(r["objective"] is not None for r in rows)


def test_trials_that_train_with_ray_train_workers(local_ray, tmp_path) -> None:
    """``tune --workers N``: each trial fits a TorchTrainer whose per-epoch reports reach Tune.

    Tune checks every result for the searched metric; the workers' reports must carry ``objective``
    (this path failed every trial before), and a finished sweep leaves every CPU free again.
    """
    make_texture_category(tmp_path / "data", "weave", n_train=12, n_test_good=6, defects={"spot": 6}, size=64, seed=5)
    base = tiny_base(tmp_path / "data")
    base.epochs = 2
    settings = SweepSettings(levels=[0.0], trials=2, storage_path=str(tmp_path / "store"), out=str(tmp_path / "out"),
                             seeds=0, workers=1, cpus_per_trial=0.25, cpus_per_worker=0.5)
    sweep(base, settings)
    rows = read_rows(tmp_path / "out" / "results.csv")
    assert len(rows) == 2 and all(r["objective"] is not None for r in rows)  # FIFO here: no early stop
    assert all(0.0 <= r["objective"] <= 1.0 for r in rows)
    best = json.loads((tmp_path / "out" / "rho_0" / "best.json").read_text())
    assert best["objective"] == max(r["objective"] for r in rows)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2, "a trial's placement group was not released"
