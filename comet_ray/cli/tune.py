"""``comet-ray tune``: the sweep of comet_ray.distributed.tune, with the training options of ``train``."""

from __future__ import annotations

import argparse

from comet_ray.cli.options import add_training_options, train_config
from comet_ray.distributed.tune import DEFAULT_SPACE, SweepSettings, sweep
from comet_ray.storage import check_location
from comet_ray.storage import join as join_location


def register(subparsers) -> None:
    """``comet-ray tune``: the sweep, with the training options of ``comet-ray train``."""
    parser = subparsers.add_parser(
        "tune",
        help="Optuna + ASHA sweep of the CoMet knobs per contamination level (Ray Tune)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_training_options(parser, contamination_list=True)
    parser.add_argument("--trials", type=int, default=32, help="Optuna trials per contamination level")
    parser.add_argument(
        "--objective",
        choices=("validation", "unsupervised"),
        default="validation",
        help="validation: image AUROC on the validation split; unsupervised: training loss, no labels",
    )
    parser.add_argument(
        "--space", default=None, help=f"search-space YAML (default: {DEFAULT_SPACE.name} in the package)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="repeat baseline and the best configuration per level over this many training seeds, "
        "on the split they were selected on (0: skip)",
    )
    parser.add_argument("--search-seed", type=int, default=0, help="seed of the Optuna sampler")
    parser.add_argument(
        "--storage-path",
        default=None,
        help="Tune storage and feature cache (local folder or s3://; s3:// on a cluster of several "
        "nodes); default OUT/.ray; same path = resume",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="Ray Train workers per trial (0: train in the trial process)"
    )
    parser.add_argument(
        "--cpus-per-trial", type=float, default=1.0, help="CPUs reserved for each trial process"
    )
    parser.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="GPUs for each in-process trial (and repeat); default: 1 when the cluster has, or can "
        "autoscale, GPU nodes, else 0",
    )
    parser.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs per Ray Train worker")
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per Ray Train worker; default: 1 when the cluster has, or can autoscale, a GPU "
        "for every worker of a trial, else 0",
    )
    parser.add_argument(
        "--max-concurrent-trials",
        type=int,
        default=None,
        help="default: derived from the cluster's resources",
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    parser.add_argument(
        "--out",
        required=True,
        help="folder or s3://bucket/prefix: results.csv, rho_*/best.json, seeds.csv, contamination.png",
    )
    parser.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from comet_ray.distributed.connect import init_ray
    from comet_ray.distributed.resources import auto_gpus
    from comet_ray.prepare import check_trainable

    levels = [float(x) for x in str(args.contamination).split(",") if x.strip()]
    args.contamination = 0.0
    base = train_config(args)
    check_trainable(base, s3_endpoint=args.s3_endpoint)  # one line now, not an error in every trial
    out = check_location(args.out, "--out")
    init_ray(args.address, log_to_driver=False)
    workers = args.workers
    settings = SweepSettings(
        levels=levels,
        trials=args.trials,
        objective=args.objective,
        space_file=args.space,
        storage_path=args.storage_path or join_location(out, ".ray"),
        out=out,
        search_seed=args.search_seed,
        seeds=args.seeds,
        workers=workers,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=auto_gpus(args.gpus_per_trial) if workers == 0 else (args.gpus_per_trial or 0.0),
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=auto_gpus(args.gpus_per_worker, workers) if workers > 0 else 0.0,
        max_concurrent_trials=args.max_concurrent_trials,
        feature_cache=args.cache_dir,
    )
    summary = sweep(base, settings)
    for key, label in (("best_baseline", "baseline"), ("best", "CoMet")):
        for level, row in sorted(summary[key].items(), key=lambda kv: float(kv[0])):
            print(
                f"rho {level}: best {label} validation objective {row['objective']:.4f} "
                f"-> test image AUROC {row.get('test_image_auroc')}"
            )
    print(f"results in {args.out}")
    return 0
