"""Shared pytest fixtures: small synthetic datasets written in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def mvtec_tree(tmp_path: Path) -> Path:
    """A tiny MVTec-AD-style dataset root with one category, ``widget``.

    train/good: 12 images; test/good: 4; test/scratch: 5; test/dent: 4; all 64x64 RGB PNGs. Every
    defect image has ``ground_truth/<defect>/<stem>_mask.png`` except ``test/scratch/004.png``.
    Returns the dataset root (the folder that contains ``widget/``).
    """
    root = tmp_path / "mvtec"
    category = root / "widget"
    rng = np.random.default_rng(0)
    counts = {("train", "good"): 12, ("test", "good"): 4, ("test", "scratch"): 5, ("test", "dent"): 4}
    for (split, defect), count in counts.items():
        folder = category / split / defect
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
            if split == "test" and defect != "good" and not (defect == "scratch" and i == 4):
                mask = np.zeros((64, 64), dtype=np.uint8)
                mask[8 + i : 24 + i, 16:40] = 255
                mask_dir = category / "ground_truth" / defect
                mask_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(mask_dir / f"{i:03d}_mask.png")
    return root
