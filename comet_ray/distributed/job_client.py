"""The Ray Jobs client of ``comet-ray submit``, ``status``, ``logs`` and ``stop``: the address and its checks,
the token, the connection, and following a job's logs with a status line.

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
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from comet_ray.errors import CometError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


TOKEN_ENV = "RAY_AUTH_TOKEN"


TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


POLL_SECONDS = 2.0


HEARTBEAT_SECONDS = 30.0


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


def _failure_reason(message: str) -> str:
    first = _scrub(message).strip().splitlines()[0] if message.strip() else ""
    return first.split(", last available logs")[0][:300]
