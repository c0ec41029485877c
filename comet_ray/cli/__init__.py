"""The ``comet-ray`` command line: one module per subcommand group, each calling plain functions.

Every problem the user can fix (a bad path, a corrupt checkpoint, a wrong layout) ends in one line
on stderr and exit status 2; tracebacks are for bugs only. Modules that import torch are imported by
the command that runs, not to build the parser.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from comet_ray.cli import audit, export, inference, jobs, report, train, tune, upload
from comet_ray.cli.credentials import hide_process_arguments, uri_credentials_taken
from comet_ray.distributed import submit
from comet_ray.errors import CometError

log = logging.getLogger("comet_ray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comet-ray",
        description="Anomaly detection from uncurated image sets: CoMet (confident meta-learning) on SimpleNet.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    train.register(sub)
    inference.register(sub)  # evaluate, predict
    train.register_demo(sub)
    tune.register(sub)
    export.register(sub)
    report.register(sub)
    audit.register(sub)
    upload.register(sub)
    jobs.register(sub)  # submit, status, logs, stop
    parser.set_defaults(commands=frozenset(sub.choices))  # what `submit -- COMMAND` may run
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    start = time.perf_counter()
    try:
        if argv is None:  # what this process shows of its arguments
            hide_process_arguments(sys.argv)
        if getattr(args, "remote_command", False):  # submit strips its command's itself
            code = args.func(args)
        else:
            with uri_credentials_taken(args):
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


def run_command(argv: list[str]) -> int:
    """Run a comet-ray command line (``train ...``) and, when ``COMET_RAY_RESULTS_URI`` is set, copy its
    ``--out`` folder there afterwards. Used by ``jobs/train.py`` / ``jobs/sweep.py`` (RayJob entrypoints)."""
    code = main(argv)
    uri = os.environ.get(submit.RESULTS_URI_ENV, "").strip()
    out = submit.option_value(argv, "--out")
    if code == 0 and uri and out and not out.startswith("s3://"):
        try:
            return submit.push_results(
                out, submit.results_destination(out, uri), os.environ.get("AWS_ENDPOINT_URL")
            )
        except CometError as exc:
            print(f"comet-ray: error: {exc}", file=sys.stderr)
            return 2
    return code
