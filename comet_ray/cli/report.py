"""``comet-ray report``: one self-contained report.html from run folders (comet_ray.report, imported when used)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from comet_ray.errors import CometError


def cmd_report(args: argparse.Namespace) -> int:
    from comet_ray import storage
    from comet_ray.report import build_report  # torch: imported when the command runs

    out = storage.check_location(args.out, "--out")
    with tempfile.TemporaryDirectory(prefix="comet-report-runs-") as fetched:
        runs = [_local_run(run, Path(fetched) / str(i), args.s3_endpoint) for i, run in enumerate(args.runs)]
        with storage.staged_file(out, args.s3_endpoint) as target:
            build_report(
                runs,
                target,
                args.device,
                args.s3_endpoint,
                not args.no_recompute,
                args.examples,
                args.suspects,
            )
    print(f"report -> {storage.public(out)}")
    return 0


def _local_run(run: str, folder: Path, s3_endpoint: str | None) -> str:
    """A run folder as a local folder: an ``s3://`` one (results of a cluster run) is downloaded first."""
    from comet_ray import storage

    if not storage.is_remote(run):
        return run
    storage.check_location(run, "RUN_DIR")
    local = storage.download(run, folder / run.rstrip("/").rsplit("/", 1)[-1], s3_endpoint)
    if not any(local.iterdir()):
        raise CometError(f"nothing at {storage.public(run)}")
    return str(local)


def register(subparsers) -> None:
    """Add ``comet-ray report`` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "report",
        help="one self-contained HTML report (metrics, ROC, SCL weights, lambda, worst images) from run folders",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders written by train, local or s3:// (or folders holding run folders, e.g. "
        "a demo output)",
    )
    parser.add_argument(
        "--out", default="report.html", help="HTML file to write (local or s3://bucket/key.html)"
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=3,
        help="worst false positives and false negatives shown per run (0: none)",
    )
    parser.add_argument(
        "--suspects",
        type=int,
        default=6,
        help="training-set audit: top suspects shown with their anomaly maps per run (0: none)",
    )
    parser.add_argument(
        "--no-recompute",
        action="store_true",
        help="never read the dataset: ROC only from scores.csv, no anomaly maps",
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (for recomputed scores and maps)"
    )
    parser.add_argument(
        "--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3-compatible endpoint"
    )
    parser.set_defaults(func=cmd_report)
