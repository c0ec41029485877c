"""The ``comet-ray`` command line.

Every problem the user can fix (a bad path, a corrupt checkpoint, a wrong layout) ends in one line
on stderr and exit status 2; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from comet_ray import jsonfile
from comet_ray.config import STRATEGIES, FeatureConfig, TrainConfig, apply_overrides
from comet_ray.errors import CometError
from comet_ray.models import MODELS

log = logging.getLogger("comet_ray")


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _add_training_options(parser: argparse.ArgumentParser, contamination_list: bool = False) -> None:
    defaults = TrainConfig()
    features = FeatureConfig()
    parser.add_argument("data_root", help="dataset root holding <category>/{train,test,ground_truth} (or a category folder)")
    parser.add_argument("--category", required=True,
                        help="category folder under DATA_ROOT; for train also 'all' or a comma-separated list")
    parser.add_argument("--strategy", choices=STRATEGIES, default="comet",
                        help="baseline: plain detector; scl: confidence weights only; meta: meta-learning + lambda(Sigma) only; comet: both (default)")
    parser.add_argument("--model", choices=MODELS, default="simplenet",
                        help="detector on the cached features: SimpleNet, a normalizing flow, or knn (the "
                             "training-free PatchCore-style reference: no epochs, no strategy)")
    if contamination_list:
        parser.add_argument("--contamination", default="0,0.05,0.1,0.2",
                            help="comma-separated contamination levels (experimental conditions, never searched)")
    else:
        parser.add_argument("--contamination", type=float, default=0.0,
                            help="experiments: move this fraction of anomalous test images into train (SoftPatch no-overlap protocol); 0 = use train/ as it is")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seeds initialisation, batch order, tasks and noise (and the split, unless --split-seed)")
    parser.add_argument("--split-seed", type=int, default=None,
                        help="seeds the contamination draw and the validation split (unset: the same as --seed)")
    parser.add_argument("--backbone", default=features.backbone, choices=("wide_resnet50_2", "resnet18", "mobilenet_v2"),
                        help="frozen feature extractor (paper: wide_resnet50_2)")
    parser.add_argument("--weights", default=None, help="ImageNet weights file for the backbone (default: torchvision's hub cache)")
    parser.add_argument("--no-pretrained", action="store_true", help="use a randomly initialised backbone (tests, benchmarks)")
    parser.add_argument("--image-size", type=int, default=features.image_size, help="center-crop size in pixels (paper: 288)")
    parser.add_argument("--feature-dim", type=int, default=None, help="patch feature width (default: 1536 for WRN50, smaller for small backbones)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="outer CoMet epochs (paper: 40)")
    parser.add_argument("--passes", type=int, default=defaults.passes, help="passes over the training set per epoch (paper: 4)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per training step (paper: 8)")
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction,
                        help="share of the test split held out for the threshold and tuning (never reported on)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=os.environ.get("COMET_RAY_CACHE"),
                        help="reuse backbone features across runs from this folder (env COMET_RAY_CACHE)")
    parser.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="endpoint of an S3-compatible store for s3:// roots (env AWS_ENDPOINT_URL)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="feature extraction: in this process, or streamed through Ray Data (large or s3:// sets)")
    parser.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                        help="override any knob of comet_ray.config, e.g. --set fence_k=2 --set noise_std=0.05 (repeatable)")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig(
        data_root=args.data_root,
        category=args.category,
        contamination=args.contamination,
        seed=args.seed,
        split_seed=args.split_seed,
        epochs=args.epochs,
        passes=args.passes,
        batch_size=args.batch_size,
        validation_fraction=args.validation_fraction,
        device=args.device,
        out=getattr(args, "out", ""),
    )
    config.features.backbone = args.backbone
    config.features.weights = args.weights
    config.features.pretrained = not args.no_pretrained
    config.features.image_size = args.image_size
    config.features.feature_dim = args.feature_dim
    config.model.model = args.model
    config.comet.strategy = args.strategy
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise CometError(f"--set expects KNOB=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = _parse_value(value.strip())
    try:
        return apply_overrides(config, overrides) if overrides else config
    except KeyError as exc:
        raise CometError(f"--set: {exc.args[0]}") from None


def _print_epoch(total: int):
    def callback(_trainer, epoch_log) -> None:
        print(epoch_log.line(total), flush=True)

    return callback


def _size(text: str) -> int:
    """Bytes from ``123``, ``80KB``, ``1.5GiB``, ... (K, M, G, T: powers of 1024)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = number[-1] if number and number[-1] in units else ""
    try:
        return int(float(number.removesuffix(unit)) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 24GiB)") from None


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
    from comet_ray.distributed.connect import init_ray
    from comet_ray.distributed.resources import auto_gpus
    from comet_ray.distributed.train import fit_categories, fit_distributed

    out = storage.check_location(args.out, "--out")
    store = storage.check_location(args.storage_path or storage.join(out, ".ray"), "--storage-path")
    many = len(categories) > 1
    configs = []
    for category in categories:
        args.category = category
        config = _train_config(args)
        config.out = storage.join(out, category) if many else out
        configs.append(config)
    init_ray(args.address)
    workers = max(1, args.workers)
    gpus = auto_gpus(args.gpus_per_worker, workers)
    common = dict(num_to_keep=args.num_to_keep, max_failures=args.max_failures, feature_cache=args.cache_dir,
                  worker_feature_memory=args.worker_feature_memory)
    if not many:
        metrics = fit_distributed(configs[0], workers, gpus, args.cpus_per_worker,
                                  storage_path=store, run_name=args.run_name, **common)
        print(_metrics_table([metrics]))
        print(f"results in {metrics['out']}")
        return 0
    rows, table = fit_categories(configs, workers, gpus, args.cpus_per_worker, storage_path=store,
                                 summary_path=storage.join(out, "summary.json"), **common)
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
    from comet_ray.pipeline import prepare_data, resolve_device, train_category, write_run
    from comet_ray.resume import EpochResume, run_fingerprint

    config = _train_config(args)
    device = resolve_device(config.device)
    print(f"comet-ray train: {config.category} | strategy {config.comet.strategy} | device {device}", flush=True)
    if config.model.model == "knn":
        print("note: --model knn is training-free (a memory bank of training patches): --epochs, --passes and "
              "--strategy do not apply", flush=True)
    data = prepare_data(config, device, cache_dir=args.cache_dir, progress=True, s3_endpoint=args.s3_endpoint,
                        engine=args.engine)
    if data.feature_origin:
        print(f"features: {data.feature_origin}", flush=True)
    _report_left_out(data.skipped, "image(s) skipped", "manifest.json")
    _report_left_out(data.mask_issues, "mask(s) unusable (image kept for image-level metrics)", "manifest.json")
    # Killed and run again, the same command continues from the last finished epoch (comet_ray.resume).
    resume = EpochResume(out, run_fingerprint(config.to_dict(), list(data.train.store.ids), data.feature_info))
    state, logs = resume.load()
    resumed_from = len(logs)
    if state is not None:
        print(f"resuming from epoch {resumed_from}/{config.epochs} ({resume.path})", flush=True)
    printer = _print_epoch(config.epochs)

    def on_epoch_end(trainer, epoch_log) -> None:
        printer(trainer, epoch_log)
        logs.append(epoch_log)
        resume.save(trainer.state_dict(), logs)

    result = train_category(config, data, device, on_epoch_end=on_epoch_end, trainer_state=state)
    result.epochs = list(logs)
    result.metrics["resumed_from_epoch"] = resumed_from
    write_run(out, config, data, result)
    resume.clear()
    print(_metrics_table([result.metrics]))


def _report_left_out(records: list[dict], what: str, where: str, shown: int = 10) -> None:
    """Name what a command left out, on stderr: the first few with their reason, the count, and where all are listed."""
    if not records:
        return
    for record in records[:shown]:
        print(f"  {record.get('uri') or record.get('path')}: {record['reason']}", file=sys.stderr)
    more = f" (first {shown} above)" if len(records) > shown else ""
    print(f"{len(records)} {what}{more}; all listed in {where}", file=sys.stderr)


@contextmanager
def _local_checkpoint(checkpoint: str, s3_endpoint: str | None = None) -> Iterator[str]:
    """``checkpoint`` as a local path: an ``s3://`` model.pt or run folder is fetched (model.pt and, when
    there, the run's manifest.json, which evaluate reads to leave out the run's non-report images)."""
    from comet_ray import storage

    if not storage.is_remote(checkpoint):
        yield checkpoint
        return
    storage.check_location(checkpoint, "checkpoint")
    run = checkpoint.rstrip("/")
    run = run.rsplit("/", 1)[0] if run.endswith(".pt") else run
    model = checkpoint if checkpoint.endswith(".pt") else storage.join(run, "model.pt")
    if not storage.exists(model, s3_endpoint):
        raise CometError(f"no checkpoint at {storage.public(checkpoint)} (expected {storage.public(model)})")
    with tempfile.TemporaryDirectory(prefix="comet-checkpoint-") as tmp:
        storage.download_file(model, Path(tmp) / "model.pt", s3_endpoint)
        manifest = storage.join(run, "manifest.json")
        if storage.exists(manifest, s3_endpoint):
            storage.download_file(manifest, Path(tmp) / "manifest.json", s3_endpoint)
        yield str(Path(tmp) / "model.pt")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from comet_ray import storage
    from comet_ray.inference import evaluate_checkpoint

    out = storage.check_location(args.out, "--out") if args.out else None
    with _local_checkpoint(args.checkpoint, args.s3_endpoint) as checkpoint:
        metrics = evaluate_checkpoint(checkpoint, args.data_root, args.category, args.device, args.s3_endpoint,
                                      args.cache_dir)
    print(jsonfile.dumps(metrics, indent=2))
    _report_left_out(metrics["skipped"], "image(s) skipped", "the JSON above" + (f" and {args.out}" if args.out else ""))
    if metrics["image_auroc"] != metrics["image_auroc"]:  # NaN: a single class of image
        kind = "anomalous" if metrics["n_anomalous"] == metrics["n_images"] else "good"
        print(f"note: image AUROC and F1 are undefined: all {metrics['n_images']} evaluated test images are {kind}",
              file=sys.stderr)
    if out:
        storage.write_text(out, jsonfile.dumps(metrics, indent=2), args.s3_endpoint)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from comet_ray import storage

    destination = storage.check_location(args.out, "--out")
    with _local_checkpoint(args.checkpoint, args.s3_endpoint) as checkpoint, \
            storage.staged(destination, last=("predictions.csv",), s3_endpoint=args.s3_endpoint) as out:
        code = _predict_into(args, checkpoint, out, destination)
    return code


def _predict_into(args: argparse.Namespace, checkpoint: str, out: Path, destination: str) -> int:
    from comet_ray.inference import predict_images
    from comet_ray.storage import join as storage_join

    maps_dir = out / "maps" if args.maps else None
    rows = predict_images(checkpoint, args.images, args.device, args.threshold, args.s3_endpoint,
                          maps_dir=maps_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "predictions.csv"
    fields = ["path", "score", "normalised_score", "anomalous", "error"]
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(handle.name, target)
    shown = storage_join(destination, "predictions.csv")
    _report_left_out([r | {"reason": r["error"]} for r in rows if r["error"]], "image(s) not scored", shown)
    n_bad = sum(1 for r in rows if r["error"])
    n_anomalous = sum(1 for r in rows if r["anomalous"] == 1)
    print(f"{len(rows) - n_bad} image(s) scored, {n_anomalous} anomalous, {n_bad} unreadable -> {shown}")
    if maps_dir is not None:
        print(f"anomaly maps -> {storage_join(destination, 'maps')}")
    return 0


def _metrics_table(rows: list[dict]) -> str:
    columns = ["strategy", "contamination", "seed", "image_auroc", "pixel_auroc", "aupro", "f1_max",
               "mean_weight_injected", "mean_weight_nominal", "train_seconds"]
    header = " | ".join(f"{c:>20}" if i else f"{c:<10}" for i, c in enumerate(columns))
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for i, c in enumerate(columns):
            value = row.get(c)
            text = "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
            cells.append(f"{text:>20}" if i else f"{text:<10}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from comet_ray.demo import demo_audit, run_demo

    rows = run_demo(args.out, epochs=args.epochs, seed=args.seed, device=args.device)
    print()
    print(_metrics_table(rows))
    print(f"\nresults in {args.out}\n")
    for line in demo_audit(args.out, args.device):
        print(line)
    return 0


def _wants(commands: tuple[str, ...], argv: list[str] | None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return any(arg in commands for arg in argv[:2])


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comet-ray",
        description="Anomaly detection from uncurated image sets: CoMet (confident meta-learning) on SimpleNet.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one category and evaluate it once on held-out test images",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_training_options(train)
    train.add_argument("--out", required=True,
                       help="run folder or s3://bucket/prefix: metrics.json, manifest.json, history.json, model.pt "
                            "(several categories: one subfolder each); s3:// results appear once complete")
    ray_options = train.add_argument_group("Ray Train (data-parallel; --workers 0 trains in this process, no Ray)")
    ray_options.add_argument("--workers", type=int, default=0, help="Ray Train workers per category")
    ray_options.add_argument("--gpus-per-worker", type=float, default=None,
                             help="GPUs per worker (NCCL when > 0); default: 1 when the cluster has, or can "
                                  "autoscale, a GPU for every worker, else 0")
    ray_options.add_argument("--cpus-per-worker", type=float, default=1.0,
                             help="CPUs per worker (fractions allowed); torch uses that many threads (at least 1)")
    ray_options.add_argument("--worker-feature-memory", type=_size, default=None, metavar="SIZE",
                             help="most features one worker may hold (e.g. 24GiB; each holds 1/N of the category): "
                                  "a run over it is refused before any worker starts")
    ray_options.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    ray_options.add_argument("--storage-path", default=None,
                             help="checkpoints and the feature cache (local folder or s3://; s3:// on a cluster of "
                                  "several nodes); default OUT/.ray. Same path + run name = resume")
    ray_options.add_argument("--run-name", default=None, help="default: <category>-<strategy>-seed<seed>")
    ray_options.add_argument("--num-to-keep", type=int, default=2, help="checkpoints kept per run")
    ray_options.add_argument("--max-failures", type=int, default=2, help="worker-group failures recovered from checkpoints")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="score a dataset's test split with a trained checkpoint",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("checkpoint", help="model.pt or a run folder")
    evaluate.add_argument("data_root", help="dataset root (local folder or s3://bucket/prefix)")
    evaluate.add_argument("--category", required=True, help="category folder name")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    evaluate.add_argument("--cache-dir", default=os.environ.get("COMET_RAY_CACHE"), help="feature cache folder")
    evaluate.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3-compatible endpoint")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="score images with a trained checkpoint, write predictions.csv",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    predict.add_argument("checkpoint", help="model.pt or a run folder")
    predict.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    predict.add_argument("--out", default="predictions", help="output folder")
    predict.add_argument("--threshold", type=float, default=None,
                         help="decision threshold on the image score (default: F1-optimal on the validation split, from the checkpoint)")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3-compatible endpoint")
    predict.add_argument("--maps", action="store_true",
                         help="also write one PNG per image into OUT/maps/: the center crop the model saw, the "
                              "anomaly-map overlay and the outline of the anomalous region")
    predict.set_defaults(func=cmd_predict)

    demo = sub.add_parser("demo", help="offline end-to-end demo: synthetic contaminated set, baseline vs CoMet",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--out", default="comet-ray-demo", help="output folder")
    demo.add_argument("--epochs", type=int, default=8, help="CoMet epochs per run")
    demo.add_argument("--seed", type=int, default=0, help="seed")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    demo.set_defaults(func=cmd_demo)

    from comet_ray.distributed.submit import register as register_jobs
    from comet_ray.distributed.tune import register as register_tune
    from comet_ray.upload import register as register_upload

    register_tune(sub)
    if _wants(("export", "report", "audit"), argv):  # torch-heavy modules: imported only when their command is used
        from comet_ray import audit, export, report

        export.register(sub)
        report.register(sub)
        audit.register(sub)
    else:
        sub.add_parser("export", help="export a checkpoint as one ONNX or TorchScript graph (image -> scores, maps)")
        sub.add_parser("report", help="one self-contained report.html from run folders")
        sub.add_parser("audit", help="rank a run's training images by how much CoMet distrusts them; gallery; clean copy")
    register_upload(sub)
    register_jobs(sub)  # submit, status, logs, stop
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        code = args.func(args)
    except CometError as exc:
        if args.verbose:
            raise
        print(f"comet-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("comet-ray: interrupted", file=sys.stderr)
        return 130
    log.debug("done in %.1fs", time.perf_counter() - start)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
