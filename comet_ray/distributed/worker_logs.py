"""What Ray Train workers print: one line per event from the worker (``say``), and at the default
verbosity none of Ray's or botocore's per-worker chatter (``--verbose`` brings it back)."""

from __future__ import annotations

import logging
import os
import sys


def verbose_logs() -> bool:
    """Did the driver ask for debug logging (``comet-ray --verbose``: the root logger at DEBUG)?"""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def quiet_worker_logs(verbose: bool) -> None:
    """In a worker, at the default verbosity: no botocore "Found credentials in ..." notice per process, and
    no raw ``TrainingReport(...)`` line per report (Ray Train's other INFO lines are filtered by
    ``RunConfig(logging_config=...)``, see :func:`fit_distributed`). ``--verbose`` keeps them all.

    Ray 2.60 workaround: the module that logs each report names its logger by its file path, not
    ``ray.train.*``, so Ray's own log-level filter misses it; it is found by that path's ending."""
    level = logging.DEBUG if verbose else logging.WARNING
    logging.getLogger("botocore.credentials").setLevel(level)
    for name in list(logging.root.manager.loggerDict):
        if name.replace(os.sep, "/").endswith("ray/train/v2/_internal/execution/context.py"):
            logging.getLogger(name).setLevel(level)


def say(line: str) -> None:
    """One line on the worker's stdout (and so the driver's console). Not ``print``: Ray Train patches a
    worker's ``print`` to go both to stdout and to the root logger's console handler, which shows it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def say_feature_origin(data, who: str) -> None:
    """One line in the worker's output (and its node's logs): did this process extract or read the features?"""
    if data.feature_origin:
        say(f"[{who}] features: {data.feature_origin}")
