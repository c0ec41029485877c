"""A small synthetic MVTec-style category: periodic textures with painted defects and their masks.

Used by ``comet-ray demo`` (no download, no licence question) and by tests that need a set where
contamination measurably hurts: one defect type that recurs across many training images teaches an
unprotected detector that the defect is normal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFECTS = ("spot", "scratch")


def _texture(rng: np.random.Generator, size: int, base: np.random.Generator) -> np.ndarray:
    """A woven-looking texture: two fixed gratings (the category's look) with per-image phase and noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((size, size, 3), np.float32)
    angles = base.uniform(0, np.pi, 2)
    freqs = base.uniform(0.15, 0.3, 2)
    colours = base.uniform(0.3, 0.7, (2, 3))
    for angle, freq, colour in zip(angles, freqs, colours):
        phase = rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        img += wave[..., None] * colour[None, None, :] * 0.6
    img += rng.normal(0, 0.03, img.shape)
    return np.clip(img, 0, 1)


def _paint_defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    margin = size // 6
    cx, cy = rng.integers(margin, size - margin, 2)
    if kind == "spot":
        r = int(rng.integers(size // 14, size // 9))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        colour = np.array([0.85, 0.25, 0.1])
    elif kind == "scratch":
        length = int(rng.integers(size // 4, size // 2))
        angle = rng.uniform(0, np.pi)
        dx, dy = int(length * np.cos(angle) / 2), int(length * np.sin(angle) / 2)
        draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=255, width=max(2, size // 40))
        colour = np.array([0.95, 0.95, 0.95])
    else:
        raise ValueError(f"unknown defect {kind!r}")
    m = np.asarray(mask, np.float32)[..., None] / 255.0
    img = img * (1 - m) + (colour + rng.normal(0, 0.03, img.shape)) * m
    return np.clip(img, 0, 1), np.asarray(mask)


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).astype(np.uint8)).save(path)


def make_texture_category(
    root: str | Path,
    category: str = "weave",
    n_train: int = 60,
    n_test_good: int = 20,
    defects: dict[str, int] | None = None,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write ``<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}``."""
    defects = defects if defects is not None else {"spot": 30, "scratch": 12}
    root = Path(root)
    base = np.random.default_rng(seed)
    look_seed = int(base.integers(1 << 31))  # one look per category: every image shares its gratings
    rng = np.random.default_rng(base.integers(1 << 31))
    category_dir = root / category
    for i in range(n_train):
        _save(
            _texture(rng, size, np.random.default_rng(look_seed)),
            category_dir / "train" / "good" / f"{i:03d}.png",
        )
    for i in range(n_test_good):
        _save(
            _texture(rng, size, np.random.default_rng(look_seed)),
            category_dir / "test" / "good" / f"{i:03d}.png",
        )
    for kind, count in defects.items():
        for i in range(count):
            texture = _texture(rng, size, np.random.default_rng(look_seed))
            img, mask = _paint_defect(texture, kind, rng)
            _save(img, category_dir / "test" / kind / f"{i:03d}.png")
            mask_path = category_dir / "ground_truth" / kind / f"{i:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(mask_path)
    return category_dir
