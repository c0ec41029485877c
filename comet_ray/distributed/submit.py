"""Run comet-ray commands on a Ray cluster through the Ray Jobs API.

``comet-ray submit [--address URL] [--no-wait] [--runtime-env FILE] -- train DATA --category C --out DIR``
uploads the project (the folder holding ``pyproject.toml``; ``.venv``, ``.git``, run and data folders
excluded) as the job's ``working_dir`` and runs ``python -m comet_ray train ...`` as the job's
entrypoint. Whatever follows ``--`` is passed through unchanged, so every command the CLI has
(``train``, ``tune``, ``evaluate``, ...) runs remotely as it runs locally. The submit command then
streams the job's output with a status line (job id, status, elapsed time) and exits with the job's
result: 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED.

``comet-ray status JOB_ID``, ``comet-ray logs JOB_ID [--follow]`` and ``comet-ray stop JOB_ID`` look
after a job submitted earlier (``--no-wait``, or a terminal that was closed: Ctrl-C detaches, the job
keeps running).

Address: ``--address``, else ``RAY_ADDRESS``, else ``http://127.0.0.1:8265`` (the local end of
``ray dashboard cluster.yaml`` or ``kubectl port-forward``). The job API runs code on the cluster,
so a plain ``http://`` address that is not loopback is refused unless ``--insecure`` is given: reach
remote clusters through a port-forward or over https.

Token authentication (Ray >= 2.52, ``RAY_AUTH_MODE=token`` on the cluster): the token is read the way
Ray reads it -- ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token`` -- and sent as ``Authorization: Bearer ...`` on every request (the header Ray's
dashboard checks; the same header Ray's own client sends). It is never printed. A cluster without
token auth ignores the header.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from comet_ray.errors import CometError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
RESULTS_URI_ENV = "COMET_RAY_RESULTS_URI"

# gitignore-style patterns, relative to the working dir (Ray also honours the project's .gitignore).
# Folders a user keeps in the project root (environments, datasets, run outputs) are anchored with a
# leading "/": an unanchored "data/" matches at any depth and would strip the package's own
# comet_ray/data/ from the job. Only names that are never part of the package match everywhere.
DEFAULT_EXCLUDES = [
    "/.venv/",
    "/venv/",
    "/.git/",
    "__pycache__/",
    "*.pyc",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    "/runs/",
    "/out/",
    "/data/",
    "/datasets/",
    "/.cache/",
    "/cache/",
    "/.whl/",
    "/.gpu/",
    "/dist/",
    "/build/",
    "/comet-ray-demo/",
    "/predictions/",
    "/tune-runs/",
    "/tune-results/",
    "/.ci/out/",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_SECONDS = 2.0
HEARTBEAT_SECONDS = 30.0


# --------------------------------------------------------------------------- address and token
def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_ADDRESS``, else the local port-forward; always ``scheme://host:port``."""
    text = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip().rstrip("/")
    if "://" not in text:
        if text == "auto":
            return DEFAULT_ADDRESS
        text = "http://" + text
    scheme = text.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise CometError(
            f"address {text} is not the job API: use the dashboard's http(s)://HOST:8265 address "
            f"(for a remote cluster: `ray dashboard cluster.yaml`, then {DEFAULT_ADDRESS})"
        )
    return text


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(url: str, insecure: bool) -> str:
    """Refuse a plain-http address that leaves this machine unless ``insecure``; returns ``url``."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise CometError(f"address {url} has no host")
    try:
        _ = parts.port  # parsing it raises on a bad port
    except ValueError:
        raise CometError(f"address {url} has an invalid port") from None
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not insecure:
        raise CometError(
            f"refusing plain-http address {url}: code and token would cross the network unencrypted; "
            f"port-forward (`ray dashboard cluster.yaml`, then {DEFAULT_ADDRESS}), use https://, "
            "or pass --insecure"
        )
    return url


def find_token() -> tuple[str | None, str]:
    """The cluster token and its source: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    value = os.environ.get(TOKEN_ENV, "").strip()
    if value:
        return value, TOKEN_ENV
    named = os.environ.get(TOKEN_PATH_ENV, "").strip()
    if named:
        path = Path(named).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise CometError(
                f"{TOKEN_PATH_ENV}={path}: cannot read the token file ({exc.strerror})"
            ) from None
        if not value:
            raise CometError(f"{TOKEN_PATH_ENV}={path}: the token file is empty")
        return value, str(path)
    path = DEFAULT_TOKEN_FILE.expanduser()
    if path.is_file():
        try:
            value = path.read_text().strip()
        except OSError:
            value = ""
        if value:
            return value, str(path)
    return None, ""


def auth_headers() -> dict[str, str]:
    token, _ = find_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _scrub(text: str) -> str:
    """Never let a token reach the terminal, whatever an error message quotes."""
    try:
        token = find_token()[0]
    except CometError:
        token = None
    return text.replace(token, "***") if token else text


def _probe(url: str, timeout: float = 5.0) -> None:
    """Fail fast (one line) when nothing listens at ``url`` instead of hanging in a TCP connect."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        hint = ""
        if is_loopback(parts.hostname or ""):
            hint = (
                " -- is the port-forward running (`ray dashboard cluster.yaml` or "
                "`kubectl port-forward svc/<cluster>-head-svc 8265:8265`)?"
            )
        raise CometError(f"cannot reach the Ray job API at {url}: {reason}{hint}") from None


_RAY_CHATTER = (
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
)


def _quiet_ray() -> None:
    """Ray's client logs every ignored file and websocket event at INFO; keep them for ``-v`` only."""
    if logging.getLogger("comet_ray").isEnabledFor(logging.DEBUG):
        return
    for name in _RAY_CHATTER:
        logging.getLogger(name).setLevel(logging.WARNING)


def connect(address: str | None, insecure: bool = False, verify: bool | str = True):
    """A ``JobSubmissionClient`` for ``address`` with the token attached; user errors as one line."""
    url = check_address(resolve_address(address), insecure)
    _probe(url)
    _quiet_ray()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url, headers=auth_headers(), verify=verify)
    except AuthenticationError as exc:
        raise CometError(_auth_message(url, str(exc))) from None
    except ConnectionError:
        raise CometError(f"cannot reach the Ray job API at {url} (connection refused or reset)") from None
    except Exception as exc:  # noqa: BLE001 - anything else: not a Ray dashboard
        first = _scrub(str(exc)).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise CometError(f"{url} does not answer like a Ray {_ray_version()} job API: {first}") from None


def _auth_message(url: str, text: str) -> str:
    _, source = find_token()
    if text.startswith("Authentication failed"):
        return f"the cluster at {url} rejected the token from {source or 'nowhere'} (403); use the cluster's token"
    return (
        f"the cluster at {url} requires a token (401): set {TOKEN_ENV}, or {TOKEN_PATH_ENV}, "
        f"or write it to {DEFAULT_TOKEN_FILE}"
    )


def _ray_version() -> str:
    import ray

    return ray.__version__


def _call(fn: Callable, *args, url: str = "", job_id: str = ""):
    """Run one client call; turn Ray's RuntimeErrors (HTTP errors) into one line."""
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args)
    except AuthenticationError as exc:
        raise CometError(_auth_message(url, str(exc))) from None
    except (ConnectionError, OSError) as exc:
        raise CometError(f"lost the Ray job API at {url}: {exc.__class__.__name__}") from None
    except RuntimeError as exc:
        text = _scrub(str(exc))
        if job_id and ("404" in text or "does not exist" in text):
            raise CometError(f"no job {job_id} on the cluster at {url}") from None
        raise CometError(
            text.strip().splitlines()[0][:300] if text.strip() else "job API request failed"
        ) from None


# --------------------------------------------------------------------------- runtime env and entrypoint
def project_root() -> Path | None:
    """The source tree this package runs from (editable install / checkout), or None for a wheel install."""
    import comet_ray

    root = Path(comet_ray.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        if pyproject.is_file() and 'name = "comet-ray"' in pyproject.read_text():
            return root
    except OSError:
        pass
    return None


def load_runtime_env(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise CometError(f"--runtime-env {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CometError(f"--runtime-env {path}: not valid YAML/JSON ({exc.__class__.__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CometError(f"--runtime-env {path}: expected a mapping (working_dir, pip, env_vars, ...)")
    return data


_DETECT = Path("<detect>")


def build_runtime_env(file_env: dict[str, Any] | None = None, root: Path | None = _DETECT) -> dict[str, Any]:
    """The job's runtime env: ``file_env`` (``--runtime-env``) plus the project as ``working_dir``.

    A local ``working_dir`` (relative paths are relative to the current directory, as with
    ``ray job submit``) gets :data:`DEFAULT_EXCLUDES` added to its ``excludes``. Without any
    ``working_dir`` the project root is used; a wheel install without a source tree ships the
    ``comet_ray`` package as ``py_modules`` instead.
    """
    env = dict(file_env or {})
    root = project_root() if root is _DETECT else root
    if "working_dir" not in env:
        if root is not None:
            env["working_dir"] = str(root)
        else:
            import comet_ray

            modules = list(env.get("py_modules") or [])
            package = str(Path(comet_ray.__file__).resolve().parent)
            if package not in modules:
                modules.append(package)
            env["py_modules"] = modules
    working_dir = env.get("working_dir")
    if isinstance(working_dir, str) and "://" not in working_dir:
        local = Path(working_dir).expanduser().resolve()
        if not local.is_dir():
            raise CometError(f"runtime env working_dir {working_dir} is not a folder")
        if not (local / "comet_ray" / "__init__.py").is_file() and not env.get("py_modules"):
            raise CometError(
                f"runtime env working_dir {local} does not hold the comet_ray package: run from the "
                "project root (relative working_dir paths are relative to the current directory)"
            )
        env["working_dir"] = str(local)
        excludes = list(env.get("excludes") or [])
        env["excludes"] = excludes + [p for p in DEFAULT_EXCLUDES if p not in excludes]
    env_vars = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}
    env_vars.setdefault("PYTHONUNBUFFERED", "1")
    env["env_vars"] = env_vars
    return env


def command_args(raw: list[str], known: set[str] | None = None) -> list[str]:
    """The arguments after ``--``: a comet-ray command line (``train DATA ...``); ``known``: the CLI's commands."""
    args = list(raw)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise CometError(
            "nothing to run: give a comet-ray command after --, e.g. "
            "comet-ray submit -- train DATA --category bottle --out runs/bottle"
        )
    if args[0] in ("comet-ray", "comet_ray"):
        args = args[1:]
    if not args or args[0].startswith("-"):
        raise CometError(f"expected a comet-ray command after --, got {' '.join(raw)!r}")
    if known is not None and args[0] not in known:
        raise CometError(f"'{args[0]}' is not a comet-ray command here (known: {', '.join(sorted(known))})")
    if args[0] in ("submit", "status", "logs", "stop"):
        raise CometError(f"'{args[0]}' runs on your machine, not as a cluster job")
    return args


def option_value(args: list[str], name: str) -> str | None:
    """The value of ``--name X`` / ``--name=X`` in a pass-through command line (last one wins)."""
    value = None
    for i, item in enumerate(args):
        if item == name and i + 1 < len(args):
            value = args[i + 1]
        elif item.startswith(name + "="):
            value = item.split("=", 1)[1]
    return value


def build_entrypoint(args: list[str], results_uri: str | None = None, python: str = "python") -> str:
    """``python -m comet_ray ARGS`` (shell-quoted), then the results upload when ``results_uri`` is set."""
    entry = shlex.join([python, "-m", "comet_ray", *args])
    out = option_value(args, "--out")
    if results_uri and out and not out.startswith("s3://"):
        entry += " && " + shlex.join(
            [
                python,
                "-m",
                "comet_ray.distributed.submit",
                "push-results",
                out,
                results_destination(out, results_uri),
            ]
        )
    return entry


def results_destination(out: str, results_uri: str) -> str:
    return f"{results_uri.rstrip('/')}/{Path(out.rstrip('/')).name}"


def where_results_go(args: list[str], results_uri: str | None = None) -> str | None:
    out = option_value(args, "--out")
    if out is None:
        return None
    if out.startswith("s3://"):
        return f"results: {out}"
    if results_uri:
        return f"results: {results_destination(out, results_uri)} (copied from {out} on the node that ran the job)"
    return (
        f"results: {out} on the cluster's filesystem (the node that ran the job, relative to its working dir "
        "unless absolute), not on this machine; pass --results-uri s3://... to copy them out"
    )


def new_submission_id(command: str) -> str:
    return f"comet-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------- following a job
def _elapsed(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def status_line(job_id: str, status: str, elapsed: float) -> str:
    return f"[comet-ray] job {job_id} | {status} | {_elapsed(elapsed)} elapsed"


async def _follow(
    client,
    job_id: str,
    started: float,
    out: TextIO,
    err: TextIO,
    url: str,
    logs: bool = True,
    poll: float = POLL_SECONDS,
    heartbeat: float = HEARTBEAT_SECONDS,
) -> str:
    """Stream the job's output to ``out`` and a status line to ``err`` until it ends; returns its status."""
    printed = 0
    tail_failed = False

    async def tail() -> None:
        nonlocal printed, tail_failed
        try:
            async for chunk in client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()
                printed += len(chunk)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a dropped websocket: fall back to get_job_logs at the end
            tail_failed = True

    tail_task = asyncio.create_task(tail()) if logs else None
    last_status, last_line = None, 0.0
    try:
        while True:
            status = str(
                await asyncio.to_thread(_call, client.get_job_status, job_id, url=url, job_id=job_id)
            )
            now = time.monotonic()
            if status != last_status or now - last_line >= heartbeat:
                print(status_line(job_id, status, time.time() - started), file=err, flush=True)
                last_status, last_line = status, now
            if status in TERMINAL:
                break
            await asyncio.sleep(poll)
        if tail_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(tail_task), timeout=15)
            except TimeoutError:
                tail_failed = True
            if tail_failed:
                full = await asyncio.to_thread(_call, client.get_job_logs, job_id, url=url, job_id=job_id)
                if len(full) > printed:
                    out.write(full[printed:])
                    out.flush()
        return status
    finally:
        if tail_task is not None and not tail_task.done():
            tail_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await tail_task


def follow(
    client,
    job_id: str,
    url: str,
    started: float | None = None,
    logs: bool = True,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> str:
    out = out or sys.stdout
    err = err or sys.stderr
    return asyncio.run(
        _follow(client, job_id, started if started is not None else time.time(), out, err, url, logs)
    )


def exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def _job_start_time(client, job_id: str, url: str) -> float:
    info = _call(client.get_job_info, job_id, url=url, job_id=job_id)
    start = getattr(info, "start_time", None)
    return start / 1000.0 if start else time.time()


# --------------------------------------------------------------------------- commands
def _failure_reason(message: str) -> str:
    first = _scrub(message).strip().splitlines()[0] if message.strip() else ""
    return first.split(", last available logs")[0][:300]


def push_results(local: str, destination: str, s3_endpoint: str | None = None) -> int:
    """Copy a finished run folder to object storage (runs on the cluster, after the command)."""
    from comet_ray.upload import upload_tree

    if not Path(local).is_dir():
        raise CometError(f"no results folder {local} to copy to {destination}")
    summary = upload_tree(local, destination, s3_endpoint, False, 8, progress=False)
    print(summary.line(), flush=True)
    return 0


def _main(argv: list[str] | None = None) -> int:
    """``python -m comet_ray.distributed.submit push-results LOCAL S3_URI`` (used inside jobs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 3 and argv[0] == "push-results":
        try:
            return push_results(argv[1], argv[2], os.environ.get("AWS_ENDPOINT_URL"))
        except CometError as exc:
            print(f"comet-ray: error: {exc}", file=sys.stderr)
            return 2
    print(
        "usage: python -m comet_ray.distributed.submit push-results LOCAL_DIR s3://bucket/prefix",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(_main())
