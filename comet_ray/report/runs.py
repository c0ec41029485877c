"""The runs a report shows: run folders loaded, scores recomputed where a run has none, examples and
the audit collected, and runs aggregated over seeds."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from comet_ray.errors import CheckpointError, CometError
from comet_ray.metrics import auroc
from comet_ray.runfolder import ScoreTable, finite_number, read_documents, read_scores

TABLE_METRICS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO@0.3"),
    ("f1_at_threshold", "F1 at validation threshold"),
    ("f1_max", "F1-max (oracle threshold)"),
    ("mean_weight_injected", "mean w injected"),
    ("mean_weight_nominal", "mean w nominal"),
    ("train_seconds", "train s"),
)


# --- scores.csv ----------------------------------------------------------------------------------


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1); ties move both at once."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(ranked))[0], ranked.size - 1] if ranked.size else np.zeros(0, dtype=int)
    true_pos = np.cumsum(hits)[last]
    false_pos = last + 1 - true_pos
    positives, negatives = max(int(hits.sum()), 1), max(int((~hits).sum()), 1)
    return np.r_[0.0, false_pos / negatives], np.r_[0.0, true_pos / positives]


# --- loading runs --------------------------------------------------------------------------------


@dataclass
class Example:
    sample_id: str
    score: float
    label: bool
    panel: bytes | None = None


@dataclass
class RunRecord:
    path: Path
    metrics: dict
    manifest: dict
    history: list[dict]
    weights: dict | None
    config: dict
    meta: dict | None = None
    model: Any = None
    scores: ScoreTable | None = None
    examples: dict[str, list[Example]] = field(default_factory=dict)
    audit: Any = None  # comet_ray.audit.TrainingAudit, for runs that recorded per-epoch weights
    suspects: list[tuple[dict, bytes]] = field(default_factory=list)  # (audit.csv row, panel PNG)
    notes: list[str] = field(default_factory=list)

    @property
    def category(self) -> str:
        return str(
            self.metrics.get("category")
            or self.manifest.get("category")
            or self.config.get("category")
            or "?"
        )

    @property
    def strategy(self) -> str:
        return str(self.metrics.get("strategy") or self.config.get("comet", {}).get("strategy") or "?")

    @property
    def contamination(self) -> float:
        return float(self.metrics.get("contamination", self.config.get("contamination", 0.0)) or 0.0)

    @property
    def seed(self) -> int:
        return int(self.metrics.get("seed", self.config.get("seed", 0)) or 0)

    @property
    def label(self) -> str:
        return f"{self.strategy} · seed {self.seed}"

    @property
    def threshold(self) -> float | None:
        return None if self.meta is None else float(self.meta["threshold"])


def expand_run_dirs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Run folders (holding metrics.json), or folders whose direct subfolders are run folders."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if not path.is_dir():
            raise CometError(f"run folder not found: {path}")
        if (path / "metrics.json").exists():
            found.append(path)
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and (p / "metrics.json").exists())
        if not children:
            raise CometError(
                f"{path} is not a comet-ray run folder (no metrics.json in it or its subfolders)"
            )
        found.extend(children)
    unique: list[Path] = []
    for path in found:
        if path.resolve() not in {p.resolve() for p in unique}:
            unique.append(path)
    return unique


def load_run(run_dir: str | os.PathLike) -> RunRecord:
    """Read a run folder's JSON files, its checkpoint (when present) and its scores.csv (when present)."""
    from comet_ray.checkpoint import load_detector

    path = Path(run_dir)
    docs = read_documents(path)
    record = RunRecord(
        path=path,
        metrics=docs.metrics,
        manifest=docs.manifest,
        history=docs.history,
        weights=docs.weights,
        config=docs.config,
    )
    if (path / "model.pt").exists():
        try:
            record.model, record.meta = load_detector(path / "model.pt", "cpu")
        except CheckpointError as exc:
            raise CheckpointError(f"run {path}: {exc}") from None
    else:
        record.notes.append("no model.pt: ROC needs scores.csv; no anomaly maps")
    record.scores = read_scores(path)
    return record


# --- recomputing from the data -------------------------------------------------------------------


class _DataAccess:
    """Sample tables, feature extractors and a device, shared by every run of one report."""

    def __init__(self, device: str, s3_endpoint: str | None) -> None:
        from comet_ray.config import resolve_device

        self.device = resolve_device(device)
        self.s3_endpoint = s3_endpoint
        self._tables: dict[tuple[str, str], tuple[Any, dict]] = {}
        self._extractors: dict[str, Any] = {}

    def samples(self, data_root: str, category: str) -> tuple[Any, dict]:
        from comet_ray.data.layout import build_sample_table, open_dataset_filesystem

        key = (data_root, category)
        if key not in self._tables:
            filesystem, _ = open_dataset_filesystem(data_root, self.s3_endpoint)
            table = build_sample_table(data_root, category, filesystem)
            self._tables[key] = (filesystem, {s.sample_id: s for s in table})
        return self._tables[key]

    def model(self, record: RunRecord):
        """The run's :class:`~comet_ray.model.AnomalyModel` (extractors shared by runs that share features)."""
        from comet_ray.evaluate import checkpoint_precision
        from comet_ray.model import AnomalyModel, extractor_for

        key = json.dumps(record.meta["features"], sort_keys=True)
        if key not in self._extractors:
            self._extractors[key] = extractor_for(record.meta, self.device)
        return AnomalyModel(
            self._extractors[key],
            record.model.to(self.device),
            tuple(record.meta["grid"]),
            checkpoint_precision(record.meta),
            record.meta,
        )


def _report_samples(record: RunRecord, access: _DataAccess):
    data_root = record.config.get("data_root") or record.manifest.get("data_root")
    if not data_root:
        raise CometError("config.json names no data root")
    filesystem, table = access.samples(data_root, record.category)
    wanted = record.manifest.get("report_ids") or []
    samples = [table[i] for i in wanted if i in table]
    missing = len(wanted) - len(samples)
    return filesystem, samples, missing


def recompute_scores(record: RunRecord, access: _DataAccess) -> ScoreTable:
    """Report-split image scores from model.pt + manifest, computed as ``comet-ray evaluate`` does."""
    from comet_ray.evaluate import score_patches
    from comet_ray.features.extractor import extract_features
    from comet_ray.models.anomaly_map import image_scores

    filesystem, samples, missing = _report_samples(record, access)
    if missing:
        record.notes.append(f"{missing} report image(s) of the manifest are no longer in the data root")
    if not samples:
        raise CometError("none of the manifest's report images is in the data root")
    model = access.model(record)
    extracted = extract_features(samples, model.extractor, filesystem, with_masks=False)
    patch = score_patches(model.detector, extracted.store, access.device, precision=model.precision)
    scores = image_scores(patch).cpu()
    by_id = {s.sample_id: s for s in samples}
    ids = list(extracted.store.ids)
    labels = np.array([by_id[i].is_anomalous for i in ids], dtype=bool)
    return ScoreTable(ids, scores.double().numpy(), labels, "recomputed")


def example_panels(record: RunRecord, access: _DataAccess, examples: list[Example]) -> None:
    """Fill ``panel`` of each example: image | anomaly map | region, ground truth outlined."""
    from comet_ray.data.images import load_samples
    from comet_ray.visualize import map_panel

    if not examples:
        return
    filesystem, table = access.samples(
        record.config.get("data_root") or record.manifest["data_root"], record.category
    )
    samples = [table[e.sample_id] for e in examples if e.sample_id in table]
    model = access.model(record)
    loaded = load_samples(samples, model.image_size, filesystem, with_masks=True)
    if not loaded.sample_ids:
        return
    _, maps = model(loaded.images)  # the path of predict and evaluate, so the panel's map matches the table
    nominal = float(record.meta["nominal_score"])
    position = {sample_id: i for i, sample_id in enumerate(loaded.sample_ids)}
    for example in examples:
        if example.sample_id not in position:
            continue
        i = position[example.sample_id]
        mask = loaded.masks[i] if loaded.masks is not None and bool(loaded.mask_available[i]) else None
        example.panel = map_panel(
            loaded.images[i],
            maps[i],
            record.threshold,
            nominal,
            score=example.score,
            title=example.sample_id.split("/", 2)[-1],
            mask=mask,
        )


def worst_examples(scores: ScoreTable, count: int) -> dict[str, list[Example]]:
    """Highest-scoring nominal images and lowest-scoring anomalous images of the report split."""
    nominal = [i for i in np.argsort(-scores.scores, kind="mergesort") if not scores.labels[i]][:count]
    anomalous = [i for i in np.argsort(scores.scores, kind="mergesort") if scores.labels[i]][:count]

    def make(rows: list[int]) -> list[Example]:
        return [Example(scores.ids[i], float(scores.scores[i]), bool(scores.labels[i])) for i in rows]

    return {"false_positives": make(nominal), "false_negatives": make(anomalous)}


def collect_audit(
    record: RunRecord, recompute: bool, suspects: int, device: str, s3_endpoint: str | None
) -> None:
    """The run's training-set audit and, when the data and model.pt are at hand, its top suspects' panels."""
    from comet_ray.audit import audit_from_documents, source_scan, suspect_panels

    if record.weights is None:
        return
    try:
        record.audit = audit_from_documents(
            str(record.path), record.weights, record.history, record.manifest, record.config, record.metrics
        )
    except CometError as exc:
        record.notes.append(f"no training-set audit: {exc}")
        return
    if not recompute or record.model is None or suspects <= 0:
        return
    try:
        source_scan(record.audit, s3_endpoint)
        with tempfile.TemporaryDirectory(prefix="comet-report-") as tmp:
            record.suspects = [
                (row, path.read_bytes())
                for row, path in suspect_panels(
                    record.audit, record.path / "model.pt", suspects, tmp, device, s3_endpoint
                )
            ]
    except CheckpointError:
        raise
    except CometError as exc:
        record.notes.append(f"no anomaly maps of the training-set suspects: {exc}")


def collect(
    run_dirs: Sequence[str | os.PathLike],
    device: str = "auto",
    s3_endpoint: str | None = None,
    recompute: bool = True,
    examples: int = 3,
    suspects: int = 6,
) -> list[RunRecord]:
    """Load every run and gather the scores, example maps and training-set audit its report needs."""
    records = [load_run(p) for p in expand_run_dirs(run_dirs)]
    access = _DataAccess(device, s3_endpoint) if recompute else None
    for record in records:
        collect_audit(record, access is not None, suspects, device, s3_endpoint)
        if access is None or record.model is None:
            if record.scores is None:
                record.notes.append("no scores.csv and recomputation is off or impossible: no ROC curve")
            elif examples:
                record.notes.append("anomaly maps of the worst images need the data root and model.pt")
            if record.scores is not None and examples:
                record.examples = worst_examples(record.scores, examples)
            continue
        try:
            if record.scores is None:
                record.scores = recompute_scores(record, access)
                _check_recomputed(record)
            if examples:
                record.examples = worst_examples(record.scores, examples)
                example_panels(
                    record, access, record.examples["false_positives"] + record.examples["false_negatives"]
                )
        except CheckpointError:
            raise
        except CometError as exc:  # data root unreachable, layout changed, backbone weights missing
            what = "ROC curve and anomaly maps" if record.scores is None else "anomaly maps"
            record.notes.append(f"no {what}: {exc}")
            if record.scores is not None and examples and not record.examples:
                record.examples = worst_examples(record.scores, examples)
    return records


def _check_recomputed(record: RunRecord) -> None:
    expected = record.metrics.get("image_auroc")
    scores = record.scores
    if expected is None or not isinstance(expected, (int, float)) or not math.isfinite(expected):
        return
    if scores.labels.all() or not scores.labels.any():
        return
    got = auroc(scores.scores, scores.labels)
    if abs(got - float(expected)) > 1e-3:
        record.notes.append(
            f"recomputed image AUROC {got:.4f} differs from metrics.json's {float(expected):.4f}: "
            "the data or the backbone weights changed since training"
        )


# --- aggregation ---------------------------------------------------------------------------------


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (ddof 1; None for one value) of the finite numbers given."""
    numbers = [v for v in (finite_number(x) for x in values) if v is not None]
    if not numbers:
        return None, None, 0
    mean = sum(numbers) / len(numbers)
    if len(numbers) < 2:
        return mean, None, 1
    var = sum((v - mean) ** 2 for v in numbers) / (len(numbers) - 1)
    return mean, math.sqrt(var), len(numbers)


def summarise(records: Sequence[RunRecord]) -> dict[str, list[dict]]:
    """Per category, one row per (strategy, contamination): mean/std of each table metric over seeds."""
    groups: dict[tuple[str, str, float], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.category, record.strategy, record.contamination), []).append(record)
    table: dict[str, list[dict]] = {}
    for (category, strategy, contamination), members in sorted(groups.items()):
        row = {
            "strategy": strategy,
            "contamination": contamination,
            "seeds": sorted(r.seed for r in members),
            "runs": [str(r.path) for r in members],
        }
        for key, _ in TABLE_METRICS:
            row[key] = mean_std(r.metrics.get(key) for r in members)
        table.setdefault(category, []).append(row)
    return table
