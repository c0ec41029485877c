"""The run folder: what ``train`` writes into ``--out`` and what ``report``, ``audit`` and ``evaluate`` read.

``write_run`` writes metrics.json, manifest.json, history.json, weights.json (:mod:`comet_ray.weights_file`),
config.json, scores.csv, model.pt (:mod:`comet_ray.checkpoint`) and tensorboard/ at once: staged beside the
folder and moved in when all are written, so a failed run leaves nothing half written. The readers of the
per-file formats live here too (``read_scores``; JSON files through :func:`comet_ray.jsonfile.read_run_file`).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from comet_ray import atomic, jsonfile
from comet_ray.atomic import orphaned_staging, owned_staging, publish_folder, recover_folder
from comet_ray.data.s3 import public_s3_uri
from comet_ray.errors import CometError
from comet_ray.jsonfile import read_run_file
from comet_ray.weights_file import weights_document

if TYPE_CHECKING:
    from comet_ray.config import TrainConfig
    from comet_ray.pipeline import RunResult
    from comet_ray.prepare import PreparedData


RUN_FILES = ("metrics.json", "manifest.json", "history.json", "weights.json", "config.json", "model.pt")


@dataclass
class RunDocuments:
    """The JSON documents of a run folder (what ``write_run`` wrote)."""

    metrics: dict
    manifest: dict
    history: list[dict]
    weights: dict | None  # None: the folder has no weights.json (unless it was required)
    config: dict


def read_documents(folder: str | os.PathLike, weights_required: bool = False) -> RunDocuments:
    """A local run folder's documents; one :class:`CometError` line when it is not one (no metrics.json, or no
    weights.json when ``weights_required``) or a file is unreadable. Older folders lack some: defaults."""
    folder = Path(folder)
    recover_folder(folder)  # a publish killed between its renames leaves the old folder aside
    metrics = read_run_file(folder / "metrics.json")
    if weights_required:
        weights = read_run_file(folder / "weights.json")
    else:
        weights = read_run_file(folder / "weights.json", {}) or None
    return RunDocuments(
        metrics,
        read_run_file(folder / "manifest.json", {}),
        read_run_file(folder / "history.json", []),
        weights,
        read_run_file(folder / "config.json", {}),
    )


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def held_out_ids(manifest: dict) -> list[str]:
    """Test images a run used (validation, or moved into training): never scored as unseen test images."""
    moved = [m["sample_id"] for m in manifest.get("contamination", {}).get("moved", [])]
    return sorted({*manifest.get("validation_ids", []), *moved})


def write_run(out: str, config: TrainConfig, data: PreparedData, result: RunResult) -> Path:
    """Write metrics.json, manifest.json, history.json, weights.json (see :mod:`comet_ray.weights_file`),
    config.json, scores.csv and model.pt into ``out`` at once.

    Files are staged in a temporary folder beside ``out`` and moved in only when all are written.
    """
    from comet_ray.checkpoint import save_detector

    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.staging-"
    for stale in orphaned_staging(target.parent, prefix):  # left by a killed process; a live writer's stays
        shutil.rmtree(stale, ignore_errors=True)
    staging = owned_staging(target.parent, prefix)
    try:
        config_dict = config.to_dict()
        config_dict.update(data_root=public_s3_uri(config.data_root), out=public_s3_uri(config.out))
        jsonfile.write(staging / "metrics.json", result.metrics, indent=2)
        jsonfile.write(staging / "manifest.json", data.manifest, indent=2)
        jsonfile.write(staging / "history.json", [e.to_dict() for e in result.epochs], indent=2)
        ids = list(result.final_weights)
        weights = weights_document(
            ids,
            list(result.final_weights.values()),
            data.injected_ids,
            None if result.weight_history is None else result.weight_history.numpy(),
            result.train_scores or None,
            result.train_score_description,
        )
        jsonfile.write(staging / "weights.json", weights, indent=2)
        jsonfile.write(staging / "config.json", config_dict, indent=2)
        save_detector(
            staging / "model.pt",
            result.model,
            data.feature_info,
            data.grid,
            config_dict,
            result.threshold,
            result.nominal_score,
            extra={
                "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))},
                "held_out_ids": held_out_ids(data.manifest),
            },  # evaluate needs them without manifest.json
            pixel_threshold=result.pixel_threshold,
        )
        write_scores(staging, data.report.store.ids, result.report_scores, data.report_labels)
        if result.epochs:
            write_tensorboard(staging / "tensorboard", result.epochs)
        publish_folder(staging, target)  # a rerun into the same folder replaces, e.g., tensorboard/
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --- scores.csv ------------------------------------------------------------------------------------


SCORES_FILE = "scores.csv"


def write_scores(
    out_dir: str | os.PathLike, ids: Sequence[str], scores: Iterable[float], labels: Iterable[bool | int]
) -> Path:
    """Write ``scores.csv`` (sample_id, score, label) of a run's report split, atomically.

    ``label`` is 1 for an anomalous image and 0 for a nominal one; the rows keep the order given.
    """
    scores = [float(s) for s in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    labels = [int(bool(v)) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    ids = list(ids)
    if not len(ids) == len(scores) == len(labels):
        raise ValueError(f"write_scores: {len(ids)} ids, {len(scores)} scores and {len(labels)} labels")
    target = Path(out_dir) / SCORES_FILE
    atomic.write_csv(
        target,
        ("sample_id", "score", "label"),
        ({"sample_id": i, "score": repr(s), "label": v} for i, s, v in zip(ids, scores, labels)),
    )
    return target


@dataclass
class ScoreTable:
    ids: list[str]
    scores: np.ndarray  # float64 [N]
    labels: np.ndarray  # bool [N]
    source: str  # "scores.csv" or "recomputed"


def read_scores(run_dir: str | os.PathLike) -> ScoreTable | None:
    """The run's ``scores.csv``, or None when it has none."""
    path = Path(run_dir) / SCORES_FILE
    if not path.exists():
        return None
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        ids = [r["sample_id"] for r in rows]
        scores = np.array([float(r["score"]) for r in rows], dtype=np.float64)
        labels = np.array([int(r["label"]) != 0 for r in rows], dtype=bool)
    except (KeyError, ValueError, TypeError) as exc:
        raise CometError(f"{path} is not a comet-ray scores file: {exc}") from None
    return ScoreTable(ids, scores, labels, SCORES_FILE)


# --- TensorBoard ----------------------------------------------------------------------------------


def _summary_writer(log_dir: str | os.PathLike):
    """tensorboardX's writer (installed with ray[tune]); torch's when the ``tensorboard`` package is there."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise CometError("TensorBoard logging needs the tensorboardX (or tensorboard) package") from None
    return SummaryWriter(str(log_dir))


_SCALARS = (
    ("loss", "train/loss"),
    ("lam", "comet/lambda"),
    ("det_sigma", "comet/det_sigma"),
    ("fence", "scl/fence"),
    ("mean_weight", "scl/mean_weight"),
    ("mean_weight_injected", "scl/mean_weight_injected"),
    ("mean_weight_nominal", "scl/mean_weight_nominal"),
    ("low_confidence", "scl/low_confidence"),
    ("meta_l_tr", "meta/l_tr"),
    ("meta_l_val", "meta/l_val"),
    ("seconds", "time/epoch_seconds"),
)


def _as_dict(epoch_log: Any) -> dict:
    return epoch_log.to_dict() if hasattr(epoch_log, "to_dict") else dict(epoch_log)


def _log_epoch(writer, entry: dict) -> None:
    step = int(entry.get("epoch", 0)) + 1
    for key, tag in _SCALARS:
        value = finite_number(entry.get(key))
        if value is not None:
            writer.add_scalar(tag, value, step)
    for key, value in (entry.get("extra") or {}).items():
        if finite_number(value) is not None:
            writer.add_scalar(f"extra/{key}", float(value), step)
    counts = entry.get("weight_histogram")
    if counts and sum(counts) > 0:
        # Counts over equal bins of [0, 1]; moments approximated at the bin centres.
        edges = np.linspace(0.0, 1.0, len(counts) + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        counts_np = np.asarray(counts, dtype=np.float64)
        writer.add_histogram_raw(
            "scl/weights",
            min=0.0,
            max=1.0,
            num=int(counts_np.sum()),
            sum=float((counts_np * centres).sum()),
            sum_squares=float((counts_np * centres**2).sum()),
            bucket_limits=edges[1:].tolist(),
            bucket_counts=counts_np.tolist(),
            global_step=step,
        )


def write_tensorboard(log_dir: str | os.PathLike, epoch_logs: Iterable[Any]) -> Path:
    """Write per-epoch scalars (loss, λ, det Σ, SCL weights, ...) of ``EpochLog`` objects or their dicts.

    ``epoch_logs`` may also be a single log. Step = epoch + 1. Safe to call once per epoch: each call adds
    an event file to ``log_dir``, which TensorBoard merges; :class:`TensorBoardLogger` (an
    ``on_epoch_end`` callback) keeps one file open instead.
    """
    if hasattr(epoch_logs, "to_dict") or isinstance(epoch_logs, dict):  # one epoch's log
        epoch_logs = [epoch_logs]
    writer = _summary_writer(log_dir)
    try:
        for epoch_log in epoch_logs:
            _log_epoch(writer, _as_dict(epoch_log))
    finally:
        writer.close()
    return Path(log_dir)


class TensorBoardLogger:
    """An ``on_epoch_end(trainer, epoch_log)`` callback writing to one TensorBoard event file."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.log_dir = Path(log_dir)
        self.writer = _summary_writer(log_dir)

    def __call__(self, _trainer: Any, epoch_log: Any) -> None:
        _log_epoch(self.writer, _as_dict(epoch_log))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
