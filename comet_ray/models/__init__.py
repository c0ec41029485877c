"""Detectors over cached patch features, and a registry to build them by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from comet_ray.errors import CometError

if TYPE_CHECKING:  # torch is imported by the detectors themselves: `comet-ray --help` stays instant
    from comet_ray.models.protocol import Detector

MODELS = ("simplenet", "flow", "knn")


def build_detector(
    name: str,
    feature_dim: int,
    model_config,
    grid: tuple[int, int] | None = None,
    train_store=None,
    fit_bank: bool = True,
) -> Detector:
    """Build a detector from ``ModelConfig``; the only place that knows the concrete classes.

    ``train_store`` (the training features) sets what the detector measures on its data before
    training: SimpleNet's feature scale (without it, 1: ``noise_std`` is then in raw feature units) and
    the knn reference's memory bank (its whole fit; a coreset seeded from torch's global generator).
    ``fit_bank=False``: an empty knn bank, for a caller that chooses what it is filled from.
    """
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
            feature_scale=1.0 if train_store is None else train_store.scale(),
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
    if name == "knn":
        import torch

        from comet_ray.models.knn import PatchKNN

        if train_store is None:
            raise CometError("the knn reference is built from training features; none were given")
        model = PatchKNN(
            feature_dim,
            bank_fraction=model_config.knn_bank_fraction,
            coreset=model_config.knn_coreset,
            search=model_config.knn_search,
        )
        if not fit_bank:
            return model
        generator = torch.Generator().manual_seed(int(torch.randint(1 << 62, (1,))))
        return model.fit(train_store.features, generator)
    raise CometError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def detector_from_hparams(name: str, hparams: dict) -> Detector:
    """Rebuild a detector from the hyperparameters stored in a checkpoint."""
    if name == "simplenet":
        from comet_ray.models.simplenet import SimpleNet

        return SimpleNet(**hparams)
    if name == "flow":
        from comet_ray.models.flow import PatchFlow

        return PatchFlow(**hparams)
    if name == "knn":
        from comet_ray.models.knn import PatchKNN

        return PatchKNN(**hparams)
    raise CometError(f"checkpoint holds an unknown model {name!r}")
