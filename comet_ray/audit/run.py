"""A run's training-set audit: the run folder's weights and scores as a :class:`TrainingAudit`, the
training images found again, the gallery and the weight trajectories."""

from __future__ import annotations

import csv
import math
import os
import posixpath
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from comet_ray import atomic
from comet_ray.audit.ranking import audit_metrics, first_below_one, flagged_mask, rank_order
from comet_ray.config import CometConfig
from comet_ray.errors import CometError
from comet_ray.runfolder import read_documents
from comet_ray.weights_file import TrainingWeights, read_training_weights

GALLERY_DIR = "gallery"
TRAJECTORY_FILE = "weights_trajectory.png"


@dataclass
class TrainingAudit:
    """A run's training images ranked, with what the audit says about them."""

    run: str
    category: str
    strategy: str
    data_root: str
    weights: TrainingWeights
    order: np.ndarray  # row indices, most suspect first
    first_below: list[int | None]
    fence: float | None  # the last epoch's fence on the SCL scores
    metrics: dict
    contamination: dict  # the run manifest's contamination section
    uses_scl: bool
    paths: dict[str, str] = field(default_factory=dict)  # sample_id -> image uri (when the data is reachable)
    notes: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return self.weights.ids

    @property
    def injected_known(self) -> bool:
        """Whether the run put known anomalies into its training set (an experiment)."""
        return bool(self.weights.injected)

    def rows(self) -> list[dict]:
        """``audit.csv``'s rows, most suspect first."""
        w = self.weights
        rows = []
        for rank, i in enumerate(self.order, start=1):
            sample_id = w.ids[i]
            score = None if w.scores is None or not math.isfinite(w.scores[i]) else float(w.scores[i])
            rows.append(
                {
                    "rank": rank,
                    "sample_id": sample_id,
                    "path": self.paths.get(sample_id, ""),
                    "weight": float(w.final[i]),
                    "score": score,
                    "flagged": int(w.final[i] < 1),
                    "first_below_one": self.first_below[i],
                    "injected": int(sample_id in w.injected) if self.injected_known else "",
                }
            )
        return rows

    def summary_lines(self) -> list[str]:
        """What the command prints: counts, fence, weights; precision only where anomalies are known."""
        m = self.metrics
        n, flagged = m["n_images"], m["n_flagged"]
        epochs = self.weights.per_epoch.shape[0]
        lines = [
            (
                f"{n} training images of {self.category} ({self.strategy}, {epochs} epochs), ranked by final "
                "SCL weight, then final score"
            )
        ]
        if not self.uses_scl:
            lines.append(
                f"this run did not use SCL (strategy {self.strategy}): every weight is 1, nothing is "
                "flagged, and the ranking is by the final model's score alone"
            )
        elif flagged:
            fence = (
                f" (fence τ = {self.fence:.4g} on the last epoch's scores)" if self.fence is not None else ""
            )
            lines.append(
                f"{flagged} image(s) ({m['flagged_share']:.1%} of the training set) scored above SCL's "
                f"outlier fence{fence}, with weights {m['flagged_weight_min']:.3f}-"
                f"{m['flagged_weight_max']:.3f} (median {m['flagged_weight_median']:.3f})"
            )
        else:
            lines.append("no image scored above SCL's outlier fence: every final weight is 1")
        if self.injected_known:
            achieved = self.contamination.get("achieved_ratio")
            injected = f"{m['n_injected']} anomalies were injected"
            injected += f" ({achieved:.1%} of the training set)" if isinstance(achieved, (int, float)) else ""
            top = f"top-{m['k']} precision {m['precision_at_k']:.2f}"
            if self.uses_scl:
                lines.append(f"estimated contamination {m['flagged_share']:.1%}; {injected}")
                precision = "-" if m["precision"] is None else f"{m['precision']:.2f}"
                lines.append(
                    f"flagged: {m['n_flagged_injected']} of the {m['n_injected']} injected (recall "
                    f"{m['recall']:.2f}), precision {precision}; {top}"
                )
            else:
                lines.append(f"{injected}; ranked by score, {top}")
        elif self.uses_scl and flagged:
            lines.append(
                "the fence marks the images least typical of this set: the likeliest defects if any "
                "slipped in, but unusual is not defective; look at them before removing any"
            )
        return lines + self.notes


def audit_from_documents(
    run: str, weights_doc: dict, history: list[dict], manifest: dict, config: dict, metrics: dict
) -> TrainingAudit:
    """The audit of a run folder's JSON documents; an older folder without per-epoch weights is refused."""
    weights = read_training_weights(weights_doc)
    if not weights.ids:
        raise CometError(f"{run}: weights.json lists no training images")
    if weights.per_epoch is None or weights.scores is None:
        raise CometError(
            f"{run} was written by an older comet-ray: weights.json has no per-epoch weights and "
            "scores; train it again with this version to audit it"
        )
    value = history[-1].get("fence") if history else metrics.get("fence")  # knn + scl: no epochs, one fence
    fence = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    strategy = str(metrics.get("strategy") or config.get("comet", {}).get("strategy") or "comet")
    result = audit_metrics(weights.ids, weights.final, weights.scores, weights.injected)
    return TrainingAudit(
        run=run,
        category=str(metrics.get("category") or config.get("category") or manifest.get("category") or "?"),
        strategy=strategy,
        data_root=str(config.get("data_root") or manifest.get("data_root") or ""),
        weights=weights,
        order=rank_order(weights.final, weights.scores),
        first_below=first_below_one(weights.per_epoch),
        fence=fence,
        metrics=result,
        contamination=manifest.get("contamination") or {},
        uses_scl=CometConfig(strategy=strategy).uses_scl,
    )


def load_audit(folder: str | os.PathLike, shown: str | None = None) -> TrainingAudit:
    """The audit of a local run folder (``shown``: how to name it, e.g. its s3:// URI)."""
    folder = Path(folder)
    shown = shown or str(folder)
    if not folder.is_dir():
        raise CometError(f"run folder not found: {shown}")
    docs = read_documents(folder, weights_required=True)
    return audit_from_documents(shown, docs.weights, docs.history, docs.manifest, docs.config, docs.metrics)


# --- where the images are ------------------------------------------------------------------------


def category_folder(data_root: str, category: str, s3_endpoint: str | None = None):
    """``(filesystem, category folder path, uri prefix)`` of a dataset category, as the sample table sees it."""
    import pyarrow.fs as pafs

    from comet_ray.data.layout import open_dataset_filesystem

    fs, base = open_dataset_filesystem(data_root, s3_endpoint)
    folder = (
        base
        if fs.get_file_info(posixpath.join(base, "train")).type == pafs.FileType.Directory
        else posixpath.join(base, category)
    )
    prefix = "s3://" if data_root.startswith("s3://") else ""
    return fs, folder, prefix


def source_scan(audit: TrainingAudit, s3_endpoint: str | None = None):
    """The run's category as it is now at its data root (``CategoryScan``); fills ``audit.paths``."""
    from comet_ray.data.layout import open_dataset_filesystem, scan_category

    if not audit.data_root:
        raise CometError(f"{audit.run}: config.json names no data root")
    scan = scan_category(
        audit.data_root, audit.category, open_dataset_filesystem(audit.data_root, s3_endpoint)[0]
    )
    known = set(audit.ids)
    audit.paths = {s.sample_id: s.uri for s in scan.samples if s.sample_id in known}
    # Injected images were test images; the manifest names where they were when the run read them.
    for moved in audit.contamination.get("moved", []):
        if moved.get("sample_id") in known and moved["sample_id"] not in audit.paths:
            audit.paths[moved["sample_id"]] = moved.get("uri", "")
    return scan


# --- gallery and charts --------------------------------------------------------------------------


def suspect_panels(
    audit: TrainingAudit,
    checkpoint: str | os.PathLike,
    count: int,
    out_dir: str | os.PathLike,
    device: str = "auto",
    s3_endpoint: str | None = None,
) -> list[tuple[dict, Path]]:
    """The ``count`` top suspects' anomaly-map panels in ``out_dir`` as ``NN-<name>.png`` (rank first).

    Drawn by :func:`comet_ray.inference.predict_images` (the ``predict --maps`` code): the center crop
    the model saw, the anomaly map on the checkpoint's colour scale, and the region at its threshold.
    Returns ``(audit.csv row, panel path)`` for each image that could be read.
    """
    from comet_ray.inference import predict_images
    from comet_ray.visualize import map_file_names

    rows = [r for r in audit.rows()[: max(0, count)] if r["path"]]
    if not rows:
        return []
    paths = [r["path"] for r in rows]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".panels-", dir=out_dir) as tmp:
        predicted = predict_images(str(checkpoint), paths, device, s3_endpoint=s3_endpoint, maps_dir=tmp)
        errors = {p["path"]: p["error"] for p in predicted if p["error"]}
        written = []
        for row, name in zip(rows, map_file_names(paths)):
            panel = Path(tmp) / name
            if not panel.exists():
                audit.notes.append(
                    f"no panel for {row['sample_id']}: {errors.get(row['path'], 'not scored')}"
                )
                continue
            target = out_dir / f"{row['rank']:02d}-{name}"
            os.replace(panel, target)
            written.append((row, target))
    return written


def trajectory_chart(audit: TrainingAudit, limit: int = 200) -> bytes:
    """Each flagged image's weight per epoch against the band of the others (PNG bytes)."""
    from comet_ray.charts import weight_trajectory_chart

    w = audit.weights
    injected = w.injected_mask if audit.injected_known else None
    title = f"{audit.category} · {audit.strategy}: SCL weight per epoch"
    return weight_trajectory_chart(
        w.per_epoch, flagged_mask(w.final), injected, title, order=audit.order, limit=limit
    )


# --- writing the audit ---------------------------------------------------------------------------

CSV_FIELDS = ("rank", "sample_id", "path", "weight", "score", "flagged", "first_below_one", "injected")


def write_csv(rows: list[dict], target: Path) -> None:
    atomic.write_csv(
        target,
        CSV_FIELDS,
        (
            {
                k: ("" if row[k] is None else repr(row[k]) if isinstance(row[k], float) else row[k])
                for k in CSV_FIELDS
            }
            for row in rows
        ),
    )


def read_csv(path: str | os.PathLike) -> list[dict]:
    """``audit.csv`` back as rows with numbers parsed (empty cells become None)."""

    def number(text: str, cast):
        return cast(text) if text != "" else None

    with open(path, newline="") as handle:
        return [
            {
                "rank": int(row["rank"]),
                "sample_id": row["sample_id"],
                "path": row["path"],
                "weight": float(row["weight"]),
                "score": number(row["score"], float),
                "flagged": int(row["flagged"]),
                "first_below_one": number(row["first_below_one"], int),
                "injected": number(row["injected"], int),
            }
            for row in csv.DictReader(handle)
        ]
