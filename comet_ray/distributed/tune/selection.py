"""Choosing a trial without test labels: the selection key, the best trial, its knobs, and the split check."""

from __future__ import annotations

import logging
import math
from typing import Any

from comet_ray.config import TrainConfig
from comet_ray.errors import CometError

log = logging.getLogger(__name__)


# Everything select_best compares, best first: the objective, then (validation objective only) the
# validation AUPRO, then the final training loss. None of them is computed on a reported image.
SELECTION_COLUMNS = ("objective", "validation_aupro", "final_loss")


def _number(value: Any) -> float | None:
    """A finite float from a result cell (CSV text, None, NaN and '' are missing)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def selection_key(view: dict, objective: str = "validation") -> tuple | None:
    """Larger is better: the objective, then validation AUPRO (validation objective only), then a lower
    final training loss; None for a trial that did not finish. ``view`` holds SELECTION_COLUMNS only.

    A saturated objective (every trial at AUROC 1.0 on an easy category) still separates trials.
    """
    value = _number(view.get("objective"))
    if value is None:
        return None
    loss = _number(view.get("final_loss"))
    loss_key = -loss if loss is not None else -math.inf
    if objective != "validation":
        return (-value, loss_key)
    aupro = _number(view.get("validation_aupro"))
    return (value, aupro if aupro is not None else -math.inf, loss_key)


def select_best(
    rows: list[dict], objective: str = "validation", strategy: str = "comet"
) -> dict[float, dict]:
    """Best finished trial of ``strategy`` per level by :func:`selection_key`; the first of equals wins.

    Each row is cut down to its SELECTION_COLUMNS before it is compared: no test column can reach the
    choice. Rows without a strategy (results of older sweeps) are CoMet trials.
    """
    best: dict[float, tuple[tuple, dict]] = {}
    for row in rows:
        if (row.get("strategy") or "comet") != strategy:
            continue
        key = selection_key({column: row.get(column) for column in SELECTION_COLUMNS}, objective)
        if key is None:
            continue
        level = float(row["level"])
        if level not in best or key > best[level][0]:
            best[level] = (key, row)
    return {level: row for level, (_, row) in best.items()}


def chosen_knobs(row: dict | None) -> dict[str, Any]:
    """The knobs a result row was trained with (``knob_*`` columns), as trial parameters."""
    return {
        k.removeprefix("knob_"): v
        for k, v in (row or {}).items()
        if k.startswith("knob_") and v not in (None, "")
    }  # "": a column of the other strategy's knobs


def check_reported_split(selection: dict, manifest: dict) -> None:
    """Refuse a repeat that would train or report on an image the configuration was selected on."""
    seen = set(selection["validation_ids"])
    used = set(manifest["report_ids"]) | {m["sample_id"] for m in manifest["contamination"].get("moved", [])}
    if seen & used or manifest["validation_ids"] != selection["validation_ids"]:
        raise CometError(
            f"a repeat's split differs from the one its configuration was selected on "
            f"({len(seen & used)} validation image(s) reused): split seeds must match"
        )


def selection_split(config: TrainConfig) -> dict:
    """The split every trial of ``config``'s level trains and is selected on (a listing, no decoding)."""
    from comet_ray.prepare import check_trainable, select_samples

    _, _, _, manifest = select_samples(check_trainable(config).samples, config)
    return {
        "split_seed": config.data_seed,
        "validation_ids": manifest["validation_ids"],
        "report_ids": manifest["report_ids"],
        "moved": manifest["contamination"].get("moved", []),
    }
