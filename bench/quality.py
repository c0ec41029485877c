"""Detection quality on real data: methods x contamination, with the defaults and a stated CPU schedule.

Sets (one category each; every set's features are extracted ONCE and cached, then only heads train):

    bottle      MVTec AD bottle from ../shared/data (skipped, with a line, when absent)
    elpv_mono   ELPV solar cells (PyPI ``elpv-dataset``: 300x300 electroluminescence images, labelled by
    elpv_poly   experts with a defect probability), monocrystalline and polycrystalline cells as two
                MVTec-style categories written by this script: train/good = probability-0 cells,
                test/good = other probability-0 cells, test/defect = cells of probability >= 2/3
                (the 1/3 cells are left out: their label is a coin toss). Image labels only, no masks:
                pixel metrics are null.
    weave       the synthetic texture set (comet_ray/data/synthetic.py), as in ``comet-ray demo``

Methods: ``baseline``, ``comet`` (SimpleNet with the plain baseline / CoMet strategy), ``flow``,
``flow+comet`` (the normalizing flow), ``knn`` (the training-free PatchCore-style reference on the same
features), ``knn+scl`` (the images SCL's fence flags on leave-one-out scores left out of knn's memory bank),
the ablations ``scl``, ``meta``, ``flow+scl``, ``flow+meta``, and the oracle bounds ``oracle`` and
``flow+oracle`` (CoMet with SCL's weights replaced by the truth: 0 for injected images, 1 for the rest).
``METHOD@knob=value,...`` runs a method with extra settings (e.g. ``comet@confidence_signal=knn``). Contamination follows the SoftPatch
no-overlap protocol (``--contamination`` of ``comet-ray train``); every figure is the mean +- sd over
seeds on each run's report split. Nothing is selected with test labels: every run uses the defaults
and the schedule below, evaluated once after its last epoch.

Output: one line per figure, a markdown table (image AUROC / pixel AUROC, and the mean final SCL
weight of injected vs nominal training images), and ``OUT/quality.json`` with every run, including its
final SCL weight and final-model score of every training image and which ones were injected.

    nice -n 10 python bench/quality.py --out /tmp/quality              # the README's table
    python bench/quality.py --sets weave --seeds 0 --epochs 2 --out /tmp/q   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from comet_ray import jsonfile
from comet_ray.audit import audit_metrics
from comet_ray.config import FeatureConfig, TrainConfig, apply_overrides
from comet_ray.data.synthetic import make_texture_category
from comet_ray.models.anomaly_map import topk_mean
from comet_ray.models.knn import PatchKNN, leave_one_out_scores
from comet_ray.pipeline import train_category
from comet_ray.prepare import prepare_data

SHARED = Path(__file__).resolve().parents[2] / "shared"
BOTTLE = SHARED / "data" / "mvtec_bottle"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2-b0353104.pth"

METHODS = {  # name -> (model, strategy)
    "baseline": ("simplenet", "baseline"),
    "scl": ("simplenet", "scl"),
    "meta": ("simplenet", "meta"),
    "comet": ("simplenet", "comet"),
    "flow": ("flow", "baseline"),
    "flow+scl": ("flow", "scl"),
    "flow+meta": ("flow", "meta"),
    "flow+comet": ("flow", "comet"),
    "knn": ("knn", "baseline"),
    "knn+scl": (
        "knn",
        "scl",
    ),  # SCL's fence on leave-one-out scores chooses which images enter the memory bank
}
# Rows that are a method with fixed settings. ``oracle``: CoMet whose SCL weights are replaced by the truth
# (0 for every injected image, 1 for the rest): the bound a perfect ranking and fence would reach. At
# rho = 0 there is nothing to weigh out, so it trains as ``meta`` (every weight 1).
ALIASES = {"oracle": "comet@oracle_weights=true", "flow+oracle": "flow+comet@oracle_weights=true"}
DEFAULT_METHODS = "baseline,comet,flow,flow+comet,knn"
ALL_SETS = ("bottle", "elpv_mono", "elpv_poly", "weave")
# ELPV cells per category: train/good, test/good, test/defect (seeded draw from each pool).
ELPV_SIZES = (100, 40, 60)


@dataclass
class DataSet:
    name: str
    root: Path
    category: str
    masks: bool


def write_elpv(root: Path, sizes: tuple[int, int, int] = ELPV_SIZES, seed: int = 0) -> list[DataSet]:
    """ELPV mono and poly cells as two MVTec-style categories under ``root`` (written once)."""
    from elpv_dataset.utils import load_dataset

    sets = [DataSet(f"elpv_{kind}", root, f"elpv_{kind}", masks=False) for kind in ("mono", "poly")]
    if all((root / s.category / ".complete").exists() for s in sets):
        return sets
    images, probability, kinds = load_dataset()
    n_train, n_good, n_defect = sizes
    for data_set, kind in zip(sets, ("mono", "poly")):
        rng = np.random.default_rng(seed)
        good = rng.permutation(np.flatnonzero((kinds == kind) & (probability == 0)))
        defect = rng.permutation(np.flatnonzero((kinds == kind) & (probability >= 0.5)))
        if len(good) < n_train + n_good or len(defect) < n_defect:
            raise SystemExit(f"ELPV {kind}: not enough cells for sizes {sizes}")
        folders = {
            "train/good": good[:n_train],
            "test/good": good[n_train : n_train + n_good],
            "test/defect": defect[:n_defect],
        }
        category = root / data_set.category
        for folder, rows in folders.items():
            (category / folder).mkdir(parents=True, exist_ok=True)
            for row in rows:
                Image.fromarray(images[row]).save(category / folder / f"cell{row:04d}.png")
        (category / ".complete").write_text("")
    return sets


def data_sets(names: list[str], out: Path) -> list[DataSet]:
    chosen = []
    for name in names:
        if name == "bottle":
            if BOTTLE.is_dir():
                chosen.append(DataSet("bottle", BOTTLE.parent, BOTTLE.name, masks=True))
            else:
                print(f"bottle: skipped, MVTec bottle not found at {BOTTLE}", flush=True)
        elif name in ("elpv_mono", "elpv_poly"):
            chosen.extend(s for s in write_elpv(out / "data" / "elpv") if s.name == name)
        elif name == "weave":
            root = out / "data" / "synthetic"
            if not (root / "weave").exists():
                make_texture_category(
                    root, "weave", n_train=60, n_test_good=24, defects={"spot": 40, "scratch": 16}, seed=0
                )
            chosen.append(DataSet("weave", root, "weave", masks=True))
        else:
            raise SystemExit(f"unknown set {name!r}; choose from {', '.join(ALL_SETS)}")
    return chosen


def parse_method(spec: str) -> tuple[str, str, str, dict]:
    """``NAME[@knob=value,...]`` -> (label, model, strategy, overrides)."""
    name, _, settings = spec.partition("@")
    if name in ALIASES:
        name, _, fixed = ALIASES[name].partition("@")
        settings = ",".join(filter(None, (fixed, settings)))
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}; choose from {', '.join([*METHODS, *ALIASES])}")
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return spec, *METHODS[name], overrides


def base_config(args, data_set: DataSet, rho: float, seed: int) -> TrainConfig:
    config = TrainConfig(
        data_root=str(data_set.root),
        category=data_set.category,
        contamination=rho,
        seed=seed,
        epochs=args.epochs,
        passes=args.passes,
        device="cpu",
    )
    config.features = FeatureConfig(
        backbone=args.backbone,
        image_size=args.image_size,
        feature_dim=args.feature_dim,
        weights=args.weights,
        batch_size=32,
    )
    return apply_overrides(config, args.set)


def one_run(args, data_set: DataSet, data, method: str, rho: float, seed: int) -> dict:
    label, model, strategy, overrides = parse_method(method)
    config = base_config(args, data_set, rho, seed)
    config.model.model = model
    config.comet.strategy = strategy
    if rho <= 0 and overrides.get("oracle_weights"):  # nothing injected: the oracle weighs every image 1
        overrides = {k: v for k, v in overrides.items() if k != "oracle_weights"}
        config.comet.strategy = "meta"
    config = apply_overrides(config, overrides)
    result = train_category(config, data, torch.device("cpu"))
    metrics = result.metrics
    train_ids = list(data.train.store.ids)
    last = result.epochs[-1] if result.epochs else None
    return {
        "set": data_set.name,
        "method": label,
        "model": model,
        "strategy": strategy,
        "overrides": overrides,
        "contamination": rho,
        "achieved_contamination": metrics["achieved_contamination"],
        "seed": seed,
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"] if data_set.masks else None,
        "aupro": metrics["aupro"] if data_set.masks else None,
        "f1_max": metrics["f1_max"],
        "mean_weight_injected": metrics.get("mean_weight_injected"),
        "mean_weight_nominal": metrics.get("mean_weight_nominal"),
        "separation": None if last is None else last.extra.get("separation"),
        "final_loss": None if last is None else last.loss,
        "train_seconds": metrics["train_seconds"],
        "n_train": metrics["n_train"],
        "n_test": metrics["n_test"],
        "train_ids": train_ids,
        "injected": sorted(data.injected_ids),
        "final_weights": [result.final_weights[i] for i in train_ids],
        "train_scores": result.train_scores,
        "audit": audit_metrics(
            train_ids,
            [result.final_weights[i] for i in train_ids],
            result.train_scores or None,
            data.injected_ids,
        )
        if data.injected_ids
        else None,
    }


def knn_loo_run(data_set: DataSet, data, config: TrainConfig, rho: float, seed: int) -> dict:
    """The audit's reference: training images ranked by their kNN leave-one-out score (no model, no fence)."""
    knn = PatchKNN(
        data.train.store.dim,
        bank_fraction=config.model.knn_bank_fraction,
        coreset=config.model.knn_coreset,
        search=config.model.knn_search,
    )
    generator = torch.Generator().manual_seed(seed)
    scores = topk_mean(leave_one_out_scores(knn, data.train.store.features, generator), config.comet.top_k)
    train_ids = list(data.train.store.ids)
    metrics = audit_metrics(train_ids, np.ones(len(train_ids)), scores.tolist(), data.injected_ids)
    return {
        "set": data_set.name,
        "method": "knn-loo ranking",
        "contamination": rho,
        "seed": seed,
        "achieved_contamination": None,
        "audit": metrics,
    }


def run_group(args, methods: list[str], data_set: DataSet, rho: float, seed: int) -> list[dict]:
    """Every method on one (set, contamination, seed): the same data and splits for all of them."""
    data = prepare_data(base_config(args, data_set, rho, seed), torch.device("cpu"), cache_dir=args.cache)
    runs = []
    if rho > 0 and data.injected_ids:
        runs.append(knn_loo_run(data_set, data, base_config(args, data_set, rho, seed), rho, seed))
    for method in methods:
        run = one_run(args, data_set, data, method, rho, seed)
        runs.append(run)
        print(
            f"  {data_set.name} rho={rho:g} seed={seed} {method}: image AUROC {run['image_auroc']:.4f}"
            + ("" if run["pixel_auroc"] is None else f", pixel AUROC {run['pixel_auroc']:.4f}")
            + (
                ""
                if not _uses_scl(method) or run["mean_weight_injected"] is None
                else f", w injected {run['mean_weight_injected']:.3f} vs {run['mean_weight_nominal']:.3f}"
            )
            + f" [{run['train_seconds']:.0f} s]",
            flush=True,
        )
    return runs


def mean_sd(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(stat: tuple[float, float] | None, digits: int = 3) -> str:
    return "-" if stat is None else f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def summarise(runs: list[dict], sets: list[str], methods: list[str], rhos: list[float]) -> str:
    """One line per figure on stdout; returns the markdown table."""
    header = "| set | ρ | " + " | ".join(methods) + " |"
    lines = [header, "|" + "---|" * (len(methods) + 2)]
    weight_lines = [
        "| set | ρ | " + " | ".join(m for m in methods if _uses_scl(m)) + " |",
        "|" + "---|" * (sum(_uses_scl(m) for m in methods) + 2),
    ]
    for name in sets:
        for rho in rhos:
            cells, weight_cells = [], []
            for method in methods:
                chosen = [
                    r
                    for r in runs
                    if r["set"] == name and r["method"] == method and r["contamination"] == rho
                ]
                if not chosen:
                    cells.append("-")
                    if _uses_scl(method):
                        weight_cells.append("-")
                    continue
                image = mean_sd([r["image_auroc"] for r in chosen])
                pixel = mean_sd([r["pixel_auroc"] for r in chosen])
                tag = f"{name} rho={rho:g} {method} ({len(chosen)} seeds)"
                print(f"{tag}: image AUROC {fmt(image, 4)}", flush=True)
                if pixel is not None:
                    print(f"{tag}: pixel AUROC {fmt(pixel, 4)}", flush=True)
                cells.append(fmt(image) + ("" if pixel is None else f" / {fmt(pixel)}"))
                if _uses_scl(method):
                    injected = mean_sd([r["mean_weight_injected"] for r in chosen])
                    nominal = mean_sd([r["mean_weight_nominal"] for r in chosen])
                    if injected is not None:
                        print(
                            f"{tag}: mean SCL weight injected {fmt(injected)} vs nominal {fmt(nominal)}",
                            flush=True,
                        )
                        weight_cells.append(f"{injected[0]:.3f} vs {nominal[0]:.3f}")
                    else:
                        weight_cells.append("-")
            achieved = mean_sd(
                [r["achieved_contamination"] for r in runs if r["set"] == name and r["contamination"] == rho]
            )
            rho_cell = (
                f"{rho:g}"
                if achieved is None or abs(achieved[0] - rho) < 0.005
                else f"{rho:g} ({achieved[0]:.3f})"
            )
            lines.append(f"| {name} | {rho_cell} | " + " | ".join(cells) + " |")
            if rho > 0:
                weight_lines.append(f"| {name} | {rho_cell} | " + " | ".join(weight_cells) + " |")
    table = "\n".join(lines)
    if len(weight_lines) > 2:
        table += "\n\nMean final SCL weight, injected vs nominal training images:\n\n" + "\n".join(
            weight_lines
        )
    audit_table = audit_summary(runs, sets, methods, rhos)
    if audit_table:
        table += (
            "\n\nTraining-set audit (`comet-ray audit`): precision@k of the ranking (k = images injected) "
            "and precision / recall of the flagged set (weight < 1), against the kNN leave-one-out "
            "score ranking:\n\n" + audit_table
        )
    return table


def audit_summary(runs: list[dict], sets: list[str], methods: list[str], rhos: list[float]) -> str:
    """precision@k (and flagged precision / recall) per SCL method and the kNN leave-one-out reference."""
    audited = ["knn-loo ranking"] + [m for m in methods if _uses_scl(m)]
    lines = ["| set | ρ | " + " | ".join(audited) + " |", "|" + "---|" * (len(audited) + 2)]
    for name in sets:
        for rho in [r for r in rhos if r > 0]:
            cells = []
            for method in audited:
                chosen = [
                    r["audit"]
                    for r in runs
                    if r["set"] == name
                    and r["method"] == method
                    and r["contamination"] == rho
                    and r.get("audit")
                ]
                if not chosen:
                    cells.append("-")
                    continue
                at_k = mean_sd([a["precision_at_k"] for a in chosen])
                tag = f"{name} rho={rho:g} {method} ({len(chosen)} seeds)"
                print(f"{tag}: audit precision@k {fmt(at_k)}", flush=True)
                cell = f"p@k {fmt(at_k, 2)}"
                if method != "knn-loo ranking":
                    precision = mean_sd([a["precision"] for a in chosen])
                    recall = mean_sd([a["recall"] for a in chosen])
                    print(f"{tag}: audit flagged precision {fmt(precision)} recall {fmt(recall)}", flush=True)
                    cell += f"; flagged P {fmt(precision, 2)}, R {fmt(recall, 2)}"
                cells.append(cell)
            if any(c != "-" for c in cells):
                lines.append(f"| {name} | {rho:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _uses_scl(method: str) -> bool:
    _, _, strategy, _ = parse_method(method)
    return strategy in ("scl", "comet")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", required=True, help="folder for the data sets, feature cache and quality.json"
    )
    parser.add_argument("--sets", default=",".join(ALL_SETS))
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--contamination", default="0,0.1,0.2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument(
        "--weights",
        default=None,
        help="backbone weights file (default for mobilenet_v2: ../shared's ImageNet file when "
        "present; otherwise torchvision's hub cache, else a loudly random backbone)",
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--feature-dim", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="override a knob for every method (like comet-ray train --set)",
    )
    parser.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="QUALITY_JSON",
        help="also show the runs of an earlier invocation's quality.json in the table",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="processes training at once (each gets cores / jobs threads); 2 on two cores",
    )
    args = parser.parse_args()
    args.set = dict(parse_method("baseline@" + ",".join(args.set))[3]) if args.set else {}
    if args.weights is None and args.backbone == "mobilenet_v2" and MOBILENET_WEIGHTS.is_file():
        args.weights = str(MOBILENET_WEIGHTS)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.cache = str(out / "feature-cache")
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        parse_method(method)
    rhos = [float(r) for r in args.contamination.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = data_sets([s for s in args.sets.split(",") if s], out)
    schedule = (
        f"{args.backbone} {args.image_size} px, feature_dim {args.feature_dim or 'default'}, "
        f"{args.epochs} epochs x {args.passes} pass(es), seeds {seeds}, overrides {args.set or 'none'}"
    )
    print(f"schedule: {schedule}", flush=True)
    runs: list[dict] = []
    start = time.perf_counter()
    for data_set in sets:  # every set's features once, here, before any head trains
        scale = prepare_data(
            base_config(args, data_set, 0.0, 0), torch.device("cpu"), cache_dir=args.cache
        ).train
        print(
            f"{data_set.name}: features cached ({len(scale.store)} training images, "
            f"feature scale {scale.store.scale():.3f})",
            flush=True,
        )
    groups = [(data_set, rho, seed) for data_set in sets for rho in rhos for seed in seeds]
    if args.jobs > 1:  # one process per group of runs; the cores are split between them
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        spawn = multiprocessing.get_context("spawn")  # no fork of a process whose torch threads are running
        with ProcessPoolExecutor(
            args.jobs,
            mp_context=spawn,
            initializer=torch.set_num_threads,
            initargs=(max(1, torch.get_num_threads() // args.jobs),),
        ) as pool:
            futures = [pool.submit(run_group, args, methods, *group) for group in groups]
            for future in futures:
                runs.extend(future.result())
                (out / "quality.json").write_text(jsonfile.dumps({"schedule": schedule, "runs": runs}))
    else:
        for group in groups:
            runs.extend(run_group(args, methods, *group))
            (out / "quality.json").write_text(jsonfile.dumps({"schedule": schedule, "runs": runs}))
    elapsed = time.perf_counter() - start
    table_runs, table_methods = list(runs), list(methods)
    for path in args.merge:  # runs of an earlier invocation (other methods), shown in the same table
        earlier = json.loads(Path(path).read_text())["runs"]
        table_runs.extend(earlier)
        table_methods = list(dict.fromkeys([r["method"] for r in earlier] + table_methods))
    table = summarise(table_runs, [s.name for s in sets], table_methods, rhos)
    print(f"total time: {elapsed / 60:.1f} min ({schedule})", flush=True)
    print()
    print(table)
    (out / "quality.md").write_text(f"{schedule}\n\n{table}\n")
    (out / "quality.json").write_text(
        jsonfile.dumps({"schedule": schedule, "seconds": elapsed, "runs": runs})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
