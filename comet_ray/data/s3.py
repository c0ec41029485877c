"""S3 access in one place: endpoint, region, credentials, retries, and one-line errors.

Listing and reading (``pyarrow.fs.S3FileSystem``), the Ray Data pipeline and ``comet-ray upload``
(boto3) all build their clients here, so they agree on:

* **endpoint**: ``--s3-endpoint`` / the ``s3_endpoint`` argument, else ``AWS_ENDPOINT_URL_S3``, else
  ``AWS_ENDPOINT_URL``; its scheme picks http or https (https when none is given);
* **region**: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else the SDK's own default (profile config);
  on AWS itself, with no region configured, the bucket's region is looked up;
* **credentials**: the standard AWS chain (environment variables, ``AWS_PROFILE`` / shared
  credentials file, ...), never command-line arguments. ``s3://KEY:SECRET@bucket/prefix`` works: the
  CLI takes the keys out of it once (``comet_ray.cli.credentials``: a private shared-credentials file
  for the standard chain) and hands on the URI without them; whatever is stored, printed or given to
  Ray goes through :func:`public_s3_uri`;
* **retries**: transient failures (5xx, throttling, connection refused or reset) are retried with
  exponential backoff, ``COMET_RAY_S3_MAX_ATTEMPTS`` attempts in all (default 4);
* **errors**: missing bucket, denied credentials and an unreachable endpoint become one
  :class:`~comet_ray.errors.StorageError` line naming the bucket/prefix (never a secret).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow.fs as pafs

from comet_ray.errors import StorageError

ENV_MAX_ATTEMPTS = "COMET_RAY_S3_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 4  # pyarrow's backoff grows fast: 4 attempts give up after ~2-5 s
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 120.0

_DENIED = (
    "ACCESS_DENIED",
    "SIGNATURE_DOES_NOT_MATCH",
    "INVALID_ACCESS_KEY_ID",
    "MISSING_AUTHENTICATION",
    "UNRECOGNIZED_CLIENT",
    "INVALID_CLIENT_TOKEN",
    "EXPIRED_TOKEN",
    "HTTP status 401",
    "HTTP status 403",
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "Forbidden",
)
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket")
_UNREACHABLE = (
    "NETWORK_CONNECTION",
    "Could not connect",
    "Couldn't connect",
    "Connection refused",
    "Connection reset",
    "Couldn't resolve host",
    "Could not resolve host",
    "Timeout was reached",
    "REQUEST_TIMEOUT",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
    "SLOW_DOWN",
    "HTTP status 5",
    "curlCode: 6,",
    "curlCode: 7,",
    "curlCode: 28,",
    "curlCode: 52,",
    "curlCode: 56,",
)


@dataclass(frozen=True)
class S3Location:
    """An ``s3://`` URI taken apart. Credentials in the URI stay out of ``repr`` and of ``public``."""

    bucket: str
    key: str  # without leading or trailing slash; "" for the bucket itself
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = None
    endpoint: str | None = None  # from an ``?endpoint_override=`` query, as pyarrow's URIs allow

    @property
    def path(self) -> str:
        """The pyarrow filesystem path: ``bucket/key``."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    @property
    def public(self) -> str:
        return f"s3://{self.path}"


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def split_userinfo(uri: str) -> tuple[str, str]:
    """``(uri without its user info, the user info)``; ``""`` when it has none. Query and path are kept.

    Any ``scheme://user[:secret]@host/...``. For ``s3://`` a raw ``/`` inside the secret (AWS secrets may
    hold one) still counts as user info: no bucket name holds ``:``, so ``s3://KEY:ab/cd@bucket`` is
    ``KEY:ab/cd`` at ``bucket``.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or len(scheme) < 2 or not scheme.replace("+", "").replace(".", "").replace("-", "").isalnum():
        return uri, ""
    end = min([i for i in (rest.find("?"), rest.find("#")) if i >= 0], default=len(rest))
    authority = rest.find("/", 0, end)
    authority = end if authority < 0 else authority
    at = rest.rfind("@", 0, authority)
    if at < 0 and scheme.lower() == "s3" and ":" in rest[:authority]:
        at = rest.find("@", authority, end)
    if at < 0:
        return uri, ""
    return f"{scheme}://{rest[at + 1 :]}", rest[:at]


def uri_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user info, access key, secret key)``; the keys URL-decoded, None when absent."""
    stripped, userinfo = split_userinfo(uri)
    access_key, _, secret_key = userinfo.partition(":")
    return stripped, unquote(access_key) or None, unquote(secret_key) or None


def parse_s3_uri(uri: str) -> S3Location:
    if not is_s3_uri(uri):
        raise StorageError(f"not an s3:// URI: {public_s3_uri(uri)}")
    stripped, access_key, secret_key = uri_credentials(uri)
    parts = urlsplit(stripped)
    bucket = parts.netloc
    if not bucket:
        raise StorageError(f"no bucket in {public_s3_uri(uri)}: expected s3://bucket/prefix")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    endpoint = query.get("endpoint_override")
    if endpoint and "scheme" in query and "://" not in endpoint:
        endpoint = f"{query['scheme']}://{endpoint}"
    return S3Location(bucket, parts.path.strip("/"), access_key, secret_key, query.get("region"), endpoint)


def public_s3_uri(uri: str) -> str:
    """``uri`` safe to store, print, log or hand to Ray: without user info (credentials) or query string.

    The one place that makes a URI public, for ``s3://`` and any other ``scheme://user:secret@host``;
    local paths come back as they are.
    """
    stripped, _ = split_userinfo(uri)
    parts = urlsplit(stripped)
    if not parts.scheme or len(parts.scheme) == 1:
        return uri
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    """The endpoint to use: the explicit one, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``."""
    for value in (endpoint, os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL")):
        if value and value.strip():
            return value.strip()
    return None


def endpoint_url(endpoint: str) -> str:
    """``host:port`` -> ``https://host:port``; URLs with a scheme are kept (user info dropped)."""
    url = endpoint if "://" in endpoint else f"https://{endpoint}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(f"S3 endpoint {public_s3_uri(url)} is not an http(s)://host[:port] URL")
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def region_from_env() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def max_attempts() -> int:
    """Attempts per request (first try + retries), from ``COMET_RAY_S3_MAX_ATTEMPTS`` (default 4)."""
    text = os.environ.get(ENV_MAX_ATTEMPTS, "")
    try:
        return max(1, int(text)) if text.strip() else DEFAULT_MAX_ATTEMPTS
    except ValueError:
        raise StorageError(f"{ENV_MAX_ATTEMPTS} must be a whole number, got {text!r}") from None


def s3_filesystem(
    endpoint: str | None = None,
    *,
    bucket: str | None = None,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    attempts: int | None = None,
) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem with comet-ray's endpoint, region, retry and timeout rules."""
    endpoint = resolve_endpoint(endpoint)
    region = region or region_from_env()
    kwargs: dict = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts or max_attempts()),
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
    }
    if endpoint:
        parts = urlsplit(endpoint_url(endpoint))
        kwargs["endpoint_override"] = parts.netloc
        kwargs["scheme"] = parts.scheme
    elif region is None and bucket:
        region = _aws_bucket_region(bucket)
    if region:
        kwargs["region"] = region
    if access_key and secret_key:
        kwargs["access_key"], kwargs["secret_key"] = access_key, secret_key
    return pafs.S3FileSystem(**kwargs)


def open_s3(uri: str, endpoint: str | None = None) -> tuple[pafs.S3FileSystem, str]:
    """``(filesystem, "bucket/key")`` for an ``s3://`` URI."""
    location = parse_s3_uri(uri)
    fs = s3_filesystem(
        endpoint or location.endpoint,
        bucket=location.bucket,
        region=location.region,
        access_key=location.access_key,
        secret_key=location.secret_key,
    )
    return fs, location.path


def _aws_bucket_region(bucket: str) -> str | None:
    """The region of a bucket on AWS itself (one anonymous HEAD), or None when it cannot be found."""
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError):
        return None


# --- errors --------------------------------------------------------------------------------------


def classify(exc: BaseException) -> str | None:
    """``"denied"``, ``"no_bucket"``, ``"unreachable"`` or None (a per-object problem, or unknown)."""
    text = _error_text(exc)
    if any(marker in text for marker in _NO_BUCKET):
        return "no_bucket"
    if any(marker in text for marker in _DENIED):
        return "denied"
    if any(marker in text for marker in _UNREACHABLE):
        return "unreachable"
    return None


def is_storage_failure(exc: BaseException) -> bool:
    """True when the store itself is unusable (as opposed to one missing or unreadable object)."""
    return classify(exc) is not None


def storage_error(
    exc: BaseException, uri: str, filesystem: pafs.FileSystem | None = None, endpoint: str | None = None
) -> StorageError:
    """One clear line for a failed storage call on ``uri`` (no credentials, no request ids)."""
    shown = public_s3_uri(uri)
    endpoint = endpoint or _endpoint_of(filesystem)
    at = f" at {public_s3_uri(endpoint_url(endpoint))}" if endpoint else ""
    kind = classify(exc)
    if kind == "no_bucket" and is_s3_uri(uri):
        bucket = parse_s3_uri(uri).bucket
        return StorageError(f"bucket '{bucket}' does not exist{at} (asked for {shown})")
    if kind == "denied":
        return StorageError(
            f"access denied to {shown}{at} ({_code(exc) or 'forbidden'}): check the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and their permissions on this bucket"
        )
    if kind == "unreachable":
        return StorageError(
            f"cannot reach the object store{at} for {shown} after retries: {_short_reason(exc)} "
            f"(is the endpoint up? more attempts: {ENV_MAX_ATTEMPTS})"
        )
    return StorageError(f"storage error on {shown}{at}: {_short_reason(exc)}")


def boto_error(exc: BaseException, uri: str, endpoint: str | None = None) -> StorageError:
    """The same one line for a boto3/botocore failure."""
    from botocore import exceptions as bex

    shown = public_s3_uri(uri)
    at = f" at {public_s3_uri(endpoint_url(endpoint))}" if endpoint else ""
    if isinstance(exc, bex.NoCredentialsError):
        return StorageError(
            f"no AWS credentials found for {shown}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(
        exc,
        (
            bex.EndpointConnectionError,
            bex.ConnectionClosedError,
            bex.ConnectTimeoutError,
            bex.ReadTimeoutError,
        ),
    ):
        return StorageError(
            f"cannot reach the object store{at} for {shown} after retries: {type(exc).__name__} "
            f"(is the endpoint up? more attempts: {ENV_MAX_ATTEMPTS})"
        )
    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and not parse_s3_uri(uri).key):
            return StorageError(f"bucket '{parse_s3_uri(uri).bucket}' does not exist{at} (asked for {shown})")
        if code in _DENIED or status in (401, 403):
            return StorageError(
                f"access denied to {shown}{at} ({code or status}): check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and their permissions on this bucket"
            )
        if status and int(status) >= 500:
            return StorageError(
                f"the object store{at} kept failing for {shown} after retries: {code or status}"
            )
        return StorageError(
            f"storage error on {shown}{at}: {code or status}: {error.get('Message', '')}".rstrip(": ")
        )
    if isinstance(exc, bex.BotoCoreError):
        return StorageError(f"storage error on {shown}{at}: {_short_reason(exc)}")
    return storage_error(exc, uri, endpoint=endpoint)


def _error_text(exc: BaseException) -> str:
    texts = []
    while exc is not None and len(texts) < 5:
        texts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " | ".join(texts)


def _code(exc: BaseException) -> str | None:
    text = str(exc)
    marker = "AWS Error "
    if marker in text:
        return text.split(marker, 1)[1].split(" ", 1)[0]
    return None


def _short_reason(exc: BaseException) -> str:
    """The useful part of an AWS SDK message, one line, without request ids."""
    text = " ".join(str(exc).split())
    if "AWS Error " in text:
        text = "AWS Error " + text.split("AWS Error ", 1)[1]
    for noise in (" (Request ID:", "; Details:"):
        text = text.partition(noise)[0]
    if "Could not connect" in text or "Failed to connect" in text or "curlCode: 7," in text:
        text = f"connection refused ({text})"
    return text[:300] or type(exc).__name__


def _endpoint_of(filesystem: pafs.FileSystem | None) -> str | None:
    """``scheme://host:port`` of an S3 filesystem with an endpoint override (None otherwise)."""
    if not isinstance(filesystem, pafs.S3FileSystem):
        return None
    try:
        options = filesystem.__reduce__()[1][0]
        host = options.get("endpoint_override")
        return f"{options.get('scheme') or 'https'}://{host}" if host else None
    except Exception:  # noqa: BLE001 - an introspection nicety only
        return None
