"""From patch scores to image scores and pixel anomaly maps (shared by every detector)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def image_scores(patch_scores: torch.Tensor) -> torch.Tensor:
    """SimpleNet's image score: the maximum patch score. [N, P] -> [N]."""
    return patch_scores.max(dim=1).values


def topk_mean(patch_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of each image's k highest patch scores; steadier than the max for confidence weighting."""
    k = max(1, min(k, patch_scores.shape[1]))
    return patch_scores.topk(k, dim=1).values.mean(dim=1)


def gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = math.ceil(4 * sigma)
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def anomaly_maps(
    patch_scores: torch.Tensor, grid: tuple[int, int], size: int, sigma: float = 4.0, chunk: int = 32
) -> torch.Tensor:
    """[N, P] patch scores -> [N, size, size] maps: bilinear upsampling then a separable Gaussian blur."""
    kernel = gaussian_kernel(sigma, patch_scores.device)
    pad = kernel.numel() // 2
    out = []
    for start in range(0, patch_scores.shape[0], chunk):
        block = patch_scores[start : start + chunk].float().reshape(-1, 1, *grid)
        block = F.interpolate(block, size=(size, size), mode="bilinear", align_corners=False)
        block = F.pad(block, (pad, pad, pad, pad), mode="reflect")
        block = F.conv2d(block, kernel.view(1, 1, 1, -1))
        block = F.conv2d(block, kernel.view(1, 1, -1, 1))
        out.append(block[:, 0])
    if not out:
        return torch.zeros(0, size, size, device=patch_scores.device)
    return torch.cat(out)
