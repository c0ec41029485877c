"""Schedule and noise study on cached features: per-epoch VALIDATION image AUROC of SimpleNet and the flow.

For each set, contamination level, model and ``noise_std`` (SimpleNet only), one CoMet run of the longest
schedule asked for, with every epoch's validation image AUROC (and, for SimpleNet, the same after
re-estimating BatchNorm statistics on the training set: ``bn_recalibrate``), the discriminator's
separation, the main-phase optimizer steps so far and lambda(Sigma). The epoch loop has no learning-rate
decay, so epoch 6 of a 24 x 1 run IS the 6 x 1 schedule; ``--floors`` adds runs whose passes per epoch are
raised to a floor of optimizer steps (``min_steps``). Every run uses ``--split-seed`` for the
contamination draw and the validation split: keep it disjoint from the seeds bench/quality.py reports on
(its seed s uses split seed s), so defaults are never chosen on the images the table reports.

    nice -n 5 python bench/schedule.py --out /tmp/schedule --jobs 2        # the README's study
    python bench/schedule.py --out /tmp/s --sets weave --epochs 4 --noise 0.4 --floors ""   # a quick look

Output: one line per epoch per run, a summary table at the epochs of ``--at`` and ``OUT/schedule.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from quality import ALL_SETS, MOBILENET_WEIGHTS, base_config, data_sets  # bench/ is this script's folder

from comet_ray import jsonfile
from comet_ray.comet.schedule import recalibrate_batchnorm
from comet_ray.evaluate import validation_auroc
from comet_ray.pipeline import train_category
from comet_ray.prepare import prepare_data


def bn_recalibrated_auroc(trainer, data) -> float:
    """Validation AUROC of a copy of the current model with BatchNorm statistics re-estimated as
    ``bn_recalibrate`` does at the end of a run (one pass of the training set)."""
    model = copy.deepcopy(trainer.model)
    batches = (
        (trainer.store.batch(b, trainer.device), trainer._sample_seeds(b, 17))
        for b in trainer._batches(trainer._generator(17))
    )
    if not recalibrate_batchnorm(model, batches):
        return float("nan")
    return validation_auroc(model, data.validation, data.validation_labels, trainer.device)


def study_run(args, data_set, rho: float, model: str, noise: float | None, floor: int) -> dict:
    config = base_config(args, data_set, rho, args.seed)
    config.split_seed = args.split_seed
    config.model.model = model
    config.comet.strategy = args.strategy
    config.min_steps = floor
    if noise is not None:
        config.model.noise_std = noise
    data = prepare_data(config, torch.device("cpu"), cache_dir=args.cache)
    curve = []

    def on_epoch_end(trainer, log) -> None:
        steps = (log.epoch + 1) * trainer.passes * len(trainer.global_batch)
        row = {
            "epoch": log.epoch + 1,
            "steps": steps,
            "lam": log.lam,
            "det_sigma": log.det_sigma,
            "loss": log.loss,
            "separation": log.extra.get("separation"),
            "val_auroc": validation_auroc(
                trainer.model, data.validation, data.validation_labels, trainer.device
            ),
            "w_injected": log.mean_weight_injected,
            "w_nominal": log.mean_weight_nominal,
        }
        if model == "simplenet" and log.epoch + 1 in args.at_epochs:  # one more pass each: only where shown
            row["val_auroc_bn"] = bn_recalibrated_auroc(trainer, data)
        curve.append(row)

    start = time.perf_counter()
    train_category(config, data, torch.device("cpu"), on_epoch_end=on_epoch_end, evaluate=False)
    run = {
        "set": data_set.name,
        "contamination": rho,
        "model": model,
        "noise_std": noise,
        "min_steps": floor,
        "passes": args.passes,
        "epochs": args.epochs,
        "seed": args.seed,
        "split_seed": args.split_seed,
        "n_train": len(data.train.store),
        "n_validation": len(data.validation.store),
        "seconds": time.perf_counter() - start,
        "curve": curve,
    }
    tag = (
        f"{data_set.name} rho={rho:g} {model}"
        + (f" noise={noise:g}" if noise is not None else "")
        + (f" min_steps={floor}" if floor else "")
    )
    for row in curve:
        print(
            f"  {tag} epoch {row['epoch']:>2} steps {row['steps']:>5}: val AUROC {row['val_auroc']:.4f}"
            + (f" (bn {row['val_auroc_bn']:.4f})" if "val_auroc_bn" in row else "")
            + ("" if row["separation"] is None else f" sep {row['separation']:.3f}")
            + f" lambda {row['lam']:.6f}",
            flush=True,
        )
    print(f"{tag}: {run['seconds']:.0f} s", flush=True)
    return run


def summary(runs: list[dict], at: list[int]) -> str:
    """Validation image AUROC at the chosen epochs, mean over sets, per (model, noise, floor, rho)."""
    keys = sorted({(r["model"], r["noise_std"] or 0.0, r["min_steps"], r["contamination"]) for r in runs})
    lines = [
        "| model | noise_std | min_steps | ρ | "
        + " | ".join(f"epoch {e}" for e in at)
        + " | "
        + " | ".join(f"epoch {e} bn" for e in at)
        + " |",
        "|" + "---|" * (4 + 2 * len(at)),
    ]
    for model, noise, floor, rho in keys:
        chosen = [
            r
            for r in runs
            if (r["model"], r["noise_std"] or 0.0, r["min_steps"], r["contamination"])
            == (model, noise, floor, rho)
        ]

        def cell(epoch: int, column: str, chosen=chosen) -> str:
            values = [
                row[column] for r in chosen for row in r["curve"] if row["epoch"] == epoch and column in row
            ]
            return f"{statistics.mean(values):.3f}" if values else "-"

        lines.append(
            f"| {model} | {noise:g} | {floor} | {rho:g} | "
            + " | ".join(cell(e, "val_auroc") for e in at)
            + " | "
            + " | ".join(cell(e, "val_auroc_bn") for e in at)
            + " |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sets", default=",".join(ALL_SETS))
    parser.add_argument("--contamination", default="0,0.2")
    parser.add_argument("--models", default="simplenet,flow")
    parser.add_argument("--noise", default="0.1,0.2,0.4", help="SimpleNet noise_std values")
    parser.add_argument(
        "--floors", default="", help="extra SimpleNet runs (default noise) with these min_steps"
    )
    parser.add_argument("--floor-noise", type=float, default=0.4)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--strategy", default="comet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split-seed",
        type=int,
        default=100,
        help="contamination draw and validation split; disjoint from quality.py's seeds 0, 1, 2",
    )
    parser.add_argument("--at", default="6,12,24", help="epochs shown in the summary table")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--cache", default=None, help="feature cache folder (default OUT/feature-cache)")
    args = parser.parse_args()
    args.at_epochs = [int(e) for e in args.at.split(",") if e]
    args.backbone, args.image_size, args.feature_dim, args.set = "mobilenet_v2", 128, None, {}
    args.weights = str(MOBILENET_WEIGHTS) if MOBILENET_WEIGHTS.is_file() else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.cache = args.cache or str(out / "feature-cache")
    sets = data_sets([s for s in args.sets.split(",") if s], Path(args.cache).parent)
    rhos = [float(r) for r in args.contamination.split(",")]
    jobs = []
    for data_set in sets:
        prepare_data(
            base_config(args, data_set, 0.0, 0), torch.device("cpu"), cache_dir=args.cache
        )  # cache once
        for rho in rhos:
            for model in args.models.split(","):
                noises = [float(n) for n in args.noise.split(",")] if model == "simplenet" else [None]
                jobs.extend((data_set, rho, model, noise, 0) for noise in noises)
            jobs.extend(
                (data_set, rho, "simplenet", args.floor_noise, int(f)) for f in args.floors.split(",") if f
            )
    start = time.perf_counter()
    runs = []
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(
            args.jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=torch.set_num_threads,
            initargs=(1,),
        ) as pool:
            for future in [pool.submit(study_run, args, *job) for job in jobs]:
                runs.append(future.result())
                (out / "schedule.json").write_text(jsonfile.dumps({"runs": runs}))
    else:
        for job in jobs:
            runs.append(study_run(args, *job))
            (out / "schedule.json").write_text(jsonfile.dumps({"runs": runs}))
    at = [e for e in args.at_epochs if e <= args.epochs]
    table = summary(runs, at)
    print(f"total time: {(time.perf_counter() - start) / 60:.1f} min ({len(runs)} runs)")
    print(table)
    (out / "schedule.md").write_text(table + "\n")
    (out / "schedule.json").write_text(jsonfile.dumps({"seconds": time.perf_counter() - start, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
