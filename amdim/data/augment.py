"""Batched augmentation on the model's device: the official policies of AMDIM and DIM.

A `Policy` says how one view of an image is drawn (the official pipelines, torchvision transforms on
PIL images there, written here as batched tensor operations):

- a horizontal flip (p_flip), drawn once per image and shared by all its views (AMDIM flips before
  drawing its two views);
- a crop: "translate" (amdim-public's RandomTranslateWithReflect: an integer shift of up to
  max_translate px per axis, the uncovered border filled by reflection, applied with p_translate),
  "resized" (torchvision's RandomResizedCrop: area fraction in `scale`, log-uniform aspect ratio in
  `ratio`, up to 10 tries, then a central crop; resampled to the encoder size) or "none";
- colour jitter with probability p_jitter: brightness, contrast, saturation and hue factors
  (torchvision's ColorJitter(b, c, s, h)) applied in a random order per image, hue as a shift of
  the HSV hue by up to h of a turn;
- grayscale with probability p_gray.

`eval_view` is the un-augmented view of evaluation (and of DIM's training on plain images): the
shorter side resized to eval_resize * size, then the central size x size crop (amdim-public's
Resize(70) + CenterCrop(64) for STL-10, Resize(146) + CenterCrop(128) for ImageNet).

All randomness comes from one torch.Generator, so a run can be resumed exactly; parameters are drawn
for the GLOBAL batch and sliced per rank, so K processes augment exactly as one process on the global
batch would. Resampling uses grid_sample (bicubic for AMDIM's crops, as amdim-public's INTERP = 3;
bilinear for DIM's), without the antialiasing of PIL's resize: crops shrink by at most 1.5x on STL-10.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)   # ITU-R 601 luma, as PIL's convert("L")
CROPS = ("translate", "resized", "none")


@dataclass(frozen=True)
class Policy:
    crop: str = "translate"
    max_translate: int = 4
    p_translate: float = 0.8
    scale: tuple = (0.3, 1.0)         # resized crop: area as a fraction of the image
    ratio: tuple = (0.7, 1.4)         # resized crop: aspect ratio (w / h)
    interpolation: str = "bicubic"    # resized crop: grid_sample mode
    jitter: tuple | None = (0.4, 0.4, 0.4, 0.2)   # brightness, contrast, saturation, hue (turns)
    p_jitter: float = 0.8
    p_gray: float = 0.25
    p_flip: float = 0.5
    eval_resize: float = 1.0          # eval view: shorter side to eval_resize * size, central crop


POLICIES = {
    # amdim-public datasets.py TransformsC10 (CIFAR-10 and CIFAR-100)
    "amdim-cifar": Policy(),
    # amdim-public TransformsSTL10: RandomResizedCrop(64, (0.3, 1), (0.7, 1.4)); test Resize(70), CenterCrop(64)
    "amdim-stl": Policy(crop="resized", eval_resize=70 / 64),
    # amdim-public TransformsImageNet128: hue 0.1; test Resize(146), CenterCrop(128)
    "amdim-imagenet": Policy(crop="resized", jitter=(0.4, 0.4, 0.4, 0.1), eval_resize=146 / 128),
    # cortex torchvision_datasets.py, STL-10: RandomResizedCrop(64) (torchvision's defaults), flip;
    # test Resize(64)
    "dim-stl": Policy(crop="resized", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear",
                      jitter=None, p_gray=0.0),
    # the plain images (rdevon/DIM on CIFAR-10: no augmentation)
    "none": Policy(crop="none", jitter=None, p_gray=0.0, p_flip=0.0),
}


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1], grayscale expanded to 3 channels."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be a uint8 (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    x = images.float().div_(255.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Whole image to size x size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def as_float(images, device) -> torch.Tensor | list[torch.Tensor]:
    """uint8 images on `device` as floats in [0, 1] (see to_float): a (B, C, H, W) batch, or a list of
    (C, H, W) images of their own sizes (a folder's) as a list of (3, H, W)."""
    if isinstance(images, (list, tuple)):
        return [to_float(im[None].to(device))[0] for im in images]
    return to_float(images.to(device))


def eval_view(x, policy: Policy, size: int) -> torch.Tensor:
    """The evaluation views (B, 3, size, size) of float images x (a batch, or a list of images of
    their own sizes): shorter side resized to round(eval_resize * size), then the central size x size
    crop."""
    if isinstance(x, (list, tuple)):
        return torch.cat([eval_view(im[None], policy, size) for im in x])
    h, w = x.shape[-2:]
    side = round(policy.eval_resize * size)
    if (h, w) != (side, side) or side != size:
        new = (side, round(w * side / h)) if h <= w else (round(h * side / w), side)
        if new != (h, w):
            x = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x


def _uniform(n, lo, hi, g):
    return torch.rand(n, generator=g, device=g.device) * (hi - lo) + lo


# ---------------------------------------------------------------------------------------------
# crops

def translate(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift image b right by dx[b] and down by dy[b] pixels (|d| <= pad), the uncovered border
    filled by reflection (without repeating the edge pixel, as amdim-public's pasted mirror images)."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad,) * 4, mode="reflect")
    rows = (pad - dy)[:, None] + torch.arange(h, device=x.device)          # (b, h)
    cols = (pad - dx)[:, None] + torch.arange(w, device=x.device)          # (b, w)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def resized_crop_boxes(n: int, h, w, policy: Policy, g: torch.Generator, mine=slice(None)) -> torch.Tensor:
    """Crop boxes (top, left, height, width) in pixels, as torchvision's RandomResizedCrop draws
    them: 10 tries of an area fraction and a log-uniform aspect ratio, the first that fits;
    otherwise the largest central box whose ratio is clamped into `ratio`. The random numbers are
    drawn for n images and the rows `mine` kept; h, w: the image size, or a tensor of the kept
    images' sizes (images of their own sizes). Returns (rows of mine, 4)."""
    tries = 10
    u_area = torch.rand((n, tries), generator=g, device=g.device)[mine]
    u_ratio = torch.rand((n, tries), generator=g, device=g.device)[mine]
    u_top = torch.rand(n, generator=g, device=g.device)[mine]
    u_left = torch.rand(n, generator=g, device=g.device)[mine]
    h = torch.as_tensor(h, dtype=torch.float32, device=g.device).expand(len(u_top))
    w = torch.as_tensor(w, dtype=torch.float32, device=g.device).expand(len(u_top))
    lo, hi = policy.ratio
    area = (u_area * (policy.scale[1] - policy.scale[0]) + policy.scale[0]) * (h * w)[:, None]
    r = torch.exp(u_ratio * (math.log(hi) - math.log(lo)) + math.log(lo))
    cw = torch.sqrt(area * r).round()
    ch = torch.sqrt(area / r).round()
    fits = (cw > 0) & (cw <= w[:, None]) & (ch > 0) & (ch <= h[:, None])
    first = fits.float().argmax(1, keepdim=True)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    in_ratio = w / h
    fw = torch.where(in_ratio > hi, (h * hi).round(), w)
    fh = torch.where(in_ratio < lo, (w / lo).round(), h)
    fallback = ~fits.any(1)
    cw, ch = torch.where(fallback, fw, cw), torch.where(fallback, fh, ch)
    top = torch.where(fallback, ((h - ch) / 2).round(), torch.floor(u_top * (h - ch + 1)))
    left = torch.where(fallback, ((w - cw) / 2).round(), torch.floor(u_left * (w - cw + 1)))
    return torch.stack([top, left, ch, cw], 1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resample each pixel box (top, left, height, width) of x to size x size (mirrored where flip)."""
    b, _, h, w = x.shape
    top, left, ch, cw = boxes.to(x.dtype).unbind(1)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = cw / w * torch.where(flip, -1.0, 1.0).to(x.dtype)
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta, (b, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# colour

def gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, each in [0, 1] (hue in turns)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    grey = delta == 0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, 1.0), 0.0)
    d = torch.where(grey, 1.0, delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(grey, 0.0, (h / 6.0) % 1.0)
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # the (r, g, b) of each of the six sectors of the colour wheel
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v),
                                                     (t, p, v), (v, p, q))], 1)       # (B, 6, 3, H, W)
    return table.gather(1, i[:, None, None].expand(-1, 1, 3, -1, -1))[:, 0]


def shift_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Add `turns` (per image) to the HSV hue, as torchvision's adjust_hue."""
    hsv = rgb_to_hsv(x)
    hsv = torch.cat([(hsv[:, :1] + turns.view(-1, 1, 1, 1)) % 1.0, hsv[:, 1:]], 1)
    return hsv_to_rgb(hsv)


def brightness(x, f):
    return (x * f.view(-1, 1, 1, 1)).clamp(0, 1)


def contrast(x, f):
    mean = gray(x).mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * f.view(-1, 1, 1, 1) + mean).clamp(0, 1)


def saturation(x, f):
    g1 = gray(x)
    return ((x - g1) * f.view(-1, 1, 1, 1) + g1).clamp(0, 1)


def hue(x, f):
    return shift_hue(x, f).clamp(0, 1)


COLOUR_OPS = (brightness, contrast, saturation, hue)   # the order of ColorJitter's factors


class Jitter:
    """Colour jitter parameters for n images (torchvision ColorJitter.get_params): whether it
    applies (p_jitter), the four factors, the order of the four operations (a permutation per image),
    then grayscale (p_gray)."""

    def __init__(self, n, policy: Policy, g):
        b, c, s, h = policy.jitter or (0.0, 0.0, 0.0, 0.0)
        self.on = (torch.rand(n, generator=g, device=g.device) < policy.p_jitter) & (policy.jitter is not None)
        self.factors = torch.stack([_uniform(n, max(0.0, 1 - b), 1 + b, g), _uniform(n, max(0.0, 1 - c), 1 + c, g),
                                    _uniform(n, max(0.0, 1 - s), 1 + s, g), _uniform(n, -h, h, g)], 1)
        self.order = torch.rand((n, 4), generator=g, device=g.device).argsort(1)
        self.gray = torch.rand(n, generator=g, device=g.device) < policy.p_gray

    def apply(self, x, mine=slice(None)):
        on, factors, order, to_gray = self.on[mine], self.factors[mine].to(x.dtype), self.order[mine], self.gray[mine]
        x = x.clone()
        for k in range(4):
            for op_id, op in enumerate(COLOUR_OPS):
                rows = torch.nonzero(on & (order[:, k] == op_id))[:, 0]
                if len(rows):
                    x[rows] = op(x[rows], factors[rows, op_id])
        return torch.where(to_gray.view(-1, 1, 1, 1), gray(x).expand_as(x), x)


# ---------------------------------------------------------------------------------------------
# views

def views(images: torch.Tensor, policy: Policy, size: int, generator: torch.Generator,
          rank: int = 0, world: int = 1, count: int = 2) -> list[torch.Tensor]:
    """Return `count` augmented float views in [0, 1] of shape (b, 3, size, size), b = len(images).

    `images` (uint8 on any device: a (b, C, H, W) batch, or a list of b images of their own sizes)
    are this rank's rows of a global batch of b * world images; parameters are drawn for all
    b * world images and this rank's slice is applied. One horizontal flip per image is shared by
    all its views. Translations and plain views shift the evaluation view; resized crops are drawn
    from the full stored image."""
    if policy.crop not in CROPS:
        raise ValueError(f"policy.crop must be one of {CROPS}, got {policy.crop!r}")
    g = generator
    x = as_float(images, g.device)
    ragged = isinstance(x, list)
    b = len(x)
    n = b * world
    mine = slice(rank * b, (rank + 1) * b)
    flip = (torch.rand(n, generator=g, device=g.device) < policy.p_flip)[mine]
    if ragged:
        h = torch.tensor([im.shape[-2] for im in x], dtype=torch.float32)
        w = torch.tensor([im.shape[-1] for im in x], dtype=torch.float32)
    else:
        h, w = x.shape[-2:]
    if policy.crop != "resized":   # translations and plain views start from the evaluation view
        x = eval_view(x, policy, size)
    out = []
    for _ in range(count):
        if policy.crop == "resized":
            boxes = resized_crop_boxes(n, h, w, policy, g, mine)
            if ragged:
                v = torch.cat([crop_resize(im[None], boxes[i:i + 1], flip[i:i + 1], size, policy.interpolation)
                               for i, im in enumerate(x)])
            else:
                v = crop_resize(x, boxes, flip, size, policy.interpolation)
        else:
            v = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            if policy.crop == "translate":
                t = policy.max_translate
                on = torch.rand(n, generator=g, device=g.device) < policy.p_translate
                d = torch.randint(-t, t + 1, (n, 2), generator=g, device=g.device) * on[:, None]
                v = translate(v, d[mine, 0], d[mine, 1], t)
        out.append(Jitter(n, policy, g).apply(v, mine))
    return out
