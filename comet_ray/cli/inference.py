"""``comet-ray evaluate`` and ``comet-ray predict``: a trained checkpoint on a test split or on new images."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from comet_ray import atomic, jsonfile
from comet_ray.cli.options import report_left_out
from comet_ray.errors import CometError


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
        metrics = evaluate_checkpoint(
            checkpoint, args.data_root, args.category, args.device, args.s3_endpoint, args.cache_dir
        )
    print(jsonfile.dumps(metrics, indent=2))
    report_left_out(
        metrics["skipped"], "image(s) skipped", "the JSON above" + (f" and {args.out}" if args.out else "")
    )
    if metrics["image_auroc"] != metrics["image_auroc"]:  # NaN: a single class of image
        kind = "anomalous" if metrics["n_anomalous"] == metrics["n_images"] else "good"
        print(
            f"note: image AUROC and F1 are undefined: all {metrics['n_images']} evaluated test images are {kind}",
            file=sys.stderr,
        )
    if out:
        storage.write_text(out, jsonfile.dumps(metrics, indent=2), args.s3_endpoint)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from comet_ray import storage

    destination = storage.check_location(args.out, "--out")
    with (
        _local_checkpoint(args.checkpoint, args.s3_endpoint) as checkpoint,
        storage.staged(destination, last=("predictions.csv",), s3_endpoint=args.s3_endpoint) as out,
    ):
        code = _predict_into(args, checkpoint, out, destination)
    return code


def _predict_into(args: argparse.Namespace, checkpoint: str, out: Path, destination: str) -> int:
    from comet_ray.inference import predict_images
    from comet_ray.storage import join as storage_join

    maps_dir = out / "maps" if args.maps else None
    rows = predict_images(
        checkpoint, args.images, args.device, args.threshold, args.s3_endpoint, maps_dir=maps_dir
    )
    out.mkdir(parents=True, exist_ok=True)
    target = out / "predictions.csv"
    fields = ["path", "score", "normalised_score", "anomalous", "error"]
    atomic.write_csv(target, fields, rows)
    shown = storage_join(destination, "predictions.csv")
    report_left_out([r | {"reason": r["error"]} for r in rows if r["error"]], "image(s) not scored", shown)
    n_bad = sum(1 for r in rows if r["error"])
    n_anomalous = sum(1 for r in rows if r["anomalous"] == 1)
    print(f"{len(rows) - n_bad} image(s) scored, {n_anomalous} anomalous, {n_bad} unreadable -> {shown}")
    if maps_dir is not None:
        print(f"anomaly maps -> {storage_join(destination, 'maps')}")
    return 0


def register(subparsers) -> None:
    """``comet-ray evaluate`` and ``comet-ray predict``."""
    evaluate = subparsers.add_parser(
        "evaluate",
        help="score a dataset's test split with a trained checkpoint",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluate.add_argument("checkpoint", help="model.pt or a run folder")
    evaluate.add_argument("data_root", help="dataset root (local folder or s3://bucket/prefix)")
    evaluate.add_argument("--category", required=True, help="category folder name")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    evaluate.add_argument(
        "--cache-dir", default=os.environ.get("COMET_RAY_CACHE"), help="feature cache folder"
    )
    evaluate.add_argument(
        "--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3-compatible endpoint"
    )
    evaluate.set_defaults(func=cmd_evaluate)

    predict = subparsers.add_parser(
        "predict",
        help="score images with a trained checkpoint, write predictions.csv",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    predict.add_argument("checkpoint", help="model.pt or a run folder")
    predict.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    predict.add_argument("--out", default="predictions", help="output folder")
    predict.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="decision threshold on the image score (default: F1-optimal on the validation split, from the checkpoint)",
    )
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict.add_argument(
        "--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3-compatible endpoint"
    )
    predict.add_argument(
        "--maps",
        action="store_true",
        help="also write one PNG per image into OUT/maps/: the center crop the model saw, the "
        "anomaly-map overlay and the outline of the anomalous region",
    )
    predict.set_defaults(func=cmd_predict)
