"""Contamination injection: the SoftPatch "no-overlap" protocol (method page section 6).

To measure how a detector copes with anomalies hidden in its training set, move ``n`` randomly
chosen anomalous test images into train and out of test, so no image is both trained on and
reported on. ``n = round(ρ·N_train / (1 − ρ))`` makes ρ the anomalous fraction of the new train set.
Moved samples keep their ``sample_id`` so SCL weights, cached features and the manifest stay
traceable to the original file; only ``split`` and ``injected`` change.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from comet_ray.data.layout import Sample


@dataclass
class ContaminationManifest:
    """What was moved and why, written next to every result so a number can be traced to its data."""

    requested_ratio: float
    achieved_ratio: float
    seed: int
    n_train_nominal: int  # train images before injection (unlabelled, assumed nominal)
    n_moved: int
    moved: list[dict] = field(default_factory=list)  # {sample_id, uri, defect}, sorted by sample_id
    capped: bool = False  # too few test anomalies: fewer moved than the ratio asked for

    def to_dict(self) -> dict:
        return asdict(self)


def inject_contamination(
    samples: list[Sample], ratio: float, seed: int, min_keep_fraction: float = 1 / 3
) -> tuple[list[Sample], ContaminationManifest]:
    """Move anomalous test images into train so that ``ratio`` of train is anomalous.

    At least ``ceil(min_keep_fraction · count)`` images of each defect type stay in test, so every
    defect type can still be evaluated; when that caps ``n``, as many as allowed move, ``capped`` is
    set and the achieved ratio ``moved / (N_train + moved)`` is recorded. Deterministic per seed.
    Returns the samples in their original order (moved ones changed in place) and the manifest.
    """
    if not 0.0 <= ratio < 1.0:  # also rejects NaN
        raise ValueError(f"contamination ratio must be in [0, 1), got {ratio}")
    if not 0.0 <= min_keep_fraction <= 1.0:
        raise ValueError(f"min_keep_fraction must be in [0, 1], got {min_keep_fraction}")
    if any(s.injected for s in samples):
        raise ValueError("samples already contain injected anomalies; inject into the original table")

    n_train = sum(1 for s in samples if s.split == "train")
    n_requested = _round_half_up(ratio * n_train / (1.0 - ratio))

    candidates = sorted(
        (s for s in samples if s.split == "test" and s.is_anomalous), key=lambda s: s.sample_id
    )
    per_defect = Counter(s.defect for s in candidates)
    # The small epsilon keeps float noise (e.g. 1/3 * 6 = 2.0000000000000004) from keeping one extra.
    movable = {d: c - math.ceil(min_keep_fraction * c - 1e-9) for d, c in per_defect.items()}
    n_target = min(n_requested, sum(movable.values()))

    # A seeded shuffle, then take in order while the defect type still has room: uniform within
    # the caps, and always reaches n_target because every type can give up to its cap.
    order = np.random.default_rng(seed).permutation(len(candidates))
    taken: Counter[str] = Counter()
    chosen: set[str] = set()
    for i in order:
        if len(chosen) == n_target:
            break
        sample = candidates[int(i)]
        if taken[sample.defect] < movable[sample.defect]:
            taken[sample.defect] += 1
            chosen.add(sample.sample_id)

    result = [replace(s, split="train", injected=True) if s.sample_id in chosen else s for s in samples]
    # candidates are sorted by sample_id, so the manifest is too
    moved = [
        {"sample_id": s.sample_id, "uri": s.uri, "defect": s.defect}
        for s in candidates
        if s.sample_id in chosen
    ]
    n_moved = len(moved)
    manifest = ContaminationManifest(
        requested_ratio=float(ratio),
        achieved_ratio=n_moved / (n_train + n_moved) if n_train + n_moved else 0.0,
        seed=seed,
        n_train_nominal=n_train,
        n_moved=n_moved,
        moved=moved,
        capped=n_moved < n_requested,
    )
    return result, manifest


def _round_half_up(value: float) -> int:
    # Python's round() goes to even on .5; a protocol number should not depend on that subtlety.
    return math.floor(value + 0.5)
