"""SimpleNet's patch aggregation: local 3x3 neighbourhoods of two backbone stages, pooled to one vector.

Per stage: each position takes its 3x3 neighbourhood (``unfold``, stride 1, padding 1) and the resulting
``C*9`` vector is adaptive-average-pooled to ``pre_dim``; the coarser stage is upsampled bilinearly to the
finer stage's grid; the per-stage vectors are concatenated and pooled again to ``feature_dim``.

SimpleNet upsamples the unfolded ``C*9`` maps before pooling. Channel pooling and spatial bilinear
interpolation are both linear and act on different axes, so they commute: pooling first gives the same
numbers while moving ``pre_dim / (C*9)`` of the data through the interpolation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pool_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling along the last axis: [..., L] -> [..., dim]."""
    shape = x.shape
    return F.adaptive_avg_pool1d(x.reshape(-1, 1, shape[-1]), dim).reshape(*shape[:-1], dim)


def aggregate_patches(feature_maps: list[torch.Tensor], pre_dim: int, feature_dim: int) -> torch.Tensor:
    """[B, C_i, H_i, W_i] per stage -> patch features [B, H_0 * W_0, feature_dim] on the first stage's grid."""
    batch, _, height, width = feature_maps[0].shape
    per_stage = []
    for fmap in feature_maps:
        _, _, h, w = fmap.shape
        patches = F.unfold(fmap.float(), kernel_size=3, padding=1)  # [B, C*9, h*w], C-major like SimpleNet
        pooled = _pool_channels(patches.transpose(1, 2), pre_dim)  # [B, h*w, pre_dim]
        if (h, w) != (height, width):
            grid = pooled.transpose(1, 2).reshape(batch, pre_dim, h, w)
            grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
            pooled = grid.reshape(batch, pre_dim, height * width).transpose(1, 2)
        per_stage.append(pooled)
    stacked = torch.cat(per_stage, dim=-1)  # [B, P, n_stages * pre_dim]
    return _pool_channels(stacked, feature_dim)
