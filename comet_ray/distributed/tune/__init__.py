"""Ray Tune sweeps of the SCL and regularisation knobs, one contamination level at a time.

Contamination is an experimental condition: each level gets its own seeded Optuna search with ASHA
early stopping on the per-epoch objective. The objective is image AUROC on the validation split
(carved from test, disjoint from the reported images) or, with ``objective="unsupervised"``, the
detector's own loss on the training images (no labels anywhere). Each trial evaluates its final model
once on the report split so ``results.csv`` can show it, but :func:`select_best` sees only the
validation and training columns (:data:`SELECTION_COLUMNS`): test numbers never choose anything.

A fair comparison, per level: the baseline is tuned first over the base-detector knobs of the space
(``--trials`` trials), then CoMet over its own knobs (``--trials`` trials) on top of the base knobs
chosen for the baseline, so both rows share the same base detector. Every trial and every repeat uses
one split (contamination draw and validation split, ``split_seed``); repeats vary only the training
seed, so no image that selection saw is ever reported on.

A trial runs the plain core in-process (``workers=0``) or builds and fits a ``TorchTrainer`` over
``workers`` Ray Train workers (the Ray 2.60 pattern: Train V2 forbids ``Tuner(trainer)``), with the
workers' per-epoch reports forwarded to Tune by ``TuneReportCallback``.

On a cluster the driver runs on a worker node (``comet-ray submit``'s default): the trials, the one task that fills
the feature cache before them and the seed repeats after them are Ray work with the trials'
resources (GPUs when the cluster has or can autoscale GPU nodes), placed wherever those are.
Concurrency is ``--max-concurrent-trials`` or what the cluster can hold at its largest. Tune's
storage (default ``OUT/.ray``) and the feature cache under it must be shared by the nodes
(``s3://`` on a cluster of several nodes); an ``s3://`` ``--out`` receives the results once the
sweep is complete.
"""

from comet_ray.distributed.tune.levels import RESULT_COLUMNS, sweep, tune_level, tune_strategies
from comet_ray.distributed.tune.plot import plot_contamination
from comet_ray.distributed.tune.ray_compat import _restorable
from comet_ray.distributed.tune.repeats import repeat_configs, repeat_over_seeds
from comet_ray.distributed.tune.selection import (
    SELECTION_COLUMNS,
    check_reported_split,
    chosen_knobs,
    select_best,
    selection_key,
    selection_split,
)
from comet_ray.distributed.tune.settings import (
    SweepSettings,
    _max_concurrent,
    _training_resources,
    level_config,
)
from comet_ray.distributed.tune.space import (
    BASE_DETECTOR_KNOBS,
    DEFAULT_SPACE,
    STRATEGIES,
    knob_overrides,
    load_search_space,
    param_space,
    split_space,
)
from comet_ray.distributed.tune.trial import TEST_METRICS, run_trial, unsupervised_loss

__all__ = [
    "BASE_DETECTOR_KNOBS",
    "DEFAULT_SPACE",
    "RESULT_COLUMNS",
    "SELECTION_COLUMNS",
    "STRATEGIES",
    "TEST_METRICS",
    "SweepSettings",
    "_max_concurrent",
    "_restorable",
    "_training_resources",
    "check_reported_split",
    "chosen_knobs",
    "knob_overrides",
    "level_config",
    "load_search_space",
    "param_space",
    "plot_contamination",
    "repeat_configs",
    "repeat_over_seeds",
    "run_trial",
    "select_best",
    "selection_key",
    "selection_split",
    "split_space",
    "sweep",
    "tune_level",
    "tune_strategies",
    "unsupervised_loss",
]
