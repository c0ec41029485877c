"""The search space: the YAML file of knobs, Tune's parameter space, and knob overrides of a config."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from comet_ray.config import ModelConfig, TrainConfig, apply_overrides
from comet_ray.errors import CometError

log = logging.getLogger(__name__)


DEFAULT_SPACE = Path(__file__).parents[1] / "search_space.yaml"


# Knobs of the detector itself (ModelConfig), as opposed to CoMet's: the baseline searches these only.
BASE_DETECTOR_KNOBS = {f.name for f in dataclasses.fields(ModelConfig)} - {"model"}


STRATEGIES = ("baseline", "comet")


def load_search_space(
    path: str | os.PathLike | None = None, objective: str = "validation"
) -> dict[str, dict]:
    """The editable YAML search space; base-detector knobs are dropped for the unsupervised objective,
    whose loss scale they change (a lower loss would not mean a better detector)."""
    path = Path(path) if path else DEFAULT_SPACE
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CometError(f"cannot read search space {path}: {exc}") from None
    probe = TrainConfig()
    for knob, dist in spec.items():
        if knob != "l2":
            try:
                apply_overrides(probe, {knob: None})
            except KeyError:
                raise CometError(f"search space {path}: {knob!r} is not a comet-ray knob") from None
        if (
            not isinstance(dist, dict)
            or len(dist) != 1
            or next(iter(dist)) not in ("uniform", "loguniform", "randint", "choice")
        ):
            raise CometError(f"search space {path}: {knob!r} needs one of uniform/loguniform/randint/choice")
    if objective == "unsupervised":
        spec = {k: v for k, v in spec.items() if k not in BASE_DETECTOR_KNOBS}
    return spec


def split_space(spec: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(base-detector knobs, CoMet knobs) of a search space: the baseline searches the first only."""
    base = {k: v for k, v in spec.items() if k in BASE_DETECTOR_KNOBS}
    return base, {k: v for k, v in spec.items() if k not in BASE_DETECTOR_KNOBS}


def param_space(spec: dict[str, dict]) -> dict[str, Any]:
    from ray import tune

    space = {}
    for knob, dist in spec.items():
        ((kind, args),) = dist.items()
        if kind == "uniform":
            space[knob] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "loguniform":
            space[knob] = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "randint":
            space[knob] = tune.randint(int(args[0]), int(args[1]) + 1)
        else:
            space[knob] = tune.choice(list(args))
    return space


def knob_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Trial parameters -> config overrides (``l2: off`` means lambda0 = 0)."""
    overrides = {k: v for k, v in params.items() if not k.startswith("_") and k != "l2"}
    if params.get("l2") == "off":
        overrides["lambda0"] = 0.0
    for key, value in list(overrides.items()):
        if hasattr(value, "item"):  # numpy scalars from the searcher
            overrides[key] = value.item()
    return overrides
