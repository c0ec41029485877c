"""Plain-text result tables: the one printer behind every table a command prints."""

from __future__ import annotations

import math
from collections.abc import Sequence


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Aligned columns with a dashed rule under the header; floats to 4 places, undefined values ``n/a``."""
    cells = [list(columns), *([_cell(row, c) for c in columns] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(row: dict, column: str) -> str:
    value = row.get(column, "")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"  # undefined (e.g. one class of test image): null in metrics.json
    return f"{value:.4f}" if isinstance(value, float) else str(value)
