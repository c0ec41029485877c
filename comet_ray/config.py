"""Every knob of a comet-ray run, as plain dataclasses.

This is the one place the CLI, the Ray jobs and the Tune search space map onto. Defaults are the
paper's (see ``docs/comet-method.md``); smaller backbones, image sizes and schedules make CPU runs quick.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from comet_ray.errors import CometError

if TYPE_CHECKING:
    import torch

STRATEGIES: tuple[str, ...] = ("baseline", "scl", "meta", "comet")
# The training-free knn reference takes no gradient step: SCL can choose its memory bank (comet/bank_confidence.py),
# the meta phase has nothing to adapt.
TRAINING_FREE = {"knn": ("baseline", "scl")}


def check_strategy(model: str, strategy: str) -> None:
    """One line when ``strategy`` does not apply to ``model``."""
    allowed = TRAINING_FREE.get(model)
    if allowed is not None and strategy not in allowed:
        raise CometError(
            f"--model {model} is training-free: --strategy {strategy} needs a trained model; use "
            "baseline (every training patch may enter the memory bank) or scl (the images SCL's "
            "fence flags are left out of it)"
        )


@dataclass
class FeatureConfig:
    """Frozen backbone and SimpleNet patch aggregation."""

    backbone: str = "wide_resnet50_2"
    image_size: int = 288
    # Width of the aggregated patch vector; None = the backbone's default (1536 for WRN50, as in the paper).
    feature_dim: int | None = None
    # Explicit ImageNet weights file; None = torchvision's hub cache (random init, loudly, when absent).
    weights: str | None = None
    pretrained: bool = True
    batch_size: int = 16
    # Storage dtype of cached features; float16 halves memory at no measurable cost in AUROC.
    cache_dtype: str = "float16"


@dataclass
class ModelConfig:
    """The detector head trained on cached features."""

    model: str = "simplenet"
    # SimpleNet. noise_std is relative to the training features' measured spread s (FeatureStore.scale, kept in
    # the model): eps ~ N(0, (noise_std * s)^2). Not the paper's absolute 0.015 (set for WideResNet-50's
    # features, about 0.03 in these units): see the README, "Base models and a reference".
    noise_std: float = 0.4
    margin: float = 0.5
    adaptor_lr: float = 1e-4
    discriminator_lr: float = 2e-4
    discriminator_hidden: int = 1024
    discriminator_weight_decay: float = 1e-5
    # Normalizing flow (used when model == "flow")
    flow_blocks: int = 4
    flow_hidden: int = 512
    flow_lr: float = 2e-4
    flow_clamp: float = 2.0
    flow_pos_dim: int = 32
    # kNN reference (model == "knn"): memory bank = this fraction of the training patches
    knn_bank_fraction: float = 0.1
    # auto (exact where affordable, else fast) | fast (per-part k-center, merged) | exact (PatchCore's
    # greedy k-center) | random
    knn_coreset: str = "auto"
    knn_search: str = "flat"  # flat (faiss, exact) | hnsw | ivf (approximate; models/search.py)


@dataclass
class CometConfig:
    """Soft Confident Learning and covariance-regularised meta-learning (method page, section 5)."""

    strategy: str = "comet"
    # SCL
    top_k: int = 10
    fence_k: float = 1.5
    weight_form: str = "hyperbolic"  # hyperbolic | exponential | hard
    temperature_scale: float = 1.0  # T = temperature_scale * IQR (exponential form)
    weight_floor: float = 0.0
    warmup_epochs: int = 1
    # Weigh single patches too, by the same fence over every training patch's score: a trained model's loss
    # weighs each patch; --model knn --strategy scl also leaves the patches beyond it out of the memory bank.
    patch_weighting: bool = False
    # --model knn --strategy scl: what an image SCL flags loses from the memory bank. "patches": its patches
    # beyond the patch fence (the fence over every training patch's leave-one-out distance), so its nominal
    # surface still covers the part (SoftPatch's rule); "images": the whole image.
    bank_leave_out: str = "patches"
    # What SCL scores the training images with: "model" (the current detector, the paper's definition) or
    # "knn" (each image's leave-one-out nearest-neighbour patch distance to the other training images).
    confidence_signal: str = "model"
    # Experiments only (needs contamination): the oracle bound of SCL. Every injected training image gets
    # weight 0 and every other one 1, from the first epoch, instead of the confidence weights.
    oracle_weights: bool = False
    # Meta phase
    meta_tasks: int = 4
    task_size: int = 8
    query_fraction: float = 0.3
    inner_steps: int = 5
    inner_lr: float = 1e-4
    # beta of theta += beta * mean(theta'_m - theta): worth 1-3 main-phase steps at these defaults (see meta.py)
    reptile_step: float = 0.5
    # lambda(Sigma): a window of `window` epochs, one (mean L_tr, mean L_val) pair each, standardised
    # per coordinate, so det Sigma = 1 - r^2 in [0, 1]; det_clip is the normaliser C of the squash
    # log(1 + min(det, C)) / log(1 + C): 1 spans [0, 1], smaller saturates lambda earlier.
    lambda0: float = 0.005
    gamma: float = 0.5
    window: int = 5
    det_clip: float = 1.0
    l2_include_norm_and_bias: bool = False
    # "fan_in": each matrix contributes ||W||^2 / fan_in (about 1 at Xavier init, whatever the width), so
    # lambda0 means the same for a 128- or 1536-wide head. "sum": the plain ||theta||^2 of the paper,
    # which for a 1536-wide SimpleNet is ~14 at init against a hinge loss of ~1 and swamps it.
    l2_normalisation: str = "fan_in"

    @property
    def uses_scl(self) -> bool:
        return self.strategy in ("scl", "comet")

    @property
    def uses_meta(self) -> bool:
        return self.strategy in ("meta", "comet")


@dataclass
class TrainConfig:
    """One training run on one category."""

    data_root: str = ""
    category: str = ""
    contamination: float = 0.0
    # seed: initialisation, batch order, task sampling and synthetic noise. split_seed: which anomalies
    # move into train and which test images form the validation split; None = seed. A sweep keeps the
    # split it selected a configuration on and repeats it over training seeds only.
    seed: int = 0
    split_seed: int | None = None
    epochs: int = 40
    passes: int = 4
    # A floor on the main phase's optimizer steps over the run: when epochs x passes x steps per pass falls
    # short (a 60-image set takes a tenth of a 600-image set's steps), every epoch takes more passes, so a
    # small category trains as long as a large one (comet/schedule.py). 0 = no floor.
    min_steps: int = 0
    # Before the final scoring, re-estimate BatchNorm's running statistics with the final model over one
    # pass of the training set (instead of the momentum average that lags the discriminator).
    bn_recalibrate: bool = True
    batch_size: int = 8
    # Data parallel: batch_size is per worker, so N workers make a global batch of N * batch_size and the
    # learning rates are scaled by this rule ("sqrt", "linear" or "none"; comet/trainer.py lr_scale).
    lr_scaling: str = "sqrt"
    validation_fraction: float = 0.3
    device: str = "auto"
    # Mixed precision of the detector head: "auto" = bf16 autocast on CUDA, float32 on CPU; "bf16"
    # forces bf16 autocast (CPU too, for parity checks); "fp32" disables it.
    precision: str = "auto"
    out: str = ""
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    comet: CometConfig = field(default_factory=CometConfig)

    @property
    def data_seed(self) -> int:
        """The seed of the contamination draw and the validation split."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        features = FeatureConfig(**data.pop("features", {}))
        model = ModelConfig(**data.pop("model", {}))
        comet = CometConfig(**data.pop("comet", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: v for k, v in data.items() if k in known}, features=features, model=model, comet=comet
        )


def use_bf16(precision: str, device_type: str) -> bool:
    """Whether the head runs under bf16 autocast for this precision setting and device."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a copy with dotted-or-flat keys overridden (``comet.fence_k`` or ``fence_k``).

    Tune trials and the CLI both speak in flat knob names; this resolves each to the one sub-config that
    owns it, so a typo fails loudly instead of silently doing nothing.
    """
    data = config.to_dict()
    sections = ("features", "model", "comet")
    for key, value in overrides.items():
        if "." in key:
            section, name = key.split(".", 1)
            if section not in sections or name not in data[section]:
                raise KeyError(f"unknown setting {key!r}")
            data[section][name] = value
            continue
        owners = [s for s in sections if key in data[s]]
        if key in data and key not in sections:
            data[key] = value
        elif len(owners) == 1:
            data[owners[0]][key] = value
        else:
            raise KeyError(f"unknown or ambiguous setting {key!r}")
    return TrainConfig.from_dict(data)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CometError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)
