"""Per-epoch checkpoints, in one place: what a trainer needs to continue after its last finished epoch.

:func:`save_epoch_state` / :func:`load_epoch_state` write and read one folder (``trainer_state.pt``, the
trainer's whole CoMet state, and ``history.json``, the epoch logs so far): a Ray Train checkpoint
(``distributed/train.py``), a Tune trial's checkpoint (``distributed/tune/trial.py``) and the plain resume
folder below are all such folders.

Resuming an in-process ``comet-ray train`` whose process was killed: per-epoch state in the run folder.

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
from pathlib import Path
from typing import Any

import torch

from comet_ray import atomic
from comet_ray.checkpoint import atomic_torch_save
from comet_ray.comet.trainer import EpochLog

log = logging.getLogger(__name__)

RESUME_DIR = ".resume"
STATE_FILE = "trainer_state.pt"
HISTORY_FILE = "history.json"


def save_epoch_state(folder: str | os.PathLike, trainer_state: dict, history: Any = None) -> None:
    """``history`` (any JSON; None: none) first, then the trainer state, each written atomically."""
    folder = Path(folder)
    if history is not None:
        atomic.write_text(folder / HISTORY_FILE, json.dumps(history))
    atomic_torch_save(trainer_state, folder / STATE_FILE)


def load_epoch_state(folder: str | os.PathLike) -> tuple[dict | None, Any]:
    """``(trainer state, history)`` saved in ``folder``; None for a part that is not there."""
    folder = Path(folder)
    state_file, history_file = folder / STATE_FILE, folder / HISTORY_FILE
    state = torch.load(state_file, map_location="cpu", weights_only=True) if state_file.exists() else None
    history = json.loads(history_file.read_text()) if history_file.exists() else None
    return state, history


def run_fingerprint(config: dict, train_ids: list[str], feature_info: dict) -> str:
    """What must match for saved state to be resumable: every knob, the training images, the features."""
    config = {k: v for k, v in config.items() if k != "out"}
    payload = json.dumps(
        {"config": config, "train": train_ids, "features": feature_info}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class EpochResume:
    """Save after each epoch, load on start, clear at the end (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, fingerprint: str) -> None:
        self.path = Path(out) / RESUME_DIR
        self.fingerprint = fingerprint

    def load(self) -> tuple[dict | None, list[EpochLog]]:
        """``(trainer state, earlier epoch logs)`` of a matching interrupted run, else ``(None, [])``."""
        atomic.recover_folder(self.path.parent)  # a publish killed between its renames
        state_file, history_file = self.path / STATE_FILE, self.path / HISTORY_FILE
        if not (state_file.exists() and history_file.exists()):
            return None, []
        try:
            saved = json.loads(history_file.read_text())
            if saved.get("fingerprint") != self.fingerprint:
                log.warning(
                    "%s holds state of a different configuration or dataset; starting from epoch 0", self.path
                )
                return None, []
            state, _ = load_epoch_state(self.path)
            logs = [EpochLog(**record) for record in saved["epochs"]]
            epoch = int(state["epoch"])  # a state without it (or not a dict) is malformed: start fresh
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            RuntimeError,
            EOFError,
            pickle.UnpicklingError,
        ) as exc:
            log.warning("cannot resume from %s (%r); starting from epoch 0", self.path, exc)
            return None, []
        if epoch > len(logs):  # cannot happen with save()'s order; refuse rather than guess
            return None, []
        return state, logs[:epoch]  # a kill between the two writes leaves one log too many

    def save(self, trainer_state: dict, logs: list[EpochLog]) -> None:
        """The log first, then the state: a kill in between leaves one log too many, which ``load`` drops."""
        record = {"fingerprint": self.fingerprint, "epochs": [e.to_dict() for e in logs]}
        save_epoch_state(self.path, trainer_state, record)

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
