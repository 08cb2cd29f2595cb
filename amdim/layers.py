"""Layers both methods' models share."""
from __future__ import annotations

import torch
import torch.nn as nn


class Normalize(nn.Module):
    """Per-channel input normalisation whose statistics are buffers of the model: they travel with
    its state_dict (checkpoints, DDP). AMDIM sets them once from the training images (`set_stats`,
    amdim-public's per-dataset constants are those statistics); DIM keeps cortex's fixed 0.5, 0.5."""

    def __init__(self, channels: int = 3, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.register_buffer("mean", torch.full((1, channels, 1, 1), float(mean)))
        self.register_buffer("std", torch.full((1, channels, 1, 1), float(std)))

    @torch.no_grad()
    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.reshape(self.mean.shape))
        self.std.copy_(std.reshape(self.std.shape).clamp(min=1e-3))

    def forward(self, x):
        return (x - self.mean) / self.std
