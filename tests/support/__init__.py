"""Helpers for tests and benchmarks (a local S3-compatible server, a multi-node cluster, tiny settings).

Not part of the installed package: tests import it as ``support`` (pytest puts tests/ on sys.path), benches
put tests/ on sys.path first.
"""

import csv
import os
from pathlib import Path

# Every test and benchmark keeps its services on 127.0.0.1 and quiet: explicit (disabled) Ray auth,
# no usage stats, single-node Ray on loopback, no cloud metadata probes, no model-hub download.
LOCAL_ENV: dict[str, str] = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "AWS_EC2_METADATA_DISABLED": "true",
    "COMET_RAY_OFFLINE": "1",
}


def use_local_env() -> None:
    """Set :data:`LOCAL_ENV` in ``os.environ`` where not already set (call before Ray is imported)."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


# `comet-ray train` options for runs that take seconds on a CPU: a random-init MobileNetV2 at 64 px
# and a 32-wide head. For tests of plumbing, not of detection quality.
TINY_TRAIN_ARGS: list[str] = [
    "--backbone",
    "mobilenet_v2",
    "--no-pretrained",
    "--image-size",
    "64",
    "--feature-dim",
    "32",
    "--epochs",
    "2",
    "--passes",
    "1",
    "--set",
    "discriminator_hidden=32",
    "--set",
    "noise_std=0.1",
    "--set",
    "inner_steps=1",
    "--set",
    "meta_tasks=2",
    "--device",
    "cpu",
]


def csv_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV file comet-ray wrote (predictions.csv, results.csv, ...), as dicts."""
    with open(Path(path), newline="") as handle:
        return list(csv.DictReader(handle))
