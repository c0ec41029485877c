"""``comet-ray train`` (in this process, or on Ray Train workers) and ``comet-ray demo``."""

from __future__ import annotations

import argparse

from comet_ray.cli.options import (
    add_training_options,
    metrics_table,
    print_epoch,
    report_left_out,
    size,
    train_config,
)


def _categories(args: argparse.Namespace) -> list[str]:
    if args.category != "all" and "," not in args.category:
        return [args.category]
    if args.category == "all":
        from comet_ray.data.layout import list_categories, open_dataset_filesystem

        filesystem, _ = open_dataset_filesystem(args.data_root, args.s3_endpoint)
        return list_categories(args.data_root, filesystem)
    return [c.strip() for c in args.category.split(",") if c.strip()]


def cmd_train(args: argparse.Namespace) -> int:
    categories = _categories(args)
    if args.workers > 0 or len(categories) > 1:
        return _train_many(args, categories)
    return _train_in_process(args)


def _train_many(args: argparse.Namespace, categories: list[str]) -> int:
    """Several categories and/or Ray Train workers: one TorchTrainer per category, run concurrently."""
    from comet_ray import storage
    from comet_ray.distributed.categories import fit_categories
    from comet_ray.distributed.connect import init_ray
    from comet_ray.distributed.resources import auto_gpus
    from comet_ray.distributed.train import fit_distributed

    out = storage.check_location(args.out, "--out")
    store = storage.check_location(args.storage_path or storage.join(out, ".ray"), "--storage-path")
    many = len(categories) > 1
    configs = []
    for category in categories:
        args.category = category
        config = train_config(args)
        config.out = storage.join(out, category) if many else out
        configs.append(config)
    init_ray(args.address)
    workers = max(1, args.workers)
    gpus = auto_gpus(args.gpus_per_worker, workers)
    common = dict(
        num_to_keep=args.num_to_keep,
        max_failures=args.max_failures,
        feature_cache=args.cache_dir,
        worker_feature_memory=args.worker_feature_memory,
    )
    if not many:
        metrics = fit_distributed(
            configs[0],
            workers,
            gpus,
            args.cpus_per_worker,
            storage_path=store,
            run_name=args.run_name,
            **common,
        )
        print(metrics_table([metrics]))
        print(f"results in {metrics['out']}")
        return 0
    rows, table = fit_categories(
        configs,
        workers,
        gpus,
        args.cpus_per_worker,
        storage_path=store,
        summary_path=storage.join(out, "summary.json"),
        **common,
    )
    print(table)
    print(f"results in {args.out} (summary.json)")
    return 1 if any("error" in row for row in rows) else 0


def _train_in_process(args: argparse.Namespace) -> int:
    from comet_ray import storage

    out = storage.check_location(args.out, "--out")
    # out itself, or a local folder uploaded to s3:// once the run is complete
    with storage.staged(out, s3_endpoint=args.s3_endpoint) as local:
        _train_into(args, str(local))
    print(f"results in {out}")
    return 0


def _train_into(args: argparse.Namespace, out: str) -> None:
    from comet_ray.config import resolve_device
    from comet_ray.pipeline import train_category
    from comet_ray.prepare import prepare_data
    from comet_ray.resume import EpochResume, run_fingerprint
    from comet_ray.runfolder import write_run

    config = train_config(args)
    device = resolve_device(config.device)
    print(
        f"comet-ray train: {config.category} | strategy {config.comet.strategy} | device {device}", flush=True
    )
    if config.model.model == "knn":
        print(
            "note: --model knn is training-free (a memory bank of training patches): --epochs and --passes do "
            "not apply; --strategy scl leaves the images SCL's fence flags out of the bank",
            flush=True,
        )
    data = prepare_data(
        config,
        device,
        cache_dir=args.cache_dir,
        progress=True,
        s3_endpoint=args.s3_endpoint,
        engine=args.engine,
    )
    if data.feature_origin:
        print(f"features: {data.feature_origin}", flush=True)
    report_left_out(data.skipped, "image(s) skipped", "manifest.json")
    report_left_out(
        data.mask_issues, "mask(s) unusable (image kept for image-level metrics)", "manifest.json"
    )
    # Killed and run again, the same command continues from the last finished epoch (comet_ray.resume).
    resume = EpochResume(
        out, run_fingerprint(config.to_dict(), list(data.train.store.ids), data.feature_info)
    )
    state, logs = resume.load()
    resumed_from = len(logs)
    if state is not None:
        print(f"resuming from epoch {resumed_from}/{config.epochs} ({resume.path})", flush=True)
    printer = print_epoch(config.epochs)

    def on_epoch_end(trainer, epoch_log) -> None:
        printer(trainer, epoch_log)
        logs.append(epoch_log)
        resume.save(trainer.state_dict(), logs)

    result = train_category(config, data, device, on_epoch_end=on_epoch_end, trainer_state=state)
    result.epochs = list(logs)
    result.metrics["resumed_from_epoch"] = resumed_from
    write_run(out, config, data, result)
    resume.clear()
    print(metrics_table([result.metrics]))


def cmd_demo(args: argparse.Namespace) -> int:
    from comet_ray.demo import demo_audit, run_demo

    rows = run_demo(args.out, epochs=args.epochs, seed=args.seed, device=args.device)
    print()
    print(metrics_table(rows))
    print(f"\nresults in {args.out}\n")
    for line in demo_audit(args.out, args.device):
        print(line)
    return 0


def register(subparsers) -> None:
    """``comet-ray train``."""
    train = subparsers.add_parser(
        "train",
        help="train one category and evaluate it once on held-out test images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_training_options(train)
    train.add_argument(
        "--out",
        required=True,
        help="run folder or s3://bucket/prefix: metrics.json, manifest.json, history.json, model.pt "
        "(several categories: one subfolder each); s3:// results appear once complete",
    )
    ray_options = train.add_argument_group(
        "Ray Train (data-parallel; --workers 0 trains in this process, no Ray)"
    )
    ray_options.add_argument("--workers", type=int, default=0, help="Ray Train workers per category")
    ray_options.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per worker (NCCL when > 0); default: 1 when the cluster has, or can "
        "autoscale, a GPU for every worker, else 0",
    )
    ray_options.add_argument(
        "--cpus-per-worker",
        type=float,
        default=1.0,
        help="CPUs per worker (fractions allowed); torch uses that many threads (at least 1)",
    )
    ray_options.add_argument(
        "--worker-feature-memory",
        type=size,
        default=None,
        metavar="SIZE",
        help="most features one worker may hold (e.g. 24GiB; each holds 1/N of the category): "
        "a run over it is refused before any worker starts",
    )
    ray_options.add_argument(
        "--address", default=None, help="Ray cluster address (default: start a local Ray)"
    )
    ray_options.add_argument(
        "--storage-path",
        default=None,
        help="checkpoints and the feature cache (local folder or s3://; s3:// on a cluster of "
        "several nodes); default OUT/.ray. Same path + run name = resume",
    )
    ray_options.add_argument("--run-name", default=None, help="default: <category>-<strategy>-seed<seed>")
    ray_options.add_argument("--num-to-keep", type=int, default=2, help="checkpoints kept per run")
    ray_options.add_argument(
        "--max-failures", type=int, default=2, help="worker-group failures recovered from checkpoints"
    )
    train.set_defaults(func=cmd_train)


def register_demo(subparsers) -> None:
    """``comet-ray demo``."""
    demo = subparsers.add_parser(
        "demo",
        help="offline end-to-end demo: synthetic contaminated set, baseline vs CoMet",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", default="comet-ray-demo", help="output folder")
    demo.add_argument("--epochs", type=int, default=8, help="CoMet epochs per run")
    demo.add_argument("--seed", type=int, default=0, help="seed")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    demo.set_defaults(func=cmd_demo)
