"""A real Ray Tune sweep on a tiny dataset: files, selection without test labels or reported images,
an equally tuned baseline, resume."""

from __future__ import annotations

import dataclasses
import json
import random
import time

import pytest

from comet_ray.config import FeatureConfig, ModelConfig, TrainConfig
from comet_ray.data.synthetic import make_texture_category
from comet_ray.distributed.tune import (
    BASE_DETECTOR_KNOBS,
    SELECTION_COLUMNS,
    SweepSettings,
    chosen_knobs,
    load_search_space,
    repeat_configs,
    select_best,
    sweep,
)
from comet_ray.errors import CometError

from support import csv_rows

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
    settings = SweepSettings(
        levels=[0.0, 0.2],
        trials=2,
        storage_path=str(work / "store"),
        out=str(work / "out"),
        seeds=1,
        cpus_per_trial=1.0,
    )
    summary = sweep(tiny_base(root), settings)
    return root, work, settings, summary


def read_rows(path) -> list[dict]:
    rows = csv_rows(path)
    for row in rows:
        row["level"] = float(row["level"])
        for column in SELECTION_COLUMNS:
            row[column] = float(row[column]) if row.get(column) else None
    return rows


COMET_ONLY_SPACE = "fence_k: {uniform: [0.5, 3.0]}\nlambda0: {loguniform: [1.0e-4, 1.0e-2]}\n"


def test_sweep_writes_results_best_and_plot(swept) -> None:
    _, work, _, _ = swept
    out = work / "out"
    rows = read_rows(out / "results.csv")
    assert len(rows) == 8 and {r["level"] for r in rows} == {0.0, 0.2}
    comet = [r for r in rows if r["strategy"] == "comet"]
    assert all(r["knob_fence_k"] and r["knob_lambda0"] for r in comet)
    finished = [r for r in rows if r["objective"] is not None]
    assert finished and all(r["final_loss"] is not None for r in finished)
    assert any(r["validation_aupro"] is not None for r in finished)  # the tie-breaker is there
    for level in ("0", "0.2"):
        best = json.loads((out / f"rho_{level}" / "best.json").read_text())
        level_rows = [r for r in finished if r["level"] == float(level) and r["strategy"] == "comet"]
        assert best["objective"] == pytest.approx(max(r["objective"] for r in level_rows))
        assert best["trial_id"] == select_best(rows)[float(level)]["trial_id"]
    seeds = csv_rows(out / "seeds.csv")
    assert {r["strategy"] for r in seeds} == {"baseline", "comet"} and len(seeds) == 4
    assert (out / "contamination.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class NoTestColumns(dict):
    """A result row that fails the test if anything reads one of its test columns."""

    def __getitem__(self, key):
        assert not str(key).startswith("test_"), f"selection read {key}"
        return super().__getitem__(key)

    def get(self, key, default=None):
        assert not str(key).startswith("test_"), f"selection read {key}"
        return super().get(key, default)

    def items(self):
        raise AssertionError("selection iterated over a whole row")

    values = keys = __iter__ = items


def test_selection_never_reads_test_labels(swept) -> None:
    """Selection never touches a test column, and scrambling them (as if the test labels were
    shuffled) does not change the choice."""
    _, work, _, _ = swept
    rows = read_rows(work / "out" / "results.csv")
    chosen = {level: row["trial_id"] for level, row in select_best(rows).items()}
    for strategy in ("baseline", "comet"):
        guarded = select_best([NoTestColumns(r) for r in rows], strategy=strategy)
        assert {k: r["trial_id"] for k, r in guarded.items()} == {
            k: r["trial_id"] for k, r in select_best(rows, strategy=strategy).items()
        }
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


def test_baseline_is_tuned_with_the_same_budget(swept) -> None:
    """Per level the baseline searches the base-detector knobs with as many trials as CoMet searches
    its own, and CoMet trains on the base knobs chosen for the baseline: one base detector for both."""
    _, work, settings, _ = swept
    rows = read_rows(work / "out" / "results.csv")
    for level in (0.0, 0.2):
        baseline = [r for r in rows if r["level"] == level and r["strategy"] == "baseline"]
        comet = [r for r in rows if r["level"] == level and r["strategy"] == "comet"]
        assert len(baseline) == len(comet) == settings.trials
        assert all(set(chosen_knobs(r)) == BASE_DETECTOR_KNOBS & set(load_search_space()) for r in baseline)
        best_base = json.loads((work / "out" / f"rho_{level:g}" / "best_baseline.json").read_text())
        for row in comet:
            assert {k: row[f"knob_{k}"] for k in chosen_knobs(best_base)} == {
                k: str(v) for k, v in chosen_knobs(best_base).items()
            }


def test_repeats_never_report_on_images_selection_saw(swept) -> None:
    """Every repeat trains and reports on the split its configuration was selected on: no validation
    image of that split is reported on or moved into training."""
    _, work, _, _ = swept
    out = work / "out"
    results = read_rows(out / "results.csv")
    for level in ("0", "0.2"):
        selection = json.loads((out / f"rho_{level}" / "selection_split.json").read_text())
        seen = set(selection["validation_ids"])
        assert seen and {r["split_seed"] for r in results if r["level"] == float(level)} == {
            str(selection["split_seed"])
        }
        manifests = sorted((out / f"rho_{level}" / "repeats").glob("*.manifest.json"))
        assert len(manifests) == 2
        for path in manifests:
            manifest = json.loads(path.read_text())
            assert manifest["split_seed"] == selection["split_seed"]
            assert not seen & set(manifest["report_ids"])
            assert not seen & {m["sample_id"] for m in manifest["contamination"]["moved"]}


def test_repeat_seeds_vary_training_only(tmp_path) -> None:
    """Repeats over training seeds keep the split; had the split followed the seed (as it once did),
    most validation images would have been reported on."""
    from comet_ray.prepare import check_trainable, select_samples

    make_texture_category(tmp_path, "weave", n_train=16, n_test_good=8, defects={"spot": 10}, size=32, seed=3)
    base = tiny_base(tmp_path)
    base.seed, base.split_seed = 5, 11
    samples = check_trainable(base).samples
    configs = repeat_configs(base, 0.2, {"baseline": {}, "comet": {"fence_k": 2.0}}, seeds=3)
    assert sorted({c.seed for c in configs}) == [5, 6, 7] and {c.data_seed for c in configs} == {11}
    assert [c.comet.strategy for c in configs[:2]] == ["baseline", "comet"] and configs[
        1
    ].comet.fence_k == 2.0
    _, selected, _, _ = select_samples(samples, configs[0])
    seen = {s.sample_id for s in selected}
    for config in configs:
        train, _, report, _ = select_samples(samples, config)
        assert not seen & {s.sample_id for s in report + train}
    leaked = 0
    for seed in (6, 7):
        _, _, report, _ = select_samples(samples, dataclasses.replace(configs[0], split_seed=seed))
        leaked += len(seen & {s.sample_id for s in report})
    assert leaked > 0


def test_saturated_objective_still_separates_trials() -> None:
    """All trials at validation AUROC 1.0: the validation AUPRO decides, then the lower training loss,
    never the order of the rows (the first row used to win, whatever it was)."""

    def row(trial_id, objective, aupro, loss, strategy="comet"):
        return {
            "level": 0.1,
            "strategy": strategy,
            "trial_id": trial_id,
            "objective": objective,
            "validation_aupro": aupro,
            "final_loss": loss,
        }

    rows = [
        row("a", 1.0, 0.70, 0.1),
        row("b", 1.0, 0.80, 0.3),
        row("c", 1.0, 0.80, 0.2),
        row("d", 0.9, 0.99, 0.0),
        row("e", None, 0.9, 0.0),
        row("f", 1.0, 0.9, 0.0, "baseline"),
    ]
    assert select_best(rows)[0.1]["trial_id"] == "c"
    assert select_best(rows, strategy="baseline")[0.1]["trial_id"] == "f"
    no_masks = [{**r, "validation_aupro": None} for r in rows]  # no validation masks: the loss decides
    assert select_best(no_masks)[0.1]["trial_id"] == "a"
    unsupervised = [{**r, "objective": r["final_loss"] + 1} for r in rows]
    assert select_best(unsupervised, objective="unsupervised")[0.1]["trial_id"] in ("d", "e")


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
    make_texture_category(
        tmp_path / "data", "weave", n_train=12, n_test_good=6, defects={"spot": 6}, size=64, seed=4
    )
    base = tiny_base(tmp_path / "data")
    base.epochs = 2
    base.model.model = "flow"
    base.model.flow_blocks = 2
    base.model.flow_hidden = 32
    space = tmp_path / "space.yaml"  # the flow's own base knob for the baseline, one CoMet knob
    space.write_text("flow_lr: {loguniform: [1.0e-4, 1.0e-3]}\nfence_k: {uniform: [0.5, 3.0]}\n")
    settings = SweepSettings(
        levels=[0.2],
        trials=2,
        storage_path=str(tmp_path / "store"),
        out=str(tmp_path / "out"),
        seeds=0,
        cpus_per_trial=1.0,
        space_file=str(space),
    )
    sweep(base, settings)
    rows = read_rows(tmp_path / "out" / "results.csv")
    # ASHA may stop one trial early (trials race); at least one of each must finish with an objective.
    assert len(rows) == 4 and {r["strategy"] for r in rows} == {"baseline", "comet"}
    assert all(
        any(r["objective"] is not None for r in rows if r["strategy"] == s) for s in ("baseline", "comet")
    )


def test_trials_that_train_with_ray_train_workers(local_ray, tmp_path) -> None:
    """``tune --workers N``: each trial fits a TorchTrainer whose per-epoch reports reach Tune.

    Tune checks every result for the searched metric; the workers' reports must carry ``objective``
    (this path failed every trial before), and a finished sweep leaves every CPU free again.
    """
    make_texture_category(
        tmp_path / "data", "weave", n_train=12, n_test_good=6, defects={"spot": 6}, size=64, seed=5
    )
    base = tiny_base(tmp_path / "data")
    base.epochs = 2
    space = tmp_path / "space.yaml"  # CoMet knobs only: no baseline search, two trials in all
    space.write_text(COMET_ONLY_SPACE)
    settings = SweepSettings(
        levels=[0.0],
        trials=2,
        storage_path=str(tmp_path / "store"),
        out=str(tmp_path / "out"),
        seeds=0,
        workers=1,
        cpus_per_trial=0.25,
        cpus_per_worker=0.5,
        space_file=str(space),
    )
    sweep(base, settings)
    rows = read_rows(tmp_path / "out" / "results.csv")
    assert len(rows) == 2 and all(r["objective"] is not None for r in rows)  # FIFO here: no early stop
    assert all(0.0 <= r["objective"] <= 1.0 for r in rows)
    best = json.loads((tmp_path / "out" / "rho_0" / "best.json").read_text())
    assert best["objective"] == max(r["objective"] for r in rows)
    assert all(r["final_loss"] is not None for r in rows)  # the tie-breakers reach Tune from the workers
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2, "a trial's placement group was not released"
