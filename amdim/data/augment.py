"""Batched AMDIM augmentation on the model's device: two views per image.

Per view: random resized crop (scale and aspect ratio), colour jitter (brightness, contrast,
saturation, hue), random grayscale. The horizontal flip is drawn once per image and shared by both
views (AMDIM flips before drawing the views). All randomness comes from one torch.Generator so a
run can be resumed exactly; parameters are drawn for the GLOBAL batch and sliced per rank, so K
processes augment exactly as one process on the global batch would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    size: int = 32                  # output side (the encoder's input size)
    scale: tuple = (0.3, 1.0)       # crop area as a fraction of the image
    ratio: tuple = (3 / 4, 4 / 3)   # crop aspect ratio (w / h)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.125              # fraction of a full turn of the colour wheel
    p_gray: float = 0.25
    p_flip: float = 0.5


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1], grayscale expanded to 3 channels."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be a uint8 (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    x = images.float().div_(255.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Whole image to size x size (evaluation view)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _uniform(n, lo, hi, g):
    return torch.rand(n, generator=g, device=g.device) * (hi - lo) + lo


def crop_theta(n, cfg: AugmentConfig, flip: torch.Tensor, g) -> torch.Tensor:
    """Affine grids (n, 2, 3) for random resized crops in normalised coordinates.

    Crop sides follow torchvision's RandomResizedCrop (area fraction, log-uniform aspect ratio,
    clamped to the image); the flip is a sign on the x scale.
    """
    area = _uniform(n, *cfg.scale, g)
    log_r = _uniform(n, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), g)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=g, device=g.device) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g, device=g.device) * 2 - 1) * (1 - h)
    theta = torch.zeros(n, 2, 3, device=g.device)
    theta[:, 0, 0] = w * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    return theta


def gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `turns` (per image) in YIQ space: a rotation of the chroma (I, Q) plane."""
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           device=x.device, dtype=x.dtype)
    yiq2rgb = torch.linalg.inv(rgb2yiq)
    c, s = torch.cos(2 * math.pi * turns), torch.sin(2 * math.pi * turns)
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = yiq2rgb @ rot @ rgb2yiq                                      # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)


def views(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator,
          rank: int = 0, world: int = 1, count: int = 2) -> list[torch.Tensor]:
    """Return `count` augmented float views in [0, 1] of shape (b, 3, size, size), b = len(images).

    `images` are this rank's rows of a global batch of b * world images; parameters are drawn
    for all b * world images and this rank's slice is applied. One horizontal flip per image is
    shared by all its views.
    """
    x = to_float(images.to(generator.device))
    b = x.shape[0]
    n = b * world
    mine = slice(rank * b, (rank + 1) * b)
    flip = (torch.rand(n, generator=generator, device=generator.device) < cfg.p_flip)
    out = []
    for _ in range(count):
        theta = crop_theta(n, cfg, flip, generator)[mine]
        grid = F.affine_grid(theta, (b, 3, cfg.size, cfg.size), align_corners=False)
        v = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        out.append(Jitter(n, cfg, generator).apply(v, mine))
    return out


def two_views(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator,
              rank: int = 0, world: int = 1):
    """(x1, x2): the two views of AMDIM (see `views`)."""
    x1, x2 = views(images, cfg, generator, rank, world, 2)
    return x1, x2


class Jitter:
    """Colour jitter parameters for n images: brightness, contrast, saturation, hue (applied in
    that fixed order), then grayscale with probability p_gray."""

    def __init__(self, n, cfg: AugmentConfig, g):
        self.b = _uniform(n, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, g)
        self.c = _uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, g)
        self.s = _uniform(n, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, g)
        self.hue = _uniform(n, -cfg.hue, cfg.hue, g)
        self.gray = torch.rand(n, generator=g, device=g.device) < cfg.p_gray

    def apply(self, x, mine=slice(None)):
        k = x.shape[0]
        col = lambda t: t[mine].view(k, 1, 1, 1).to(x.dtype)
        x = (x * col(self.b)).clamp(0, 1)
        mean = gray(x).mean(dim=(2, 3), keepdim=True)
        x = ((x - mean) * col(self.c) + mean).clamp(0, 1)
        g1 = gray(x)
        x = ((x - g1) * col(self.s) + g1).clamp(0, 1)
        x = rotate_hue(x, self.hue[mine].to(x.dtype)).clamp(0, 1)
        return torch.where(self.gray[mine].view(k, 1, 1, 1), gray(x).expand_as(x), x)
