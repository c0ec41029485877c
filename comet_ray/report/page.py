"""report.html: the collected runs as one self-contained page (every picture inlined)."""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Sequence

from comet_ray.metrics import auroc
from comet_ray.report.runs import TABLE_METRICS, RunRecord, mean_std, roc_curve, summarise

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
    return (
        f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{html.escape(alt)}">'
    )


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
        parts.append(
            f"<h3>{html.escape(category)}</h3><table><tr><th class='l'>strategy</th><th>contamination</th>"
            "<th>seeds</th>"
            + "".join(f"<th>{html.escape(label)}</th>" for _, label in TABLE_METRICS)
            + "</tr>"
        )
        for row in rows:
            cells = [
                f"<td class='l'>{html.escape(row['strategy'])}</td>",
                f"<td>{row['contamination']:.0%}</td>",
                f"<td>{html.escape(', '.join(map(str, row['seeds'])))}</td>",
            ]
            for key, _ in TABLE_METRICS:
                cells.append(f"<td>{_fmt(row[key], 1 if key == 'train_seconds' else 4)}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append(
        "<p class='muted'>mean ± sample standard deviation over the seeds listed; a single seed shows its value. "
        "Metrics are on each run's report split (never used for training, threshold or tuning).</p>"
    )
    return "".join(parts)


def _contamination_html(summary: dict[str, list[dict]]) -> str:
    from comet_ray.charts import contamination_chart

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
                figures.append(
                    _img(
                        contamination_chart(series, label, f"{category}: {label} vs contamination"),
                        f"{category} {label} vs contamination",
                    )
                )
    if not figures:
        return ""
    return "<h2>Contamination curve</h2><div class='figs'>" + "".join(figures) + "</div>"


def _roc_html(records: Sequence[RunRecord]) -> str:
    from comet_ray.charts import roc_chart

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
            curve = {
                "fpr": fpr,
                "tpr": tpr,
                "label": f"{record.label} (AUROC {auroc(scores.scores, scores.labels):.3f})",
            }
            if record.threshold is not None:  # the checkpoint's operating point
                flagged = scores.scores >= record.threshold
                curve["point"] = (float(flagged[~scores.labels].mean()), float(flagged[scores.labels].mean()))
            curves.append(curve)
        if curves:
            figures.append(
                _img(
                    roc_chart(curves, f"{category}, contamination {contamination:.0%}: report split"),
                    f"ROC {category} {contamination:.0%}",
                )
            )
    if not figures and not notes:
        return "<h2>ROC curves</h2>" + _note(
            "no run has report-split scores (scores.csv or a reachable data root)"
        )
    sources = sorted({r.scores.source for r in records if r.scores is not None})
    return (
        "<h2>ROC curves</h2><div class='figs'>"
        + "".join(figures)
        + "</div>"
        + "".join(_note(n) for n in notes)
        + f"<p class='muted'>Report-split image scores from {html.escape(', '.join(sources))}; "
        "dots: each checkpoint's decision threshold (F1-optimal on the validation split).</p>"
    )


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
            parts.append(
                "<table><tr><th class='l'>image</th><th>score</th></tr>"
                + "".join(
                    f"<tr><td class='l'>{html.escape(e.sample_id)}</td><td>{e.score:.4g}</td></tr>"
                    for e in listed
                )
                + "</table>"
            )
        columns.append("".join(parts) + "</div>")
    note = (
        "<p class='muted'>Panels: the center crop the model saw | anomaly map (colour scale: median nominal "
        "validation score → threshold at the middle of the bar) | regions where the map reaches the threshold "
        "(red) and the ground truth (green, dashed). The map is blurred (Gaussian σ 4), so a single hot patch "
        "can lift the image score above the threshold while no map region reaches it; a red circle then marks "
        "the map's peak.</p>"
    )
    return "<div class='examples'>" + "".join(columns) + "</div>" + note


def _audit_html(record: RunRecord) -> str:
    """The training-set audit: summary, weight trajectories, top suspects with their maps."""
    from comet_ray.audit import trajectory_chart

    audit = record.audit
    if audit is None:
        return ""
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in audit.summary_lines())
    parts = [
        "<h3>Training-set audit</h3>",
        f"<ul class='muted'>{lines}</ul>",
        "<div class='figs'>" + _img(trajectory_chart(audit), "SCL weight per epoch") + "</div>",
    ]
    if record.suspects:
        parts.append(
            "<p class='muted'>Top suspects (lowest final weight, then highest score), drawn as "
            "<code>predict --maps</code> draws them:</p><div class='figs'>"
        )
        for row, panel in record.suspects:
            injected = " · injected" if row["injected"] == 1 else ""
            caption = f"#{row['rank']} {row['sample_id']} · weight {row['weight']:.3f}{injected}"
            parts.append(
                f"<figure style='margin:0;max-width:49%'>{_img(panel, row['sample_id'])}"
                f"<figcaption class='muted'>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    rows = audit.rows()[:10]
    parts.append(
        "<table><tr><th>rank</th><th class='l'>training image</th><th>weight</th><th>score</th>"
        "<th>below 1 since epoch</th>" + ("<th>injected</th>" if audit.injected_known else "") + "</tr>"
    )
    for row in rows:
        since = "–" if row["first_below_one"] is None else str(row["first_below_one"])
        score = "–" if row["score"] is None else f"{row['score']:.4g}"
        parts.append(
            f"<tr><td>{row['rank']}</td><td class='l'>{html.escape(row['sample_id'])}</td>"
            f"<td>{row['weight']:.3f}</td><td>{score}</td><td>{since}</td>"
            + (f"<td>{'yes' if row['injected'] == 1 else 'no'}</td>" if audit.injected_known else "")
            + "</tr>"
        )
    parts.append(
        "</table><p class='muted'><code>comet-ray audit RUN</code> writes every image's row "
        "(audit.csv), the panels, and with <code>--export-clean</code> the set without the flagged images.</p>"
    )
    return "".join(parts)


def _run_html(record: RunRecord, open_: bool) -> str:
    from comet_ray.charts import history_chart, weight_histogram_chart

    metrics = record.metrics
    title = f"{record.category} · {record.strategy} · contamination {record.contamination:.0%} · seed {record.seed}"
    summary = (
        f"<p class='muted'><code>{html.escape(str(record.path))}</code> — image AUROC "
        f"{_fmt(mean_std([metrics.get('image_auroc')]))}, pixel AUROC {_fmt(mean_std([metrics.get('pixel_auroc')]))}, "
        + html.escape(
            f"{metrics.get('n_train', '?')} train / {metrics.get('n_test', '?')} report images, "
            f"{metrics.get('epochs', len(record.history))} epochs"
        )
        + "</p>"
    )
    head = [
        f"<details class='run'{' open' if open_ else ''}><summary>{html.escape(title)}</summary>",
        summary,
    ]
    figures = []
    weights = (record.weights or {}).get("weights")
    if weights:
        injected_ids = set((record.weights or {}).get("injected", []))
        nominal = [float(w) for i, w in weights.items() if i not in injected_ids]
        injected = [float(w) for i, w in weights.items() if i in injected_ids]
        figures.append(
            _img(
                weight_histogram_chart(
                    nominal, injected, f"SCL weights after the last epoch ({record.strategy})"
                ),
                "SCL weight histogram",
            )
        )
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
        "<h2>Metrics</h2>"
        + _metrics_html(summary)
        + _contamination_html(summary)
        + _roc_html(records)
        + "<h2>Runs</h2>"
        + runs
        + "</body></html>"
    )
