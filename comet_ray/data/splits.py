"""Validation split carved from the test split (method page section 7).

Model and hyperparameter selection must never see the images the final numbers are reported on, so
the test split is divided once, seeded and stratified by defect type, into a validation part (for
Tune) and a disjoint report part.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict

import numpy as np

from comet_ray.data.layout import Sample


def validation_split(
    test_samples: list[Sample], fraction: float = 0.3, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Return ``(validation, report)``, both sorted by ``sample_id``, disjoint, covering the input.

    Each defect type (``"good"`` included) contributes ``round(fraction · count)`` images, but a type
    with at least two images always gives at least one and keeps at least one, so every type is both
    tuned on and reported on; a type with a single image stays in the report. ``fraction = 0`` gives
    an empty validation set. Each type is shuffled by its own seeded stream, so adding or removing
    one defect type does not change how the others are split.
    """
    if not 0.0 <= fraction < 1.0:  # also rejects NaN
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if any(s.split != "test" for s in test_samples):
        raise ValueError("validation_split takes test samples only (train or injected samples were passed)")

    strata: dict[str, list[Sample]] = defaultdict(list)
    for sample in test_samples:
        strata[sample.defect].append(sample)

    validation: list[Sample] = []
    report: list[Sample] = []
    for defect in sorted(strata):
        members = sorted(strata[defect], key=lambda s: s.sample_id)
        count = _stratum_validation_count(len(members), fraction)
        rng = np.random.default_rng([seed, zlib.crc32(defect.encode("utf-8"))])
        picked = set(rng.permutation(len(members))[:count].tolist())
        for i, sample in enumerate(members):
            (validation if i in picked else report).append(sample)

    validation.sort(key=lambda s: s.sample_id)
    report.sort(key=lambda s: s.sample_id)
    return validation, report


def _stratum_validation_count(size: int, fraction: float) -> int:
    if fraction == 0.0 or size < 2:
        return 0
    return min(max(math.floor(fraction * size + 0.5), 1), size - 1)
