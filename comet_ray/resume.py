"""Resuming an in-process ``comet-ray train`` whose process was killed: per-epoch state in the run folder.

Ray Train runs resume from Ray's own checkpoints; a training on a bare GPU box (no Ray) gets the same
promise here: after every epoch the trainer state and the epoch log are written atomically to
``OUT/.resume/``, and the same command run again continues from the last finished epoch instead of
epoch 0. The state is keyed by a fingerprint of the configuration and the training set, so a changed
command (other knobs, other data) starts fresh rather than resuming something else. The folder is
removed once the run's results are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from comet_ray.checkpoint import atomic_torch_save
from comet_ray.comet.trainer import EpochLog

log = logging.getLogger(__name__)

RESUME_DIR = ".resume"
STATE_FILE = "trainer_state.pt"
HISTORY_FILE = "history.json"


def run_fingerprint(config: dict, train_ids: list[str], feature_info: dict) -> str:
    """What must match for saved state to be resumable: every knob, the training images, the features."""
    config = {k: v for k, v in config.items() if k != "out"}
    payload = json.dumps({"config": config, "train": train_ids, "features": feature_info}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class EpochResume:
    """Save after each epoch, load on start, clear at the end (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, fingerprint: str) -> None:
        self.path = Path(out) / RESUME_DIR
        self.fingerprint = fingerprint

    def load(self) -> tuple[dict | None, list[EpochLog]]:
        """``(trainer state, earlier epoch logs)`` of a matching interrupted run, else ``(None, [])``."""
        state_file, history_file = self.path / STATE_FILE, self.path / HISTORY_FILE
        if not (state_file.exists() and history_file.exists()):
            return None, []
        try:
            saved = json.loads(history_file.read_text())
            if saved.get("fingerprint") != self.fingerprint:
                log.warning("%s holds state of a different configuration or dataset; starting from epoch 0",
                            self.path)
                return None, []
            state = torch.load(state_file, map_location="cpu", weights_only=True)
            logs = [EpochLog(**record) for record in saved["epochs"]]
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            log.warning("cannot resume from %s (%s); starting from epoch 0", self.path, exc)
            return None, []
        epoch = int(state["epoch"])
        if epoch > len(logs):  # cannot happen with save()'s order; refuse rather than guess
            return None, []
        return state, logs[:epoch]  # a kill between the two writes leaves one log too many

    def save(self, trainer_state: dict, logs: list[EpochLog]) -> None:
        """The log first, then the state: a kill in between leaves one log too many, which ``load`` drops."""
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"fingerprint": self.fingerprint, "epochs": [e.to_dict() for e in logs]}
        fd, tmp = tempfile.mkstemp(prefix=f".{HISTORY_FILE}.", suffix=".tmp", dir=self.path)
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        os.replace(tmp, self.path / HISTORY_FILE)
        atomic_torch_save(trainer_state, self.path / STATE_FILE)

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
