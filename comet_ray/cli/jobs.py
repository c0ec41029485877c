"""``comet-ray submit``, ``status``, ``logs`` and ``stop``: commands on a Ray cluster (comet_ray.distributed.submit)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from comet_ray.cli.credentials import SUBMIT_NOTICE, strip_arguments, strip_value
from comet_ray.data.s3 import public_s3_uri
from comet_ray.distributed import job_client, placement, submit
from comet_ray.errors import CometError


def _detach_hint(job_id: str, address_flag: str) -> str:
    return (
        f"detached; the job keeps running. Follow it: comet-ray logs {job_id} --follow{address_flag}  "
        f"stop it: comet-ray stop {job_id}{address_flag}"
    )


def _address_flag(args: argparse.Namespace) -> str:
    flag = f" --address {args.address}" if args.address else ""
    return flag + (" --insecure" if getattr(args, "insecure", False) else "")


def cmd_submit(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    command, found = strip_arguments(submit.command_args(args.command, getattr(args, "commands", None)))
    results_uri, results_keys = strip_value(args.results_uri) if args.results_uri else (None, None)
    if found or results_keys:
        print(f"[comet-ray] {SUBMIT_NOTICE}", file=err, flush=True)
    args.results_uri = results_uri
    if args.results_uri and not args.results_uri.startswith("s3://"):
        raise CometError(f"--results-uri must be s3://bucket/prefix, got {args.results_uri}")
    if args.results_uri and submit.option_value(command, "--out") is None:
        raise CometError("--results-uri copies the command's --out folder, but the command has no --out")
    runtime_env = submit.build_runtime_env(submit.load_runtime_env(args.runtime_env))
    entrypoint = submit.build_entrypoint(command, args.results_uri)
    url = job_client.check_address(job_client.resolve_address(args.address), args.insecure)
    client = job_client.connect(args.address, args.insecure)
    submission_id = args.submission_id or submit.new_submission_id(command[0])
    options: dict[str, Any] = {}
    if args.entrypoint_num_cpus:
        options["entrypoint_num_cpus"] = args.entrypoint_num_cpus
    if args.entrypoint_num_gpus:
        options["entrypoint_num_gpus"] = args.entrypoint_num_gpus
    resources = placement.driver_resources(
        args.entrypoint_resources, args.entrypoint_num_cpus, args.entrypoint_num_gpus
    )
    if resources:
        options["entrypoint_resources"] = resources
    metadata = {"comet_ray_command": command[0]}
    out_dir = submit.option_value(command, "--out")
    if out_dir:
        metadata["out"] = public_s3_uri(out_dir)
    shipped = runtime_env.get("working_dir") or ", ".join(runtime_env.get("py_modules") or [])
    print(f"[comet-ray] {placement.placement_line(resources)}", file=err, flush=True)
    print(
        f"[comet-ray] uploading {shipped} to {url} (without {', '.join(submit.DEFAULT_EXCLUDES[:3])}, ...)",
        file=err,
        flush=True,
    )
    started = time.time()
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=submission_id,
            metadata=metadata,
            **options,
        )
    except Exception as exc:  # noqa: BLE001 - upload/validation problems reported as one line
        from ray.exceptions import AuthenticationError

        if isinstance(exc, AuthenticationError):
            raise CometError(job_client._auth_message(url, str(exc))) from None
        text = job_client._scrub(str(exc)).strip()
        first = text.splitlines()[0][:300] if text else exc.__class__.__name__
        raise CometError(f"submitting to {url} failed: {first}") from None
    print(f"[comet-ray] submitted job {job_id}: {entrypoint}", file=err, flush=True)
    results = submit.where_results_go(command, args.results_uri)
    flag = _address_flag(args)
    if args.no_wait:
        print(job_id, file=out, flush=True)
        print(
            f"[comet-ray] follow: comet-ray logs {job_id} --follow{flag} | status: comet-ray status {job_id}{flag} "
            f"| stop: comet-ray stop {job_id}{flag}",
            file=err,
        )
        if results:
            print(f"[comet-ray] {results}", file=err)
        return 0
    try:
        status = job_client.follow(client, job_id, url, started=started, out=out, err=err)
    except KeyboardInterrupt:
        print(f"\n[comet-ray] {_detach_hint(job_id, flag)}", file=err)
        return 130
    print(
        f"[comet-ray] job {job_id} {status} after {job_client._elapsed(time.time() - started)}",
        file=err,
        flush=True,
    )
    if status == "SUCCEEDED" and results:
        print(f"[comet-ray] {results}", file=out, flush=True)
    elif status != "SUCCEEDED":
        info = job_client._call(client.get_job_info, job_id, url=url, job_id=job_id)
        reason = job_client._failure_reason(getattr(info, "message", None) or "")
        if reason:
            print(f"[comet-ray] {reason}", file=err, flush=True)
    return job_client.exit_code(status)


def cmd_status(args: argparse.Namespace) -> int:
    url = job_client.check_address(job_client.resolve_address(args.address), args.insecure)
    client = job_client.connect(args.address, args.insecure)
    info = job_client._call(client.get_job_info, args.job_id, url=url, job_id=args.job_id)
    start = info.start_time / 1000.0 if info.start_time else None
    end = info.end_time / 1000.0 if info.end_time else None
    elapsed = ((end or time.time()) - start) if start else 0.0
    print(job_client.status_line(args.job_id, str(info.status), elapsed))
    print(f"entrypoint: {info.entrypoint}")
    if start:
        print(f"started:    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start))}")
    if end:
        print(f"ended:      {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(end))}")
    if info.message and job_client._failure_reason(info.message):
        print(f"message:    {job_client._failure_reason(info.message)}")
    out = (info.metadata or {}).get("out")
    if out:
        print(f"out:        {out} (on the cluster unless s3://)")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    url = job_client.check_address(job_client.resolve_address(args.address), args.insecure)
    client = job_client.connect(args.address, args.insecure)
    if not args.follow:
        sys.stdout.write(job_client._call(client.get_job_logs, args.job_id, url=url, job_id=args.job_id))
        sys.stdout.flush()
        return 0
    started = job_client._job_start_time(client, args.job_id, url)
    try:
        status = job_client.follow(client, args.job_id, url, started=started)
    except KeyboardInterrupt:
        print(f"\n[comet-ray] stopped following {args.job_id}; it keeps running", file=sys.stderr)
        return 130
    print(f"[comet-ray] job {args.job_id} {status}", file=sys.stderr)
    return job_client.exit_code(status)


def cmd_stop(args: argparse.Namespace) -> int:
    url = job_client.check_address(job_client.resolve_address(args.address), args.insecure)
    client = job_client.connect(args.address, args.insecure)
    stopped = job_client._call(client.stop_job, args.job_id, url=url, job_id=args.job_id)
    if stopped:
        print(f"stop requested for job {args.job_id}")
    else:
        status = job_client._call(client.get_job_status, args.job_id, url=url, job_id=args.job_id)
        print(f"job {args.job_id} already finished ({status})")
    return 0


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help=f"job API of the cluster (env RAY_ADDRESS; default {job_client.DEFAULT_ADDRESS}, "
        "the local end of `ray dashboard` / `kubectl port-forward`)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a plain-http address that is not loopback (code and token travel unencrypted)",
    )


def register(subparsers) -> None:
    """Add ``comet-ray submit``, ``status``, ``logs`` and ``stop`` to the CLI's subparsers."""
    submit_parser = subparsers.add_parser(
        "submit",
        help="run a comet-ray command on a Ray cluster (Ray Jobs API) and stream its output",
        usage="comet-ray submit [options] -- COMMAND [ARGS ...]",
        description="Upload this project and run `python -m comet_ray COMMAND ARGS` as a Ray job. "
        "Exit status: 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED.",
    )
    _add_connection_options(submit_parser)
    submit_parser.add_argument(
        "--no-wait", action="store_true", help="print the job id and return after submitting"
    )
    submit_parser.add_argument(
        "--runtime-env",
        default=None,
        metavar="FILE",
        help="runtime env YAML/JSON (e.g. jobs/runtime_env.yaml: installs the project with pip on "
        "clusters whose image lacks it); the project is added as working_dir unless it sets one",
    )
    submit_parser.add_argument(
        "--submission-id", default=None, help="job id to use (default: comet-COMMAND-TIME-RANDOM)"
    )
    submit_parser.add_argument(
        "--entrypoint-num-gpus",
        type=float,
        default=0.0,
        help="GPUs reserved for the command's own process (1 for a single-GPU `train`; 0 when "
        "it starts Ray Train / Tune workers that reserve their own; default 0)",
    )
    submit_parser.add_argument(
        "--entrypoint-num-cpus",
        type=float,
        default=0.0,
        help="CPUs reserved for the command's process (default 0)",
    )
    submit_parser.add_argument(
        "--entrypoint-resources", default=None, metavar="JSON", help=placement.DRIVER_HELP
    )
    submit_parser.add_argument(
        "--results-uri",
        default=None,
        metavar="S3_URI",
        help="after success, copy the --out folder to S3_URI/<name of --out> (from the cluster, "
        "with the nodes' IAM role)",
    )
    submit_parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the comet-ray command line to run, e.g. -- train s3://bucket/mvtec --category bottle "
        "--out runs/bottle",
    )
    submit_parser.set_defaults(func=cmd_submit, remote_command=True)  # see comet_ray.cli.credentials

    status = subparsers.add_parser("status", help="status of a cluster job")
    status.add_argument("job_id", help="submission id printed by comet-ray submit")
    _add_connection_options(status)
    status.set_defaults(func=cmd_status)

    logs = subparsers.add_parser("logs", help="output of a cluster job")
    logs.add_argument("job_id", help="submission id printed by comet-ray submit")
    logs.add_argument(
        "--follow", "-f", action="store_true", help="keep streaming until the job ends; exit 0/1 like submit"
    )
    _add_connection_options(logs)
    logs.set_defaults(func=cmd_logs)

    stop = subparsers.add_parser("stop", help="stop a cluster job")
    stop.add_argument("job_id", help="submission id printed by comet-ray submit")
    _add_connection_options(stop)
    stop.set_defaults(func=cmd_stop)
