"""Frozen torchvision backbones cut at the two mid-level stages SimpleNet uses.

SimpleNet reads WideResNet-50-2's ``layer2`` (stride 8) and ``layer3`` (stride 16). The small backbones
are cut at the stages with the same strides, so the patch grid and everything downstream are unchanged:
ResNet-18 ``layer2``/``layer3`` and MobileNetV2 ``features[:7]``/``features[7:14]``.

Weights: an explicit file (``weights=PATH``), else torchvision's ImageNet weights from the torch hub cache
or a download, else random initialisation with a loud warning, because random features make anomaly
scores far weaker and a user must know when that happened.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from comet_ray.errors import CometError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    channels: tuple[int, int]
    default_feature_dim: int


BACKBONES: dict[str, BackboneSpec] = {
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", (512, 1024), 1536),
    "resnet18": BackboneSpec("resnet18", (128, 256), 384),
    "mobilenet_v2": BackboneSpec("mobilenet_v2", (32, 96), 256),
}


class TwoStageBackbone(nn.Module):
    """Runs a torchvision trunk up to its stride-16 stage and returns the stride-8 and stride-16 maps."""

    def __init__(self, stem: nn.Module, stage_a: nn.Module, stage_b: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.stage_a = stage_a
        self.stage_b = stage_b

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        a = self.stage_a(self.stem(images))
        b = self.stage_b(a)
        return [a, b]


def _cut(name: str, model: nn.Module) -> TwoStageBackbone:
    if name in ("wide_resnet50_2", "resnet18"):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
        return TwoStageBackbone(stem, model.layer2, model.layer3)
    if name == "mobilenet_v2":
        return TwoStageBackbone(nn.Identity(), model.features[:7], model.features[7:14])
    raise CometError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def _hub_file(weights_enum: torchvision.models.WeightsEnum) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights_enum.url))


def _imagenet_state_dict(name: str, allow_download: bool) -> tuple[dict | None, str]:
    """torchvision's ImageNet weights from the hub cache (or a download when allowed), else None."""
    weights_enum = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    cached = _hub_file(weights_enum)
    if os.path.exists(cached):
        return torch.load(cached, map_location="cpu", weights_only=True), cached
    if not allow_download:
        return None, f"not in the torch hub cache ({cached})"
    try:
        return weights_enum.get_state_dict(progress=False), weights_enum.url
    except Exception as exc:  # noqa: BLE001 - no network, proxy, hub down: all mean "no weights", handled loudly below
        return None, f"download failed ({type(exc).__name__}: {exc})"


def build_backbone(
    name: str, weights: str | None = None, pretrained: bool = True
) -> tuple[TwoStageBackbone, str]:
    """Build the frozen two-stage trunk; returns it with a short description of where weights came from."""
    if name not in BACKBONES:
        raise CometError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    # A fixed seed makes a randomly initialised trunk the same in every process and every later
    # predict/evaluate call, so checkpoints trained on random features stay usable.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None)
    source = "random init"
    if weights:
        if not os.path.exists(weights):
            raise CometError(f"weights file not found: {weights}")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - a bad weights file is one line
            raise CometError(f"cannot load backbone weights {weights}: {exc}") from None
        source = weights
    elif pretrained:
        allow_download = os.environ.get("COMET_RAY_OFFLINE", "") not in ("1", "true", "yes")
        state, where = _imagenet_state_dict(name, allow_download)
        if state is None:
            message = (
                f"ImageNet weights for {name} are unavailable ({where}); using RANDOM initialisation. "
                "Anomaly scores will be much weaker. Pass --weights PATH or put torchvision's file in "
                "$TORCH_HOME/hub/checkpoints/."
            )
            warnings.warn(message, stacklevel=2)
            log.warning(message)
        else:
            model.load_state_dict(state)
            source = where
    trunk = _cut(name, model).eval()
    for parameter in trunk.parameters():
        parameter.requires_grad_(False)
    return trunk, source
