"""``comet-ray export``: backbone + patch aggregation + detector + anomaly maps as ONE graph.

:class:`ExportedDetector` maps an ImageNet-normalised image batch ``[B, 3, S, S]`` (exactly what
``comet_ray.data.images.preprocess_image`` produces) to ``(image scores [B], anomaly maps [B, S, S])``,
the same numbers ``predict`` computes in float32 on the CPU (features rounded to the cache dtype the
detector was trained and thresholded on, as ``predict`` does).

Every step is written with operators that ONNX and TorchScript both have:

* SimpleNet's aggregation (3x3 ``unfold`` then adaptive average pooling over channels) is linear in
  the feature map, so ``unfold`` + pooling of each stage is one ``conv2d`` with a fixed kernel, and the
  final pooling of the concatenated stages is one ``1x1`` convolution. Adaptive pooling to a width that
  does not divide the input (e.g. 288 -> 128) has no ONNX operator; as a fixed matrix it always works.
* The anomaly map's Gaussian blur (sigma 4) is reflect padding + two fixed separable ``conv2d``.

It is the export form of :class:`comet_ray.model.AnomalyModel` (built from one: the same trunk, detector,
grid and cache dtype), checked against it in ``tests/test_export.py`` and ``tests/test_one_path.py``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from comet_ray.atomic import atomic_path
from comet_ray.data.images import IMAGENET_MEAN, IMAGENET_STD
from comet_ray.errors import CometError
from comet_ray.model import AnomalyModel
from comet_ray.models.protocol import Detector

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "maps")
METADATA_KEY = "comet_ray"


def adaptive_pool_matrix(length: int, size: int) -> torch.Tensor:
    """``[length, size]`` matrix M with ``x @ M == adaptive_avg_pool1d(x, size)`` for ``x [..., length]``.

    Output bin ``i`` averages inputs ``floor(i * L / n) .. ceil((i + 1) * L / n) - 1``, PyTorch's rule.
    """
    matrix = torch.zeros(length, size, dtype=torch.float64)
    for i in range(size):
        start = (i * length) // size
        end = -((-(i + 1) * length) // size)
        matrix[start:end, i] = 1.0 / (end - start)
    return matrix.float()


class _StagePooling(nn.Module):
    """3x3 neighbourhood unfold + channel pooling of one backbone stage, as one fixed convolution.

    ``unfold`` orders the ``C * 9`` vector channel-major (``c * 9 + ky * 3 + kx``); pooling it with
    matrix ``M`` is ``conv2d`` with weight ``W[o, c, ky, kx] = M[c * 9 + ky * 3 + kx, o]``, padding 1.
    """

    def __init__(self, channels: int, pre_dim: int) -> None:
        super().__init__()
        matrix = adaptive_pool_matrix(channels * 9, pre_dim)  # [C*9, pre_dim]
        weight = matrix.t().reshape(pre_dim, channels, 3, 3).contiguous()
        self.register_buffer("weight", weight)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return F.conv2d(fmap.float(), self.weight, padding=1)


class ExportedDetector(nn.Module):
    """Images ``[B, 3, S, S]`` (normalised) -> ``(image scores [B], anomaly maps [B, S, S])``.

    Built from an :class:`~comet_ray.model.AnomalyModel` (:meth:`from_model`, :meth:`from_checkpoint`).
    Float32, eval mode, no autocast.
    """

    def __init__(
        self,
        trunk: nn.Module,
        detector: Detector,
        feature_dim: int,
        channels: tuple[int, ...],
        image_size: int,
        grid: tuple[int, int],
        sigma: float = 4.0,
        cache_dtype: str = "float16",
    ) -> None:
        super().__init__()
        from comet_ray.features.store import storage_dtype

        self.cache_dtype = storage_dtype(cache_dtype)
        from comet_ray.models.anomaly_map import gaussian_kernel

        self.trunk = trunk.float().eval()
        self.detector = detector.float().eval()
        self.image_size = int(image_size)
        self.grid = (int(grid[0]), int(grid[1]))
        self.feature_dim = int(feature_dim)
        self.stages = nn.ModuleList(_StagePooling(c, feature_dim) for c in channels)
        # Which stages need upsampling to the first stage's grid is fixed by the image size: decide it
        # here, once, so the traced graph holds no shape comparisons.
        with torch.no_grad():
            shapes = [
                tuple(m.shape[2:]) for m in self.trunk(torch.zeros(1, 3, self.image_size, self.image_size))
            ]
        self.resize = [shape != self.grid for shape in shapes]
        # Final pooling of the concatenated stages: [n_stages * pre_dim] -> feature_dim, a 1x1 conv.
        final = adaptive_pool_matrix(len(channels) * feature_dim, feature_dim)
        self.register_buffer(
            "final_weight", final.t().reshape(feature_dim, len(channels) * feature_dim, 1, 1).contiguous()
        )
        kernel = gaussian_kernel(sigma, torch.device("cpu"))
        self.pad = int(kernel.numel() // 2)
        self.register_buffer("blur_x", kernel.view(1, 1, 1, -1).clone())
        self.register_buffer("blur_y", kernel.view(1, 1, -1, 1).clone())
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    @classmethod
    def from_model(cls, model: AnomalyModel) -> ExportedDetector:
        """The export form of ``model`` (on the CPU): same backbone, detector, grid and cache dtype."""
        from comet_ray.features.backbone import BACKBONES

        extractor = model.extractor
        channels = BACKBONES[extractor.config.backbone].channels
        exported = cls(
            extractor.trunk,
            model.detector,
            extractor.feature_dim,
            channels,
            model.image_size,
            model.grid,
            cache_dtype=model.cache_dtype,
        )
        meta = model.meta
        exported.meta = {
            "threshold": float(meta["threshold"]),
            "nominal_score": float(meta["nominal_score"]),
            "image_size": model.image_size,
            "grid": list(meta["grid"]),
            "features": meta["features"],
            "model_name": meta["model_name"],
            "format_version": meta["format_version"],
        }
        return exported

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike) -> ExportedDetector:
        """Load ``model.pt`` (or a run folder) and rebuild the backbone it was trained on, on the CPU."""
        return cls.from_model(AnomalyModel.from_checkpoint(checkpoint, "cpu"))

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Same numbers as ``aggregate_patches(trunk(images))``: ``[B, P, feature_dim]``."""
        maps = self.trunk(images)
        pooled = []
        for fmap, stage, resize in zip(maps, self.stages, self.resize):
            grid = stage(fmap)  # [B, pre_dim, h, w]
            if resize:
                grid = F.interpolate(grid, size=self.grid, mode="bilinear", align_corners=False)
            pooled.append(grid)
        features = F.conv2d(torch.cat(pooled, dim=1), self.final_weight)  # [B, D, H, W]
        return features.flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.patch_features(images).to(self.cache_dtype).float()  # as the feature cache holds them
        patch = self.detector.patch_scores(features)  # [B, P]
        scores = patch.max(dim=1).values
        grid = patch.reshape(-1, 1, self.grid[0], self.grid[1])
        maps = F.interpolate(
            grid, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        maps = F.pad(maps, (self.pad, self.pad, self.pad, self.pad), mode="reflect")
        maps = F.conv2d(F.conv2d(maps, self.blur_x), self.blur_y)
        return scores, maps[:, 0]


def export_detector(
    checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str = "onnx", opset: int = 17
) -> Path:
    """Write the whole detector as one ONNX or TorchScript file; returns its path.

    The batch dimension is dynamic; the image size is the checkpoint's. The checkpoint's threshold,
    nominal score and preprocessing travel inside the file (ONNX ``metadata_props`` /
    TorchScript extra file ``comet_ray.json``).
    """
    if fmt not in FORMATS:
        raise CometError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _onnx_module()  # fail before the (slow) model build when the package is missing
    exported = ExportedDetector.from_checkpoint(checkpoint)
    size = exported.image_size
    example = torch.randn(2, 3, size, size)
    metadata = dict(
        exported.meta,
        input=INPUT_NAME,
        outputs=list(OUTPUT_NAMES),
        input_layout="[B, 3, S, S] float32, RGB, ImageNet mean/std normalised",
        normalisation={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    )
    with atomic_path(out) as tmp:
        if fmt == "torchscript":
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
                traced = torch.jit.trace(exported, example, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})
        else:
            _export_onnx(exported, example, tmp, opset, metadata)
    return Path(out)


def _onnx_module():
    try:
        import onnx
    except ImportError:  # torch's ONNX exporter needs it too
        raise CometError(
            "ONNX export needs the onnx package (pip install onnx); "
            "--format torchscript needs nothing beyond torch"
        ) from None
    return onnx


def _export_onnx(
    exported: ExportedDetector, example: torch.Tensor, path: Path, opset: int, metadata: dict
) -> None:
    onnx = _onnx_module()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
        torch.onnx.export(
            exported,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                INPUT_NAME: {0: "batch"},
                OUTPUT_NAMES[0]: {0: "batch"},
                OUTPUT_NAMES[1]: {0: "batch"},
            },
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(proto, str(path))
