"""Instance normalization per sample and variate (RevIN without the affine part).

Statistics are taken over time and detached; ``denormalize`` is the exact inverse.
"""

from __future__ import annotations

import torch

EPS = 1e-5


def normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, T, N] -> (x_norm [B, T, N], mean [B, 1, N], std [B, 1, N])."""
    mean = x.mean(dim=1, keepdim=True).detach()
    std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + EPS).detach()
    return (x - mean) / std, mean, std


def denormalize(y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """y [B, H, N] in normalized units -> the input's units."""
    return y * std + mean
