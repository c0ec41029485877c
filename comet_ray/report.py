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
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from comet_ray import atomic
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
        return str(self.metrics.get("category") or self.manifest.get("category") or self.config.get("category") or "?")

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
            raise CometError(f"{path} is not a comet-ray run folder (no metrics.json in it or its subfolders)")
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
    record = RunRecord(path=path, metrics=docs.metrics, manifest=docs.manifest, history=docs.history,
                       weights=docs.weights, config=docs.config)
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
        return AnomalyModel(self._extractors[key], record.model.to(self.device), tuple(record.meta["grid"]),
                            checkpoint_precision(record.meta), record.meta)


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
    filesystem, table = access.samples(record.config.get("data_root") or record.manifest["data_root"], record.category)
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
        example.panel = map_panel(loaded.images[i], maps[i], record.threshold, nominal, score=example.score,
                                  title=example.sample_id.split("/", 2)[-1], mask=mask)


def worst_examples(scores: ScoreTable, count: int) -> dict[str, list[Example]]:
    """Highest-scoring nominal images and lowest-scoring anomalous images of the report split."""
    nominal = [i for i in np.argsort(-scores.scores, kind="mergesort") if not scores.labels[i]][:count]
    anomalous = [i for i in np.argsort(scores.scores, kind="mergesort") if scores.labels[i]][:count]
    def make(rows: list[int]) -> list[Example]:
        return [Example(scores.ids[i], float(scores.scores[i]), bool(scores.labels[i])) for i in rows]

    return {"false_positives": make(nominal), "false_negatives": make(anomalous)}


def collect_audit(record: RunRecord, recompute: bool, suspects: int, device: str, s3_endpoint: str | None) -> None:
    """The run's training-set audit and, when the data and model.pt are at hand, its top suspects' panels."""
    from comet_ray.audit import audit_from_documents, source_scan, suspect_panels

    if record.weights is None:
        return
    try:
        record.audit = audit_from_documents(str(record.path), record.weights, record.history, record.manifest,
                                            record.config, record.metrics)
    except CometError as exc:
        record.notes.append(f"no training-set audit: {exc}")
        return
    if not recompute or record.model is None or suspects <= 0:
        return
    try:
        source_scan(record.audit, s3_endpoint)
        with tempfile.TemporaryDirectory(prefix="comet-report-") as tmp:
            record.suspects = [(row, path.read_bytes()) for row, path in
                               suspect_panels(record.audit, record.path / "model.pt", suspects, tmp, device, s3_endpoint)]
    except CheckpointError:
        raise
    except CometError as exc:
        record.notes.append(f"no anomaly maps of the training-set suspects: {exc}")


def collect(run_dirs: Sequence[str | os.PathLike], device: str = "auto", s3_endpoint: str | None = None,
            recompute: bool = True, examples: int = 3, suspects: int = 6) -> list[RunRecord]:
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
                example_panels(record, access, record.examples["false_positives"] + record.examples["false_negatives"])
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
        row = {"strategy": strategy, "contamination": contamination, "seeds": sorted(r.seed for r in members),
               "runs": [str(r.path) for r in members]}
        for key, _ in TABLE_METRICS:
            row[key] = mean_std(r.metrics.get(key) for r in members)
        table.setdefault(category, []).append(row)
    return table


# --- HTML ----------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;max-width:1180px;
color:#1d2330;padding:0 16px;line-height:1.4}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;border-bottom:2px solid #d9dee8;padding-bottom:4px;margin-top:32px}
h3{font-size:16px;margin:18px 0 6px}.muted{color:#5d6677;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #d9dee8;padding:4px 9px;text-align:right}
th{background:#f1f4f9}td.l,th.l{text-align:left}.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.figs img{max-width:100%;border:1px solid #e3e7ee}.note{background:#fff6e0;border-left:4px solid #f0b429;padding:5px 10px;
font-size:13px;margin:6px 0}.run{border:1px solid #d9dee8;border-radius:6px;padding:4px 14px 12px;margin:14px 0}
summary{cursor:pointer;font-weight:600;font-size:15px;padding:6px 0}.examples{display:flex;gap:16px}
.col{flex:1 1 0;min-width:0}.col img{width:100%;display:block;margin:6px 0}
code{background:#f1f4f9;padding:1px 4px;border-radius:3px}
"""


def _img(data: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{html.escape(alt)}">'


def _fmt(stat: tuple[float | None, float | None, int], digits: int = 4) -> str:
    mean, std, _ = stat
    if mean is None:
        return "–"
    text = f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def _note(text: str) -> str:
    return f'<div class="note">{html.escape(text)}</div>'


def _metrics_html(summary: dict[str, list[dict]]) -> str:
    parts = []
    for category, rows in summary.items():
        parts.append(f"<h3>{html.escape(category)}</h3><table><tr><th class='l'>strategy</th><th>contamination</th>"
                     "<th>seeds</th>" + "".join(f"<th>{html.escape(label)}</th>" for _, label in TABLE_METRICS) + "</tr>")
        for row in rows:
            cells = [f"<td class='l'>{html.escape(row['strategy'])}</td>", f"<td>{row['contamination']:.0%}</td>",
                     f"<td>{html.escape(', '.join(map(str, row['seeds'])))}</td>"]
            for key, _ in TABLE_METRICS:
                cells.append(f"<td>{_fmt(row[key], 1 if key == 'train_seconds' else 4)}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append("<p class='muted'>mean ± sample standard deviation over the seeds listed; a single seed shows its value. "
                 "Metrics are on each run's report split (never used for training, threshold or tuning).</p>")
    return "".join(parts)


def _contamination_html(summary: dict[str, list[dict]]) -> str:
    from comet_ray.visualize import contamination_chart

    figures = []
    for category, rows in summary.items():
        if len({row["contamination"] for row in rows}) < 2:
            continue
        for key, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
            series: dict[str, list[tuple[float, float, float]]] = {}
            for row in rows:
                mean, std, _ = row[key]
                if mean is not None:
                    series.setdefault(row["strategy"], []).append((row["contamination"], mean, std or 0.0))
            if series:
                figures.append(_img(contamination_chart(series, label, f"{category}: {label} vs contamination"),
                                    f"{category} {label} vs contamination"))
    if not figures:
        return ""
    return "<h2>Contamination curve</h2><div class='figs'>" + "".join(figures) + "</div>"


def _roc_html(records: Sequence[RunRecord]) -> str:
    from comet_ray.visualize import roc_chart

    groups: dict[tuple[str, float], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.category, record.contamination), []).append(record)
    figures, notes = [], []
    for (category, contamination), members in sorted(groups.items()):
        curves = []
        for record in members:
            scores = record.scores
            if scores is None:
                continue
            if scores.labels.all() or not scores.labels.any():
                notes.append(f"{record.path}: the report split has a single class, no ROC curve")
                continue
            fpr, tpr = roc_curve(scores.scores, scores.labels)
            curve = {"fpr": fpr, "tpr": tpr, "label": f"{record.label} (AUROC {auroc(scores.scores, scores.labels):.3f})"}
            if record.threshold is not None:  # the checkpoint's operating point
                flagged = scores.scores >= record.threshold
                curve["point"] = (float(flagged[~scores.labels].mean()), float(flagged[scores.labels].mean()))
            curves.append(curve)
        if curves:
            figures.append(_img(roc_chart(curves, f"{category}, contamination {contamination:.0%}: report split"),
                                f"ROC {category} {contamination:.0%}"))
    if not figures and not notes:
        return "<h2>ROC curves</h2>" + _note("no run has report-split scores (scores.csv or a reachable data root)")
    sources = sorted({r.scores.source for r in records if r.scores is not None})
    return ("<h2>ROC curves</h2><div class='figs'>" + "".join(figures) + "</div>" + "".join(_note(n) for n in notes)
            + f"<p class='muted'>Report-split image scores from {html.escape(', '.join(sources))}; "
            "dots: each checkpoint's decision threshold (F1-optimal on the validation split).</p>")


def _examples_html(record: RunRecord) -> str:
    """Worst false positives and false negatives side by side, each with its anomaly-map panels."""
    if not record.examples:
        return ""
    threshold = record.threshold
    titles = {
        "false_positives": ("Worst false positives", "highest-scoring nominal images"),
        "false_negatives": ("Worst false negatives", "lowest-scoring anomalous images"),
    }
    columns = []
    for key, (title, what) in titles.items():
        items = record.examples.get(key, [])
        if not items:
            continue
        parts = [f"<div class='col'><h3>{title}</h3><p class='muted'>{what}"]
        if threshold is not None:
            wrong = sum((e.score >= threshold) != e.label for e in items)
            parts.append(f"; {wrong} of these {len(items)} misclassified at the threshold {threshold:.4g}")
        parts.append("</p>")
        parts.extend(_img(e.panel, e.sample_id) for e in items if e.panel)
        listed = [e for e in items if not e.panel]
        if listed:
            parts.append("<table><tr><th class='l'>image</th><th>score</th></tr>" + "".join(
                f"<tr><td class='l'>{html.escape(e.sample_id)}</td><td>{e.score:.4g}</td></tr>" for e in listed)
                + "</table>")
        columns.append("".join(parts) + "</div>")
    note = ("<p class='muted'>Panels: the center crop the model saw | anomaly map (colour scale: median nominal "
            "validation score → threshold at the middle of the bar) | regions where the map reaches the threshold "
            "(red) and the ground truth (green, dashed). The map is blurred (Gaussian σ 4), so a single hot patch "
            "can lift the image score above the threshold while no map region reaches it; a red circle then marks "
            "the map's peak.</p>")
    return "<div class='examples'>" + "".join(columns) + "</div>" + note


def _audit_html(record: RunRecord) -> str:
    """The training-set audit: summary, weight trajectories, top suspects with their maps."""
    from comet_ray.audit import trajectory_chart

    audit = record.audit
    if audit is None:
        return ""
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in audit.summary_lines())
    parts = ["<h3>Training-set audit</h3>", f"<ul class='muted'>{lines}</ul>",
             "<div class='figs'>" + _img(trajectory_chart(audit), "SCL weight per epoch") + "</div>"]
    if record.suspects:
        parts.append("<p class='muted'>Top suspects (lowest final weight, then highest score), drawn as "
                     "<code>predict --maps</code> draws them:</p><div class='figs'>")
        for row, panel in record.suspects:
            injected = " · injected" if row["injected"] == 1 else ""
            caption = f"#{row['rank']} {row['sample_id']} · weight {row['weight']:.3f}{injected}"
            parts.append(f"<figure style='margin:0;max-width:49%'>{_img(panel, row['sample_id'])}"
                         f"<figcaption class='muted'>{html.escape(caption)}</figcaption></figure>")
        parts.append("</div>")
    rows = audit.rows()[:10]
    parts.append("<table><tr><th>rank</th><th class='l'>training image</th><th>weight</th><th>score</th>"
                 "<th>below 1 since epoch</th>" + ("<th>injected</th>" if audit.injected_known else "") + "</tr>")
    for row in rows:
        since = "–" if row["first_below_one"] is None else str(row["first_below_one"])
        score = "–" if row["score"] is None else f"{row['score']:.4g}"
        parts.append(f"<tr><td>{row['rank']}</td><td class='l'>{html.escape(row['sample_id'])}</td>"
                     f"<td>{row['weight']:.3f}</td><td>{score}</td><td>{since}</td>"
                     + (f"<td>{'yes' if row['injected'] == 1 else 'no'}</td>" if audit.injected_known else "")
                     + "</tr>")
    parts.append("</table><p class='muted'><code>comet-ray audit RUN</code> writes every image's row "
                 "(audit.csv), the panels, and with <code>--export-clean</code> the set without the flagged images.</p>")
    return "".join(parts)


def _run_html(record: RunRecord, open_: bool) -> str:
    from comet_ray.visualize import history_chart, weight_histogram_chart

    metrics = record.metrics
    title = (f"{record.category} · {record.strategy} · contamination {record.contamination:.0%} · seed {record.seed}")
    summary = (
        f"<p class='muted'><code>{html.escape(str(record.path))}</code> — image AUROC "
        f"{_fmt(mean_std([metrics.get('image_auroc')]))}, pixel AUROC {_fmt(mean_std([metrics.get('pixel_auroc')]))}, "
        + html.escape(f"{metrics.get('n_train', '?')} train / {metrics.get('n_test', '?')} report images, "
                      f"{metrics.get('epochs', len(record.history))} epochs") + "</p>"
    )
    head = [f"<details class='run'{' open' if open_ else ''}><summary>{html.escape(title)}</summary>", summary]
    figures = []
    weights = (record.weights or {}).get("weights")
    if weights:
        injected_ids = set((record.weights or {}).get("injected", []))
        nominal = [float(w) for i, w in weights.items() if i not in injected_ids]
        injected = [float(w) for i, w in weights.items() if i in injected_ids]
        figures.append(_img(weight_histogram_chart(nominal, injected, f"SCL weights after the last epoch ({record.strategy})"),
                            "SCL weight histogram"))
    else:
        record.notes.append("no weights.json: no weight histogram")
    if record.history:
        figures.append(_img(history_chart(record.history), "lambda and det Sigma over epochs"))
    else:
        record.notes.append("no history.json entries: no λ(Σ) / det Σ chart")
    body = "<div class='figs'>" + "".join(figures) + "</div>" + _examples_html(record) + _audit_html(record)
    notes = "".join(_note(n) for n in dict.fromkeys(record.notes))
    return "".join(head) + body + notes + "</details>"


def render_html(records: Sequence[RunRecord]) -> str:
    """The whole report page as one string (every picture inlined)."""
    from comet_ray import __version__

    summary = summarise(records)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    categories = ", ".join(summary)
    runs = "".join(_run_html(r, open_=len(records) <= 6) for r in records)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>comet-ray report: {html.escape(categories)}</title><style>{_CSS}</style></head><body>"
        f"<h1>comet-ray report</h1><p class='muted'>{len(records)} run(s) · {html.escape(categories)} · generated {now} by comet-ray {html.escape(__version__)}</p>"
        "<h2>Metrics</h2>" + _metrics_html(summary) + _contamination_html(summary) + _roc_html(records)
        + "<h2>Runs</h2>" + runs + "</body></html>"
    )


def build_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike = "report.html", device: str = "auto",
                 s3_endpoint: str | None = None, recompute: bool = True, examples: int = 3,
                 suspects: int = 6) -> Path:
    """Collect the runs and write the self-contained HTML report atomically; returns its path."""
    records = collect(run_dirs, device, s3_endpoint, recompute, examples, suspects)
    page = render_html(records)
    return atomic.write_text(out, page)




