"""Many categories at once on a cluster: one Ray Train run per category, as many at a time as the
cluster holds, and one table of their results (a failed category is one line, not the end of the rest)."""

from __future__ import annotations

from typing import Any

from comet_ray import jsonfile, storage
from comet_ray.config import TrainConfig
from comet_ray.distributed.train import _cluster_nodes, fit_distributed
from comet_ray.errors import CometError, remote_error
from comet_ray.table import format_table


def categories_table(rows: list[dict]) -> str:
    """A plain-text table of per-category results."""
    columns = ("category", "strategy", "image_auroc", "pixel_auroc", "f1_max", "train_seconds")
    return format_table(rows, columns + (("error",) if any("error" in row for row in rows) else ()))


def error_line(exc: BaseException) -> str:
    """One line for a category's failure: a user error's own message, even from inside a worker.

    Ray wraps a worker's exception in ``WorkerGroupError`` whose text is the whole remote traceback;
    its last ``comet_ray.errors.<Name>: message`` line is what the user can act on.
    """
    if isinstance(exc, CometError):
        return str(exc)
    text = str(exc)
    found = remote_error(text)
    if found:
        return found[1]
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}".rstrip(": ")


def fit_categories(
    configs: list[TrainConfig],
    workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 0.5,
    *,
    storage_path: str,
    summary_path: str | None = None,
    **fit_kwargs: Any,
) -> tuple[list[dict], str]:
    """Train many categories at once: one ``fit_distributed`` per category, each from a Ray task.

    Each category's run name is the default of ``fit_distributed`` (category-strategy-seed) and its
    outputs go to ``config.out`` (or the run's ``output`` folder). The tasks take no CPU themselves
    (each only drives a ``TorchTrainer``); Ray queues trainers whose workers don't fit yet. Writes
    ``summary.json`` (default ``storage_path/summary.json``) and returns (metrics in the order of
    ``configs``, a printable table). A category that fails is reported with its error instead of
    failing the others.
    """
    import ray

    storage_path = storage.check_location(storage_path, "--storage-path")
    nodes = _cluster_nodes()
    storage.require_shared(storage_path, "--storage-path", nodes)  # before any category starts
    for config in configs:
        if config.out:
            storage.require_shared(storage.check_location(config.out, "--out"), "--out", nodes)

    @ray.remote(num_cpus=0, max_retries=0)
    def _fit_one(config_dict: dict) -> dict:
        config = TrainConfig.from_dict(config_dict)
        try:
            return fit_distributed(
                config, workers, gpus_per_worker, cpus_per_worker, storage_path=storage_path, **fit_kwargs
            )
        except Exception as exc:  # noqa: BLE001 - one category's failure must not sink the rest
            return {"category": config.category, "strategy": config.comet.strategy, "error": error_line(exc)}

    results = ray.get([_fit_one.remote(c.to_dict()) for c in configs])
    storage.write_text(
        summary_path or storage.join(storage_path, "summary.json"), jsonfile.dumps(results, indent=2)
    )
    return results, categories_table(results)
