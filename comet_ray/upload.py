"""``comet-ray upload LOCAL_ROOT s3://bucket/prefix``: copy a dataset folder to object storage.

Files keep their relative paths under the prefix, so an MVTec-style tree uploaded here is read back
by every ``s3://`` command unchanged. Hidden files and folders (``.DS_Store``, ``.git``, ...) are
skipped. Uploads run in a thread pool through boto3's managed transfer (multipart for large files),
with the retry, endpoint and credential rules of :mod:`comet_ray.data.s3`.
"""

from __future__ import annotations

import mimetypes
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from comet_ray.data.local_walk import walk_files
from comet_ray.data.s3 import (
    boto_error,
    endpoint_url,
    max_attempts,
    parse_s3_uri,
    region_from_env,
    resolve_endpoint,
)
from comet_ray.errors import CometError, StorageError

DEFAULT_WORKERS = 8


@dataclass
class UploadSummary:
    files: int
    bytes: int
    skipped_hidden: int
    destination: str  # public form: s3://bucket/prefix
    created_bucket: bool = False
    left_out: list[dict] = field(
        default_factory=list
    )  # {"path", "reason"}: non-UTF-8 names, broken links, loops

    def line(self) -> str:
        hidden = f", {self.skipped_hidden} hidden file(s) skipped" if self.skipped_hidden else ""
        left_out = f", {len(self.left_out)} left out (listed above)" if self.left_out else ""
        return (
            f"uploaded {self.files} file(s), {_human(self.bytes)} ({self.bytes} bytes) to {self.destination}"
            f"{hidden}{left_out}"
        )


def s3_client(
    endpoint: str | None = None,
    region: str | None = None,
    workers: int = DEFAULT_WORKERS,
    access_key: str | None = None,
    secret_key: str | None = None,
):
    """A boto3 S3 client: standard-mode retries with backoff, the shared endpoint/region rules."""
    import boto3
    from botocore.config import Config

    endpoint = resolve_endpoint(endpoint)
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts()},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=max(10, 2 * workers),
    )
    session = boto3.session.Session()  # the standard chain: env vars, AWS_PROFILE, shared files, ...
    return session.client(
        "s3",
        endpoint_url=endpoint_url(endpoint) if endpoint else None,
        region_name=region or region_from_env(),
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
    )


def upload_tree(
    local_root: str | os.PathLike,
    destination: str,
    s3_endpoint: str | None = None,
    create_bucket: bool = False,
    workers: int = DEFAULT_WORKERS,
    progress: bool = False,
    last: Sequence[str] = (),
) -> UploadSummary:
    """Upload every non-hidden file under ``local_root`` to ``destination`` (``s3://bucket/prefix``).

    Files named in ``last`` (paths relative to ``local_root``) go up after all the others, so a reader
    that waits for one of them (``metrics.json`` of a run) finds the rest already there.
    """
    from boto3.s3.transfer import TransferConfig
    from botocore import exceptions as bex

    root = Path(os.path.abspath(Path(local_root).expanduser()))
    if not root.is_dir():
        raise CometError(f"{root} is not a folder")
    if not destination.startswith("s3://"):
        raise CometError(f"destination must be an s3://bucket/prefix URI, got {destination!r}")
    location = parse_s3_uri(destination)
    endpoint = resolve_endpoint(s3_endpoint or location.endpoint)
    listing = walk_files(root, count_hidden=True)
    files = [Path(path) for path in listing.files]
    if not files:
        raise CometError(f"no files to upload under {root}")
    client = s3_client(endpoint, location.region, workers, location.access_key, location.secret_key)
    created = _ensure_bucket(client, location.bucket, destination, endpoint, create_bucket)

    transfer = TransferConfig(multipart_threshold=64 * 1024 * 1024, max_concurrency=4, use_threads=True)
    total = sum(f.stat().st_size for f in files)
    bar = _progress_bar(total, progress)
    lock = threading.Lock()

    def on_bytes(amount: int) -> None:
        if bar is not None:
            with lock:
                bar.update(amount)

    def put(path: Path) -> int:
        rel = path.relative_to(root).as_posix()
        key = f"{location.key}/{rel}" if location.key else rel
        extra = {"ContentType": mimetypes.guess_type(path.name)[0] or "application/octet-stream"}
        client.upload_file(
            str(path), location.bucket, key, ExtraArgs=extra, Config=transfer, Callback=on_bytes
        )
        return path.stat().st_size

    final = {root / name for name in last}
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="upload") as pool:
            sent = sum(pool.map(put, [f for f in files if f not in final]))
        sent += sum(put(f) for f in files if f in final)
    except (bex.BotoCoreError, bex.ClientError) as exc:
        raise boto_error(exc, destination, endpoint) from exc
    except Exception as exc:  # boto3's S3UploadFailedError wraps the ClientError
        cause = exc.__cause__ or exc.__context__
        if type(exc).__name__ == "S3UploadFailedError":
            if isinstance(cause, (bex.BotoCoreError, bex.ClientError)):
                raise boto_error(cause, destination, endpoint) from exc
            raise StorageError(f"upload to {location.public} failed: {str(exc).splitlines()[0]}") from exc
        raise
    finally:
        if bar is not None:
            bar.close()
    return UploadSummary(len(files), sent, listing.hidden, location.public, created, listing.problems)


def _ensure_bucket(client, bucket: str, destination: str, endpoint: str | None, create: bool) -> bool:
    from botocore import exceptions as bex

    try:
        client.head_bucket(Bucket=bucket)
        return False
    except bex.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise boto_error(exc, destination, endpoint) from exc
    except bex.BotoCoreError as exc:
        raise boto_error(exc, destination, endpoint) from exc
    if not create:
        at = f" at {endpoint_url(endpoint)}" if endpoint else ""
        raise StorageError(f"bucket '{bucket}' does not exist{at}; pass --create-bucket to create it")
    try:
        region = client.meta.region_name
        if region and region != "us-east-1":
            client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
        else:
            client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        return False
    except (bex.BotoCoreError, bex.ClientError) as exc:
        raise boto_error(exc, destination, endpoint) from exc
    return True


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="upload", leave=False)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


# --- command line --------------------------------------------------------------------------------
