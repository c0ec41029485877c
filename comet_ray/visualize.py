"""Pictures for people: anomaly-map panels (``predict --maps``, reports) and the report's charts.

Everything draws on a bare :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot, no
global backend state, safe in worker threads) and returns PNG bytes.

Heat-map colours are on one fixed scale per model, not per image, so two panels can be compared by
eye: blue at the median nominal validation score, the middle of the colour bar at the decision
threshold, red at twice that distance. The region outline is the map's ``>= threshold`` level set;
image and map scores share one scale (the image score is the maximum patch score), but the map is
blurred (Gaussian, sigma 4), so its peak can sit a little under the image score and an image just
above the threshold may show no outline.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from comet_ray import atomic
from comet_ray.data.images import IMAGENET_MEAN, IMAGENET_STD

HEAT_CMAP = "jet"
REGION_COLOUR = "#ff2d2d"
MASK_COLOUR = "#39ff6a"


def _figure(width: float, height: float, dpi: int = 80):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def figure_png(figure, tight: bool = True) -> bytes:
    """A figure as PNG bytes (palette-quantised when that keeps it faithful, to keep reports small)."""
    buffer = io.BytesIO()
    figure.savefig(
        buffer, format="png", bbox_inches="tight" if tight else None, pad_inches=0.05, facecolor="white"
    )
    return _shrink_png(buffer.getvalue())


def _shrink_png(data: bytes) -> bytes:
    """Flat charts with at most 256 colours become palette PNGs (lossless, about a third of the size)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.getcolors(maxcolors=256) is None:  # photos and heat maps: keep matplotlib's encoding
        return data
    out = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    return out.getvalue() if out.tell() < len(data) else data


def denormalise(image: torch.Tensor) -> np.ndarray:
    """A preprocessed ``[3, S, S]`` tensor back to ``uint8 [S, S, 3]``: the crop the model saw."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def heat_range(
    threshold: float, nominal: float | None, amap: np.ndarray | None = None
) -> tuple[float, float]:
    """Colour scale: nominal score -> threshold (middle) -> nominal + 2 * (threshold - nominal)."""
    if nominal is not None and math.isfinite(nominal) and threshold > nominal:
        return float(nominal), float(2 * threshold - nominal)
    if amap is not None and amap.size:
        low, high = float(amap.min()), float(amap.max())
        span = max(high - threshold, threshold - low, 1e-6)
        return threshold - span, threshold + span
    return threshold - 1.0, threshold + 1.0


def map_panel(
    image: np.ndarray | torch.Tensor,
    amap: np.ndarray | torch.Tensor,
    threshold: float,
    nominal: float | None = None,
    score: float | None = None,
    title: str | None = None,
    mask: np.ndarray | torch.Tensor | None = None,
    dpi: int = 80,
    region_threshold: float | None = None,
) -> bytes:
    """Image | heat-map overlay | thresholded region outline, side by side, as PNG bytes.

    ``image`` is ``uint8 [S, S, 3]`` or a normalised ``[3, S, S]`` tensor; ``amap`` the ``[S, S]`` anomaly
    map; ``mask`` an optional ground-truth ``[S, S]`` bool mask, outlined in green on the last panel.
    """
    if isinstance(image, torch.Tensor):
        image = denormalise(image)
    amap = (
        amap.detach().float().cpu().numpy()
        if isinstance(amap, torch.Tensor)
        else np.asarray(amap, np.float32)
    )
    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    # The image decision uses ``threshold``; regions use the pixel threshold chosen on the validation
    # masks when the checkpoint has one (the blur lowers map peaks below the image-score scale).
    decision_threshold, threshold = threshold, threshold if region_threshold is None else region_threshold
    # ``nominal`` is an image-score level: it anchors the colour scale only for the image threshold. Against
    # a pixel threshold it squeezed the scale into a sliver (every defect saturated): scale by the map.
    vmin, vmax = heat_range(threshold, nominal if region_threshold is None else None, amap)
    figure = _figure(10.5, 3.6, dpi)
    # A fixed layout (no tight bounding box: that draws the figure twice, and panels are the slow part).
    axes = figure.subplots(
        1, 3, gridspec_kw={"wspace": 0.04, "left": 0.005, "right": 0.88, "bottom": 0.01, "top": 0.84}
    )
    axes[0].imshow(image)
    axes[0].set_title("input (center crop)", fontsize=9)
    axes[1].imshow(image)
    heat = axes[1].imshow(amap, cmap=HEAT_CMAP, vmin=vmin, vmax=vmax, alpha=0.5)
    axes[1].set_title(f"anomaly map, max {float(amap.max()):.3g}", fontsize=9)
    axes[2].imshow(image)
    region = amap >= threshold
    if region.any() and not region.all():
        axes[2].contourf(region.astype(np.float32), levels=[0.5, 1.5], colors=[REGION_COLOUR], alpha=0.25)
        axes[2].contour(amap, levels=[threshold], colors=[REGION_COLOUR], linewidths=1.8)
    elif region.all():
        axes[2].add_patch(_frame(amap.shape, REGION_COLOUR))
    label = f"map ≥ {threshold:.3g}" + ("" if region.any() else ": none")
    if not region.any() and score is not None and score >= decision_threshold:
        # Flagged by a patch whose peak the blur pulled under the threshold: circle where it is.
        row, col = np.unravel_index(int(np.argmax(amap)), amap.shape)
        axes[2].plot(
            col,
            row,
            "o",
            markersize=18,
            markerfacecolor="none",
            markeredgecolor=REGION_COLOUR,
            markeredgewidth=2,
        )
        label += ", ○ = peak"
    if mask is not None and np.asarray(mask).any():
        axes[2].contour(
            np.asarray(mask, np.float32),
            levels=[0.5],
            colors=[MASK_COLOUR],
            linewidths=1.2,
            linestyles="dashed",
        )
        label += ", green = truth"
    axes[2].set_title(label, fontsize=9)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    scale = ScalarMappable(
        norm=Normalize(vmin, vmax), cmap=heat.get_cmap()
    )  # the bar without the overlay's alpha
    bar = figure.colorbar(scale, cax=figure.add_axes((0.89, 0.06, 0.012, 0.72)))
    bar.ax.axhline(threshold, color="black", linewidth=1.5)
    bar.ax.tick_params(labelsize=8)
    if title or score is not None:
        text = title or ""
        if score is not None:
            verdict = "ANOMALOUS" if score >= decision_threshold else "nominal"
            text = f"{text}   score {score:.4g} (threshold {decision_threshold:.4g}) → {verdict}".strip()
        figure.suptitle(text, fontsize=11, y=0.985)
    return figure_png(figure, tight=False)


def _frame(shape: tuple[int, int], colour: str):
    from matplotlib.patches import Rectangle

    return Rectangle((-0.5, -0.5), shape[1], shape[0], fill=False, edgecolor=colour, linewidth=3)


def map_file_names(paths: Sequence[str]) -> list[str]:
    """A unique, readable PNG name per input path (``test/crack/000.png`` -> ``test__crack__000.png``).

    Names are relative to the inputs' common folder, so same-named files in different folders
    (MVTec's ``good/000.png`` and ``crack/000.png``) never overwrite each other.
    """
    stripped = [p[5:] if p.startswith("s3://") else os.path.abspath(p) for p in paths]
    parents = [os.path.dirname(p) for p in stripped]
    try:
        base = os.path.commonpath(parents) if parents else ""
    except ValueError:  # mixed absolute/relative or drives
        base = ""
    names: list[str] = []
    used: set[str] = set()
    for path in stripped:
        relative = os.path.relpath(path, base) if base else path.lstrip("/")
        stem = os.path.splitext(relative)[0].replace(os.sep, "__").replace("/", "__")
        stem = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in stem) or "image"
        name, index = f"{stem}.png", 1
        while name in used:
            index += 1
            name = f"{stem}-{index}.png"
        used.add(name)
        names.append(name)
    return names


class MapWriter:
    """``predict_images`` callback that writes one panel PNG per scored image into ``out_dir``."""

    def __init__(self, out_dir: str | os.PathLike, paths: Sequence[str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.names = dict(zip(paths, map_file_names(paths))) if paths else {}
        self.written: dict[str, Path] = {}

    def __call__(
        self,
        path: str,
        image: torch.Tensor,
        amap: torch.Tensor,
        score: float,
        threshold: float,
        nominal: float | None = None,
        region_threshold: float | None = None,
    ) -> Path:
        name = self.names.get(path) or map_file_names([path])[0]
        target = self.out_dir / name
        shown = "/".join(path.replace("\\", "/").rstrip("/").split("/")[-2:])
        data = map_panel(
            image, amap, threshold, nominal, score=score, title=shown, region_threshold=region_threshold
        )
        atomic.write_bytes(target, data)
        self.written[path] = target
        return target


# --- report charts -------------------------------------------------------------------------------


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
