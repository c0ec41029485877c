"""Data-parallel CoMet on a real local Ray (Train V2): equivalence, shards, worker failure, resume.

One module-scoped Ray (2 CPUs) and one tiny synthetic category; every run is 3 epochs of a small
SimpleNet on a random-init mobilenet_v2 at 64x64, so the whole file takes a few minutes.

Equivalence: 1 Ray worker vs the plain single-process core with the same seed gives the same SCL
weights (to 1e-4), losses and lambda. 2 workers each train on their own shard with their own batch
(a global batch twice as large, a different sample path), so they are held to the method's outcome
instead: every image weighted and scored, SCL active, image AUROC near the plain run's; and each
worker held half of the features. The driver extracts the features once (a Ray Data job); every later
run reads them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")

from comet_ray.config import CometConfig, FeatureConfig, ModelConfig, TrainConfig
from comet_ray.distributed.categories import fit_categories
from comet_ray.distributed.train import ATTEMPTS_FILE, fit_distributed
from comet_ray.pipeline import train_category
from comet_ray.prepare import prepare_data
from comet_ray.runfolder import write_run

from support.faults import KillWorkerOnce

EPOCHS = 3
ROW_BYTES = 8 * 8 * 64 * 2  # one image's features: an 8x8 patch grid (64 px, stride 8) of 64 fp16 values
WEIGHT_TOL = 1e-4
AUROC_TOL = 0.02

RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RAY_TRAIN_V2_ENABLED": "1",
}


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A smooth stripe texture with mild noise: the 'nominal' look."""
    y, x = np.mgrid[0:64, 0:64]
    phase = rng.uniform(0, 2 * np.pi)
    base = 128 + 60 * np.sin(x / 4.0 + phase) * np.cos(y / 9.0)
    pixels = base[..., None] + rng.normal(0, 8, size=(64, 64, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _write_toy(root: Path) -> Path:
    """<root>/toy/{train/good (16), test/good (6), test/dent (8), ground_truth/dent}: 64x64 PNGs."""
    category = root / "toy"
    rng = np.random.default_rng(0)
    for split, defect, count in (("train", "good", 16), ("test", "good", 6), ("test", "dent", 8)):
        folder = category / split / defect
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = _texture(rng)
            if defect == "dent":
                mask = np.zeros((64, 64), dtype=np.uint8)
                top, left = 10 + 3 * i, 12 + 2 * i
                mask[top : top + 14, left : left + 16] = 255
                pixels[mask > 0] = (rng.integers(0, 256, size=3)).astype(np.uint8)
                mask_dir = category / "ground_truth" / defect
                mask_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(mask_dir / f"{i:03d}_mask.png")
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def ray_local():
    with pytest.MonkeyPatch.context() as env:
        for name, value in RAY_ENV.items():
            env.setenv(name, value)
        ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("distributed")
    _write_toy(base / "data")
    return base


def _config(workdir: Path) -> TrainConfig:
    return TrainConfig(
        data_root=str(workdir / "data"),
        category="toy",
        contamination=0.2,
        seed=0,
        epochs=EPOCHS,
        passes=1,
        batch_size=4,
        device="cpu",
        features=FeatureConfig(
            backbone="mobilenet_v2", pretrained=False, image_size=64, feature_dim=64, batch_size=16
        ),
        model=ModelConfig(discriminator_hidden=64, noise_std=0.1),
        comet=CometConfig(strategy="comet", warmup_epochs=1, meta_tasks=2, task_size=4, inner_steps=2),
    )


def _outputs(out: str | Path) -> tuple[dict, dict, list]:
    out = Path(out)
    metrics = json.loads((out / "metrics.json").read_text())
    weights = json.loads((out / "weights.json").read_text())["weights"]
    history = json.loads((out / "history.json").read_text())
    return metrics, weights, history


def _attempts(out: str | Path) -> list[dict]:
    lines = (Path(out) / ATTEMPTS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _max_weight_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


@pytest.fixture(scope="module")
def plain_run(workdir: Path) -> Path:
    """The plain single-process core (no Ray, no torch.distributed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = _config(workdir)
        device = torch.device("cpu")
        data = prepare_data(config, device)
        result = train_category(config, data, device)
        return write_run(str(workdir / "plain"), config, data, result)
    finally:
        torch.set_num_threads(threads)


def _fit(workdir: Path, name: str, workers: int, **kwargs) -> dict:
    return fit_distributed(
        _config(workdir),
        workers=workers,
        cpus_per_worker=0.5,
        storage_path=str(workdir / "ray"),
        run_name=name,
        out=str(workdir / name),
        **kwargs,
    )


@pytest.fixture(scope="module")
def two_worker_run(ray_local, workdir: Path) -> dict:
    """The first Ray run of the module: its driver extracts the features (a Ray Data job) into the cache."""
    metrics = _fit(workdir, "two", 2)
    index = next((workdir / "ray" / "feature_cache").glob("*/index.json"))
    assert [p["node"] for p in json.loads(index.read_text())["parts"]]  # parts embedded by Ray Data actors
    return metrics


def test_one_worker_equals_single_process(
    ray_local, workdir: Path, plain_run: Path, two_worker_run: dict, capsys
) -> None:
    capsys.readouterr()
    one = _fit(workdir, "one", 1)
    assert (
        "features: read 30 images from the cache" in capsys.readouterr().out
    )  # the driver extracted nothing
    plain_metrics, plain_weights, plain_history = _outputs(plain_run)
    _, one_weights, one_history = _outputs(one["out"])

    assert len(one_history) == len(plain_history) == EPOCHS
    # SCL is active after warm-up: the weights compared are not trivially all ones.
    assert min(plain_weights.values()) < 1.0
    assert _max_weight_gap(one_weights, plain_weights) <= WEIGHT_TOL
    for key in ("image_auroc", "validation_image_auroc"):
        assert abs(one[key] - plain_metrics[key]) <= AUROC_TOL, key
    assert [e["loss"] for e in one_history] == pytest.approx([e["loss"] for e in plain_history], rel=1e-4)
    # What comet-ray audit reads is recorded the same way: every epoch's weights, the final scores.
    plain_audit = json.loads((Path(plain_run) / "weights.json").read_text())
    one_audit = json.loads((Path(one["out"]) / "weights.json").read_text())
    assert one_audit["per_epoch"]["below_one"].keys() == plain_audit["per_epoch"]["below_one"].keys()
    for sample_id, row in plain_audit["per_epoch"]["below_one"].items():
        assert one_audit["per_epoch"]["below_one"][sample_id] == pytest.approx(row, abs=WEIGHT_TOL)
    assert _max_weight_gap(one_audit["scores"], plain_audit["scores"]) <= 1e-3
    assert plain_history[-1]["det_sigma"] > 0
    assert [e["det_sigma"] for e in one_history] == pytest.approx(
        [e["det_sigma"] for e in plain_history], abs=1e-3
    )
    assert [e["lam"] for e in one_history] == pytest.approx([e["lam"] for e in plain_history], rel=1e-3)


def test_two_workers_each_hold_and_train_on_half(
    ray_local, workdir: Path, plain_run: Path, two_worker_run: dict
) -> None:
    plain_metrics, plain_weights, _ = _outputs(plain_run)
    two = two_worker_run
    _, two_weights, two_history = _outputs(two["out"])
    assert len(two_history) == EPOCHS and two_weights.keys() == plain_weights.keys()
    # SCL ran on the gathered scores of both shards: every image has a weight and a final score, some below 1.
    two_audit = json.loads((Path(two["out"]) / "weights.json").read_text())
    assert two_audit["per_epoch"]["epochs"] == EPOCHS and two_audit["scores"].keys() == plain_weights.keys()
    # (which image the fence catches in which epoch varies with the shard order on this tiny random-init set)
    assert any(min(row) < 1.0 for row in two_audit["per_epoch"]["below_one"].values())
    assert two_history[-1]["lam"] > 0 and two_history[-1]["det_sigma"] >= 0
    # It detects (random-init features, 3 epochs, ~10 report images: too few for a tight bound; the
    # quality comparison of N = 2 with N = 1 is on MVTec bottle, tests/test_scaling_quality.py).
    # Better than chance on both granularities (a single image flips the image AUROC here by ~0.08).
    for run in (two, plain_metrics):
        assert run["image_auroc"] > 0.5 and run["pixel_auroc"] >= 0.65, run
    # Each worker held its half of every split (the category: 30 images).
    attempts = [a for a in _attempts(two["out"]) if "feature_bytes" in a]
    assert sorted(a["rank"] for a in attempts) == [0, 1] and all(a["world_size"] == 2 for a in attempts)
    held = sorted(a["feature_bytes"] // ROW_BYTES for a in attempts)
    assert sum(held) == 30 and held[1] - held[0] <= 3  # each split's shards differ by one image at most


def test_knn_with_two_workers_builds_one_bank_from_the_shards(
    ray_local, workdir: Path, two_worker_run: dict
) -> None:
    """--model knn --workers 2: each worker chooses the coreset of its half (it holds only that half), and
    the two are merged into one bank of about the single process's size, the same on both workers."""
    config = dataclasses.replace(
        _config(workdir), model=ModelConfig(model="knn"), comet=CometConfig(strategy="baseline")
    )
    device = torch.device("cpu")
    data = prepare_data(config, device)
    single = train_category(config, data, device).metrics
    budget = 20 * ROW_BYTES  # 20 of the category's 30 images: the bank cannot be built in one worker
    two = fit_distributed(
        config,
        workers=2,
        cpus_per_worker=0.5,
        storage_path=str(workdir / "ray"),
        run_name="knn-two",
        out=str(workdir / "knn-two"),
        worker_feature_memory=budget,
    )
    metrics = json.loads((workdir / "knn-two" / "metrics.json").read_text())
    assert metrics["model"] == "knn" and metrics["bank_shards"] == 2 and "bank_shards" not in single
    n_train, patches = single["n_train"], 8 * 8
    shard_banks = [max(1, round(0.1 * len(range(r, n_train, 2)) * patches)) for r in (0, 1)]
    assert metrics["bank_rows"] == sum(shard_banks) and abs(metrics["bank_rows"] - single["bank_rows"]) <= 1
    state = torch.load(workdir / "knn-two" / "model.pt", map_location="cpu", weights_only=True)
    assert (
        state["model_state"]["bank"].shape[0] == state["model_hparams"]["bank_size"] == metrics["bank_rows"]
    )
    attempts = [a for a in _attempts(workdir / "knn-two") if "feature_bytes" in a]
    assert (
        sorted(a["rank"] for a in attempts) == [0, 1] and max(a["feature_bytes"] for a in attempts) <= budget
    )
    for key in ("image_auroc", "pixel_auroc"):
        assert abs(two[key] - single[key]) <= 0.05, (key, two[key], single[key])


def test_a_worker_feature_budget_below_the_category_needs_two_workers(ray_local, workdir: Path) -> None:
    from comet_ray.errors import CometError

    budget = 20 * ROW_BYTES  # 20 of the category's 30 images
    with pytest.raises(CometError, match=r"with 1 worker\(s\), over the") as error:
        _fit(workdir, "budget", 1, worker_feature_memory=budget)
    assert "use more workers" in str(error.value) and not (workdir / "budget").exists()


@pytest.mark.kill
def test_worker_kill_recovers_from_last_checkpoint(ray_local, workdir: Path, two_worker_run: dict) -> None:
    marker = workdir / "killed.marker"
    killed = _fit(workdir, "kill", 2, max_failures=2, epoch_callbacks=[KillWorkerOnce(1, 0, marker)])
    assert marker.exists()
    attempts = _attempts(killed["out"])
    # First attempt: both ranks from scratch; after the kill at the end of epoch 1 (its checkpoint
    # registered), exactly one restart, both ranks resuming at epoch 2: nothing before it is redone.
    starts = sorted((a["start_epoch"], a["rank"]) for a in attempts)
    assert starts == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert killed["resumed_from_epoch"] == 2
    _, killed_weights, killed_history = _outputs(killed["out"])
    assert [e["epoch"] for e in killed_history] == list(range(EPOCHS))
    assert abs(killed["image_auroc"] - two_worker_run["image_auroc"]) <= 0.05
    # The checkpoint holds the whole CoMet state, so the resumed run matches the uninterrupted one.
    _, two_weights, _ = _outputs(two_worker_run["out"])
    assert _max_weight_gap(killed_weights, two_weights) <= WEIGHT_TOL
    # The per-epoch weights from before the kill came back with the checkpoint.
    killed_epochs = json.loads((Path(killed["out"]) / "weights.json").read_text())["per_epoch"]
    two_epochs = json.loads((Path(two_worker_run["out"]) / "weights.json").read_text())["per_epoch"]
    assert killed_epochs["epochs"] == EPOCHS and killed_epochs["unknown_epochs"] == []
    assert killed_epochs["below_one"].keys() == two_epochs["below_one"].keys()


def test_same_run_name_resumes_instead_of_retraining(ray_local, workdir: Path, two_worker_run: dict) -> None:
    out = Path(two_worker_run["out"])
    before = len(_attempts(out))
    again = _fit(workdir, "two", 2)
    new = _attempts(out)[before:]
    assert sorted(a["rank"] for a in new) == [0, 1]
    assert all(a["start_epoch"] == EPOCHS for a in new)  # resumed from the final checkpoint: no epoch rerun
    assert again["image_auroc"] == pytest.approx(two_worker_run["image_auroc"])
    history_again = _outputs(out)[2]
    assert [e["epoch"] for e in history_again] == list(range(EPOCHS))
    # Ray kept at most num_to_keep (2) checkpoints of the run.
    checkpoints = [p for p in (workdir / "ray" / "two").iterdir() if p.name.startswith("epoch_")]
    assert 1 <= len(checkpoints) <= 2


def test_fit_categories_runs_categories_concurrently(ray_local, workdir: Path) -> None:
    data = workdir / "data"
    if not (data / "toy2").exists():
        shutil.copytree(data / "toy", data / "toy2")
    base = dataclasses.replace(_config(workdir), epochs=1)
    configs = [
        dataclasses.replace(base, category="toy", out=str(workdir / "cats" / "toy")),
        dataclasses.replace(base, category="toy2", out=str(workdir / "cats" / "toy2")),
    ]
    rows, table = fit_categories(
        configs, workers=1, cpus_per_worker=1, storage_path=str(workdir / "ray-cats")
    )
    assert [r["category"] for r in rows] == ["toy", "toy2"]
    assert all("error" not in r for r in rows)
    # Same images under two names: the same numbers.
    assert rows[0]["image_auroc"] == pytest.approx(rows[1]["image_auroc"])
    summary = json.loads((workdir / "ray-cats" / "summary.json").read_text())
    assert [r["category"] for r in summary] == ["toy", "toy2"]
    assert "image_auroc" in table.splitlines()[0] and len(table.splitlines()) == 4


def test_cli_trains_every_category_through_ray_train(ray_local, tmp_path: Path) -> None:
    """`comet-ray train --category all --workers 1`: one TorchTrainer per category and a summary table.

    It trains the normalizing flow: the Ray layer has no model-specific code (SimpleNet is covered above).
    """
    from comet_ray.cli import main
    from comet_ray.data.synthetic import make_texture_category

    for name, seed in (("weave", 1), ("felt", 2)):
        make_texture_category(
            tmp_path / "data", name, n_train=12, n_test_good=6, defects={"spot": 6}, size=64, seed=seed
        )
    out = tmp_path / "runs"
    code = main(
        [
            "train",
            str(tmp_path / "data"),
            "--category",
            "all",
            "--workers",
            "1",
            "--cpus-per-worker",
            "0.5",
            "--backbone",
            "mobilenet_v2",
            "--no-pretrained",
            "--image-size",
            "64",
            "--feature-dim",
            "32",
            "--epochs",
            "2",
            "--passes",
            "1",
            "--batch-size",
            "4",
            "--set",
            "discriminator_hidden=32",
            "--set",
            "inner_steps=1",
            "--set",
            "meta_tasks=2",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--model",
            "flow",
            "--set",
            "flow_blocks=2",
            "--set",
            "flow_hidden=32",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(row["category"] for row in summary) == ["felt", "weave"]
    for name in ("felt", "weave"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["category"] == name and metrics["model"] == "flow"


def test_two_workers_print_one_line_per_epoch_and_no_raw_reports(tiny_category: Path, tmp_path: Path) -> None:
    """`comet-ray train --workers 2` as a user runs it (its own process, its own local Ray): rank 0 prints one
    line per epoch, once; no raw ``TrainingReport(...)``, no Ray Train INFO chatter, no botocore notices;
    ``--verbose`` brings Ray Train's lines back."""
    import os
    import subprocess
    import sys

    from support import LOCAL_ENV, TINY_TRAIN_ARGS

    env = {**os.environ, **LOCAL_ENV, "RAY_ADDRESS": ""}

    def run(*extra: str) -> str:
        command = [
            sys.executable,
            "-m",
            "comet_ray",
            *extra,
            "train",
            str(tiny_category),
            "--category",
            "weave",
            "--workers",
            "2",
            "--cpus-per-worker",
            "0.5",
            "--out",
            str(tmp_path / f"run{len(extra)}"),
            *TINY_TRAIN_ARGS,
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    output = run()
    epoch_lines = [line for line in output.splitlines() if "| loss " in line]
    assert [line.split("epoch", 1)[1].split("|")[0].strip() for line in epoch_lines] == ["1/2", "2/2"], output
    for chatter in (
        "TrainingReport(",
        "Reporting training result",
        "Checkpoint successfully created",
        "Setting up process group",
        "Found credentials",
    ):
        assert chatter not in output, chatter
    assert "TrainingReport(" in run(
        "--verbose"
    )  # the lines are Ray's, held back only at the default verbosity
