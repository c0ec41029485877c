"""``comet-ray upload``: a local dataset folder to s3://bucket/prefix (comet_ray.upload)."""

from __future__ import annotations

import argparse
import os
import sys

from comet_ray.data.s3 import parse_s3_uri
from comet_ray.upload import DEFAULT_WORKERS, upload_tree


def cmd_upload(args: argparse.Namespace) -> int:
    summary = upload_tree(
        args.local_root,
        args.destination,
        args.s3_endpoint,
        args.create_bucket,
        args.workers,
        progress=not args.quiet,
    )
    for problem in summary.left_out:
        print(f"left out {problem['path']}: {problem['reason']}", file=sys.stderr)
    if summary.created_bucket:
        print(f"created bucket '{parse_s3_uri(args.destination).bucket}'")
    print(summary.line())
    return 0


def register(subparsers) -> None:
    """Add ``comet-ray upload`` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "upload",
        help="copy a local dataset folder to s3://bucket/prefix (hidden files skipped)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("local_root", help="local folder, e.g. an MVTec AD root")
    parser.add_argument(
        "destination", help="s3://bucket/prefix; files keep their paths relative to LOCAL_ROOT"
    )
    parser.add_argument(
        "--s3-endpoint",
        default=os.environ.get("AWS_ENDPOINT_URL"),
        help="endpoint of an S3-compatible store (env AWS_ENDPOINT_URL)",
    )
    parser.add_argument(
        "--create-bucket", action="store_true", help="create the bucket when it does not exist"
    )
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="files uploaded in parallel")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_upload)
