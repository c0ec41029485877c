"""The contamination curve of a sweep's results (contamination.png)."""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

log = logging.getLogger(__name__)


def plot_contamination(rows: list[dict], path: Path) -> None:
    """Test image AUROC and AUPRO vs contamination, baseline vs best CoMet, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for axis, key, title in zip(axes, ("test_image_auroc", "test_aupro"), ("image AUROC", "AUPRO@0.3")):
        for strategy, colour in (("baseline", "tab:gray"), ("comet", "tab:blue")):
            levels = sorted({r["level"] for r in rows if r["strategy"] == strategy})
            means, stds = [], []
            for level in levels:
                values = [
                    r[key]
                    for r in rows
                    if r["strategy"] == strategy
                    and r["level"] == level
                    and r[key] is not None
                    and not math.isnan(r[key])
                ]
                means.append(statistics.mean(values) if values else float("nan"))
                stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            xs = [100 * level for level in levels]
            axis.errorbar(
                xs,
                means,
                yerr=stds,
                marker="o",
                capsize=3,
                color=colour,
                label="CoMet (best config)" if strategy == "comet" else "baseline",
            )
        axis.set_xlabel("training-set contamination (%)")
        axis.set_title(f"test {title}")
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
