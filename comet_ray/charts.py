"""The report's charts (ROC, weight histogram, per-epoch history, contamination curve, weight
trajectories), drawn as :mod:`comet_ray.visualize` draws: a bare Agg figure, PNG bytes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from comet_ray.visualize import _figure, figure_png


def roc_chart(curves: Sequence[dict], title: str) -> bytes:
    """ROC curves: each ``{"fpr": [...], "tpr": [...], "label": str}``."""
    figure = _figure(4.8, 4.2)
    axis = figure.subplots()
    for curve in curves:
        (line,) = axis.plot(curve["fpr"], curve["tpr"], linewidth=1.6, label=curve["label"])
        if curve.get("point") is not None:
            axis.plot(*curve["point"], "o", color=line.get_color(), markersize=6, markeredgecolor="black")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set_xlim(-0.01, 1.01)
    axis.set_ylim(-0.01, 1.01)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    return figure_png(figure)


def weight_histogram_chart(nominal: Sequence[float], injected: Sequence[float], title: str) -> bytes:
    """SCL sample weights after the last epoch; injected anomalies stacked in red and marked as a rug."""
    figure = _figure(4.8, 3.2)
    axis = figure.subplots()
    bins = np.linspace(0.0, 1.0, 21)
    axis.hist(
        [np.clip(nominal, 0, 1), np.clip(injected, 0, 1)],
        bins=bins,
        stacked=True,
        color=["#4c78a8", "#e45756"],
        label=[f"train images ({len(nominal)})", f"injected anomalies ({len(injected)})"],
    )
    if len(injected):
        axis.plot(
            np.clip(injected, 0, 1),
            np.full(len(injected), -0.02),
            "|",
            color="#e45756",
            markersize=12,
            transform=axis.get_xaxis_transform(),
            clip_on=False,
        )
    axis.set_xlim(-0.02, 1.02)
    axis.set_xlabel("SCL weight w (1 = fully trusted)")
    axis.set_ylabel("images")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8, loc="upper left")
    return figure_png(figure)


def history_chart(history: Sequence[dict], title: str = "per epoch") -> bytes:
    """λ(Σ), det Σ and the training loss over epochs (``title`` ends each panel's title)."""
    epochs = [int(h.get("epoch", i)) + 1 for i, h in enumerate(history)]
    figure = _figure(7.6, 2.7)
    axes = figure.subplots(1, 3, gridspec_kw={"wspace": 0.5})
    series = [
        ("lam", f"λ(Σ) {title}", False),
        ("det_sigma", f"det Σ {title}", True),
        ("loss", f"loss {title}", False),
    ]
    for axis, (key, label, log_scale) in zip(axes, series):
        values = [h.get(key) for h in history]
        values = [float("nan") if v is None else float(v) for v in values]
        axis.plot(epochs, values, marker="o", markersize=3, linewidth=1.4)
        if (
            log_scale
            and all(v > 0 for v in values if math.isfinite(v))
            and any(math.isfinite(v) for v in values)
        ):
            axis.set_yscale("log")
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("epoch", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        axis.ticklabel_format(
            axis="y", style="sci", scilimits=(-3, 4), useOffset=False
        ) if not log_scale else None
    return figure_png(figure)


def contamination_chart(
    series: dict[str, list[tuple[float, float, float]]], metric: str, title: str
) -> bytes:
    """Metric vs contamination, one line per strategy: ``{strategy: [(contamination, mean, std)]}``."""
    figure = _figure(4.8, 3.4)
    axis = figure.subplots()
    for strategy, points in sorted(series.items()):
        points = sorted(points)
        x = [p[0] * 100 for p in points]
        mean = np.array([p[1] for p in points], dtype=float)
        std = np.array([p[2] for p in points], dtype=float)
        axis.plot(x, mean, marker="o", linewidth=1.6, label=strategy)
        if np.nan_to_num(std).any():
            axis.fill_between(x, mean - std, mean + std, alpha=0.2)
    axis.set_xlabel("training contamination (%)")
    axis.set_ylabel(metric)
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure_png(figure)


def weight_trajectory_chart(
    per_epoch: np.ndarray,
    flagged: np.ndarray,
    injected: np.ndarray | None,
    title: str,
    order: Sequence[int] | None = None,
    limit: int = 200,
) -> bytes:
    """SCL weight per epoch: one line per flagged image against the band of the images not flagged.

    ``per_epoch`` is ``[epochs, N]`` (NaN: not recorded); ``flagged`` and ``injected`` (None when no
    anomaly is known) are ``[N]`` masks. Flagged images are red when injected, orange otherwise; injected
    images that ended unflagged are dashed red. At most ``limit`` lines are drawn, first in ``order``.
    """
    per_epoch = np.asarray(per_epoch, dtype=np.float64)
    epochs = np.arange(1, per_epoch.shape[0] + 1)
    flagged = np.asarray(flagged, dtype=bool)
    known = injected is not None
    injected = np.zeros_like(flagged) if injected is None else np.asarray(injected, dtype=bool)
    figure = _figure(6.4, 3.6)
    axis = figure.subplots()
    rest = per_epoch[:, ~flagged]
    if rest.size:
        with np.errstate(all="ignore"):
            low, median, high = (np.nanpercentile(rest, q, axis=1) for q in (5, 50, 95))
        # Drawn over the flagged lines: most of the set sits at 1, where the lines start.
        axis.fill_between(
            epochs,
            low,
            high,
            color="#4c78a8",
            alpha=0.35,
            linewidth=0,
            zorder=3,
            label=f"not flagged ({rest.shape[1]}): 5-95 %",
        )
        axis.plot(epochs, median, color="#1f4e8c", linewidth=2.2, zorder=4, label="not flagged: median")
    order = np.arange(per_epoch.shape[1]) if order is None else np.asarray(order)
    drawn = [i for i in order if flagged[i] or injected[i]][:limit]
    labelled: set[str] = set()
    for i in drawn:
        if flagged[i]:
            kind = ("flagged, injected" if injected[i] else "flagged, not injected") if known else "flagged"
            style = {"color": "#e45756" if injected[i] else "#f58518", "linestyle": "-", "linewidth": 1.0}
        else:
            kind, style = "injected, not flagged", {"color": "#e45756", "linestyle": "--", "linewidth": 0.8}
        axis.plot(epochs, per_epoch[:, i], alpha=0.75, label=None if kind in labelled else kind, **style)
        labelled.add(kind)
    shown = sum(flagged[i] for i in drawn)
    note = f" (first {shown} of {int(flagged.sum())} flagged)" if shown < int(flagged.sum()) else ""
    axis.set_xlim(0.8, (epochs[-1] if epochs.size else 1) + 0.2)
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_ylim(-0.03, 1.05)
    axis.set_xlabel("epoch")
    axis.set_ylabel("SCL weight (1 = fully trusted)")
    axis.set_title(title + note, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower left")
    return figure_png(figure)
