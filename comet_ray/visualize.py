"""Pictures for people: anomaly-map panels (``predict --maps``, reports); the report's charts are in
:mod:`comet_ray.charts`.

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
