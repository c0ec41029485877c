"""Credentials in ``s3://KEY:SECRET@bucket/...`` arguments, taken out once, where the command line is read.

Nothing after this point sees them in a URI: the keys go into a private AWS shared-credentials file
named by this process's environment (``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_PROFILE``: the standard chain
that the S3 clients here, and the workers of a local Ray it starts, read), and every command gets the
URI without them. Run folders, checkpoints, Tune's ``param_space`` and printed lines then cannot carry
them. The file (mode 0600 in a 0700 folder) is removed when the process exits; a killed process leaves it.

``submit`` is different: its command runs elsewhere, and a job's entrypoint, metadata and runtime env
are stored by the cluster and shown to anyone who can list jobs. Credentials in its command are removed
and not sent; the cluster's nodes use their own (instance role, environment).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator

from comet_ray.data.s3 import uri_credentials
from comet_ray.errors import CometError

S3 = "s3://"
PROFILE = "comet-ray-uri"
ENV_NAMES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_PROFILE",
)
SUBMIT_NOTICE = (
    "credentials in s3:// URIs are not sent with a job (the cluster stores its command line): "
    "they were removed; the cluster's nodes need their own (instance role or environment)"
)


def strip_value(value: str) -> tuple[str, tuple[str | None, str | None] | None]:
    """``value`` (a URI, or an argument such as ``--out=s3://...`` / ``knob=s3://...``) without the user
    info of the ``s3://`` URI in it, and ``(access key, secret key)`` when there was some."""
    head, scheme, tail = value.partition(S3)
    if not scheme:
        return value, None
    stripped, access_key, secret_key = uri_credentials(scheme + tail)
    if stripped == scheme + tail:
        return value, None
    return head + stripped, (access_key, secret_key)


def strip_arguments(values: list[str]) -> tuple[list[str], set[tuple[str | None, str | None]]]:
    """Every value without credentials, and the distinct credentials found."""
    found: set[tuple[str | None, str | None]] = set()
    stripped = []
    for value in values:
        clean, keys = strip_value(value)
        stripped.append(clean)
        if keys:
            found.add(keys)
    return stripped, found


@contextlib.contextmanager
def uri_credentials_taken(args: argparse.Namespace) -> Iterator[bool]:
    """:func:`take_uri_credentials` for one command; the AWS variables it set are restored afterwards
    (``main`` may run several commands in one process). Yields whether any were found."""
    saved = {name: os.environ.get(name) for name in ENV_NAMES}
    try:
        yield take_uri_credentials(args)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def take_uri_credentials(args: argparse.Namespace) -> bool:
    """Remove credentials from every ``s3://`` value of ``args`` (in place) into a private credentials file
    (:func:`use_credentials_file`).

    One set of keys per command: different keys in two URIs, or a key without its secret, is one line.
    Returns whether any were found.
    """
    found: set[tuple[str | None, str | None]] = set()
    for name, value in vars(args).items():
        if isinstance(value, str):
            clean, keys = strip_value(value)
            setattr(args, name, clean)
            found |= {keys} if keys else set()
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            clean_list, keys_found = strip_arguments(value)
            setattr(args, name, clean_list)
            found |= keys_found
    if not found:
        return False
    if len(found) > 1:
        raise CometError(
            "the s3:// URIs carry different credentials; give one set, or none and use "
            "AWS_PROFILE / AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    access_key, secret_key = found.pop()
    if not (access_key and secret_key):
        raise CometError(
            "an s3://KEY:SECRET@bucket URI needs both the access key and the secret "
            "(or neither: AWS_PROFILE / AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    use_credentials_file(access_key, secret_key)
    return True


def use_credentials_file(access_key: str, secret_key: str) -> str:
    """Point this process (and the local Ray workers it starts, which inherit its environment) at a private
    AWS shared-credentials file holding the keys; removed when the process exits. Returns its path.

    Not ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` themselves: Ray Tune copies those from the
    driver's environment into every trial's runtime env, which Ray's runtime-env agent logs in full
    (``logs/runtime_env_agent.log``) and sends to a remote cluster. A file path means nothing there.
    """
    folder = tempfile.mkdtemp(prefix="comet-ray-aws-")  # mode 0700
    path = os.path.join(folder, "credentials")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(f"[{PROFILE}]\naws_access_key_id = {access_key}\naws_secret_access_key = {secret_key}\n")
    atexit.register(shutil.rmtree, folder, True)
    for name in ENV_NAMES[:4]:
        os.environ.pop(name, None)  # they would win over the profile
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = path
    os.environ["AWS_PROFILE"] = PROFILE
    return path


def hide_process_arguments(argv: list[str]) -> list[str]:
    """Strip credentials from this process's own arguments (``sys.argv`` and what ``/proc/self/cmdline``
    shows: Ray records that as the entrypoint of every driver it connects, on the cluster it joins)."""
    clean, found = strip_arguments(argv)
    if found:
        argv[:] = clean
        try:
            from ray._raylet import setproctitle
        except ImportError:  # without Ray nothing records it
            return argv
        setproctitle(shlex.join([sys.executable, *clean]))
    return argv
