"""Detectors over cached patch features, and a registry to build them by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from comet_ray.errors import CometError

if TYPE_CHECKING:  # torch is imported by the detectors themselves: `comet-ray --help` stays instant
    from torch import nn

MODELS = ("simplenet", "flow")


def build_detector(name: str, feature_dim: int, model_config, grid: tuple[int, int] | None = None) -> nn.Module:
    """Build a detector from ``ModelConfig``; the only place that knows the concrete classes."""
    if name == "simplenet":
        from comet_ray.models.simplenet import SimpleNet

        return SimpleNet(
            feature_dim,
            hidden=model_config.discriminator_hidden,
            noise_std=model_config.noise_std,
            margin=model_config.margin,
            adaptor_lr=model_config.adaptor_lr,
            discriminator_lr=model_config.discriminator_lr,
            discriminator_weight_decay=model_config.discriminator_weight_decay,
        )
    if name == "flow":
        from comet_ray.models.flow import PatchFlow

        return PatchFlow(
            feature_dim,
            grid=grid,
            blocks=model_config.flow_blocks,
            hidden=model_config.flow_hidden,
            clamp=model_config.flow_clamp,
            lr=model_config.flow_lr,
            pos_dim=getattr(model_config, "flow_pos_dim", 32),
        )
    raise CometError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def detector_from_hparams(name: str, hparams: dict) -> nn.Module:
    """Rebuild a detector from the hyperparameters stored in a checkpoint."""
    if name == "simplenet":
        from comet_ray.models.simplenet import SimpleNet

        return SimpleNet(**hparams)
    if name == "flow":
        from comet_ray.models.flow import PatchFlow

        return PatchFlow(**hparams)
    raise CometError(f"checkpoint holds an unknown model {name!r}")
