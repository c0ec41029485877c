"""``comet-ray audit``: a run's training images ranked by SCL weight, gallery, clean copy (comet_ray.audit)."""

from __future__ import annotations

import argparse
import os
import sys

from comet_ray.audit import EXPORT_MANIFEST, GALLERY_DIR, TRAJECTORY_FILE, run_audit


def cmd_audit(args: argparse.Namespace) -> int:
    outcome = run_audit(
        args.run, args.out, args.gallery, args.export_clean, args.copy, args.device, args.s3_endpoint
    )
    for line in outcome.audit.summary_lines():
        print(line)
    gallery = f", {len(outcome.panels)} panel(s) in {GALLERY_DIR}/" if outcome.panels else ""
    print(f"audit.csv, audit.json, {TRAJECTORY_FILE}{gallery} -> {outcome.out}")
    if outcome.export is not None:
        export = outcome.export
        print(
            f"clean copy: {export['n_train_kept']} training images kept, {export['n_left_out']} left out, "
            f"{export['n_test']} test images -> {export['destination']} ({EXPORT_MANIFEST} says what and why)"
        )
        if export["missing_at_source"]:
            print(
                f"{len(export['missing_at_source'])} training image(s) of the run are no longer at the source "
                f"(listed in {EXPORT_MANIFEST})",
                file=sys.stderr,
            )
    return 0


def register(subparsers) -> None:
    """Add ``comet-ray audit`` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "audit",
        help="rank a run's training images by how much CoMet distrusts them; gallery; clean copy",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="run folder written by train (local or s3://)")
    parser.add_argument(
        "--out",
        default=None,
        help="folder or s3:// prefix for audit.csv, audit.json, the chart and gallery/ (default RUN/audit)",
    )
    parser.add_argument(
        "--gallery", type=int, default=8, help="top suspects drawn as anomaly-map panels (0: none)"
    )
    parser.add_argument(
        "--export-clean",
        default=None,
        metavar="DEST",
        help="also write the category without the flagged images to this new folder or s3:// "
        "prefix (hard links or copies; the source is never changed)",
    )
    parser.add_argument(
        "--copy", action="store_true", help="--export-clean copies files instead of hard-linking them"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (for the gallery)")
    parser.add_argument(
        "--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3-compatible endpoint"
    )
    parser.set_defaults(func=cmd_audit)
