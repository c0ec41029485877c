"""Ray layers over the plain-PyTorch core: data-parallel training with Ray Train."""

from comet_ray.distributed.train import (
    CrossWorkerBatchNorm,
    DataParallelCollective,
    fit_categories,
    fit_distributed,
    format_table,
    train_loop_per_worker,
)

__all__ = [
    "CrossWorkerBatchNorm",
    "DataParallelCollective",
    "fit_categories",
    "fit_distributed",
    "format_table",
    "train_loop_per_worker",
]
