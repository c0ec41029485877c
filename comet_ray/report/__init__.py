"""``comet-ray report``: one self-contained HTML page from one or more run folders, and TensorBoard logs.

The page (every picture inlined as a base64 PNG, no external file, script or font) holds:

* per category, a metrics table: mean ± sample std over the seeds of runs that share category,
  strategy and contamination;
* the contamination curve (image and pixel AUROC vs contamination, one line per strategy) when a
  category has runs at several contamination levels;
* ROC curves of the report split, one chart per category and contamination, one curve per run, with
  each checkpoint's operating point. Scores come from the run's ``scores.csv`` (see
  :func:`write_scores`) or, for runs without one, are recomputed exactly as ``comet-ray evaluate``
  does from ``model.pt`` + the run's manifest when the data root in ``config.json`` is reachable;
* per run: the final SCL weight histogram with injected anomalies marked (``weights.json``), λ(Σ),
  det Σ and loss over epochs (``history.json``), and the highest-scoring nominal and lowest-scoring
  anomalous report images with their anomaly maps (data root reachable);
* per run, the training-set audit (:mod:`comet_ray.audit`): how many training images SCL flagged,
  precision and recall against injected anomalies where the run injected some, the weight
  trajectories, and the top suspects with their anomaly maps.

Anything that cannot be shown is replaced by a one-line note saying why; a checkpoint from another
model or format version is an error (:class:`~comet_ray.errors.CheckpointError`), not a note.

Rooms: :mod:`.runs` (loading, recomputing, aggregating) and :mod:`.page` (the HTML page).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from comet_ray import atomic
from comet_ray.report.page import render_html
from comet_ray.report.runs import (
    RunRecord,
    collect,
    load_run,
    recompute_scores,
    roc_curve,
    summarise,
)

__all__ = [
    "TABLE_METRICS",
    "RunRecord",
    "build_report",
    "collect",
    "load_run",
    "recompute_scores",
    "render_html",
    "roc_curve",
    "summarise",
]


def build_report(
    run_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike = "report.html",
    device: str = "auto",
    s3_endpoint: str | None = None,
    recompute: bool = True,
    examples: int = 3,
    suspects: int = 6,
) -> Path:
    """Collect the runs and write the self-contained HTML report atomically; returns its path."""
    records = collect(run_dirs, device, s3_endpoint, recompute, examples, suspects)
    page = render_html(records)
    return atomic.write_text(out, page)
