"""The AMDIM encoder (Bachman et al. 2019) and the online classifiers trained beside it.

The residual blocks use no padding: every output location sees a fixed, fully valid receptive
field, so feature statistics do not depend on the position in the map and the 5x5 / 7x7 targets
of a positive pair do not see (almost) the whole image as the 1x1 source does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Normalize

ENCODER_SIZES = (32, 64, 128)


def maybe_bn(n: int, use_bn: bool) -> nn.Module:
    return nn.BatchNorm2d(n) if use_bn else nn.Identity()


class ConvBNReLU(nn.Module):
    """Stem convolution; padding (reflect) only where the 128 px stem needs to downsample evenly."""

    def __init__(self, n_in, n_out, kernel, stride, pad, use_bn):
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv2d(n_in, n_out, kernel, stride, 0, bias=not use_bn)
        self.bn = maybe_bn(n_out, use_bn)

    def forward(self, x):
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, mode="reflect")
        return F.relu(self.bn(self.conv(x)))


class ResNxN(nn.Module):
    """conv(width, stride) -> [BN] -> ReLU -> 1x1 conv, plus an unpadded shortcut (amdim-public's
    ConvResNxN: no normalisation after the 1x1 conv).

    The shortcut is an average pool with the same window (so it lines up with the valid conv),
    zero-padded in channels when the block widens, or a 1x1 conv when it narrows (an extension:
    amdim-public only widens). The 1x1 conv starts at zero (amdim-public's init_weights, a
    Fixup-style init): every block starts as its shortcut.
    """

    def __init__(self, n_in, n_out, width, stride, use_bn):
        super().__init__()
        self.n_in, self.n_out, self.width, self.stride = n_in, n_out, width, stride
        self.conv1 = nn.Conv2d(n_in, n_out, width, stride, 0, bias=False)
        self.bn1 = maybe_bn(n_out, use_bn)
        self.conv2 = nn.Conv2d(n_out, n_out, 1, bias=False)
        nn.init.zeros_(self.conv2.weight)
        self.narrow = nn.Conv2d(n_in, n_out, 1, bias=False) if n_out < n_in else None

    def forward(self, x):
        h = self.conv2(F.relu(self.bn1(self.conv1(x))))
        if self.narrow is not None:
            # the 1x1 conv must also shrink the map like conv1 does
            short = self.narrow(F.avg_pool2d(x, self.width, self.stride))
        else:
            short = F.avg_pool2d(x, self.width, self.stride) if (self.width, self.stride) != (1, 1) else x
            if self.n_out > self.n_in:
                short = F.pad(short, (0, 0, 0, 0, 0, self.n_out - self.n_in))
        return h + short


def res_block(n_in, n_out, width, stride, depth, use_bn) -> nn.Sequential:
    """One spatial ResNxN followed by depth - 1 pointwise ones."""
    layers = [ResNxN(n_in, n_out, width, stride, use_bn)]
    layers += [ResNxN(n_out, n_out, 1, 1, use_bn) for _ in range(depth - 1)]
    return nn.Sequential(*layers)


class RKHSEmbed(nn.Module):
    """Two-layer 1x1-conv MLP with a linear shortcut, mapping a feature map into n_rkhs dims.

    The residual branch starts at zero and the shortcut near the identity, so at initialisation
    the embedding is (close to) a linear read-out of the encoder features.
    """

    def __init__(self, n_in, n_rkhs, use_bn):
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_rkhs, 1, bias=False)
        self.bn1 = maybe_bn(n_rkhs, use_bn)
        self.conv2 = nn.Conv2d(n_rkhs, n_rkhs, 1, bias=False)
        self.shortcut = nn.Conv2d(n_in, n_rkhs, 1, bias=True)
        self.bn_out = nn.BatchNorm2d(n_rkhs)
        nn.init.zeros_(self.conv2.weight)
        if n_rkhs >= n_in:
            with torch.no_grad():
                w = self.shortcut.weight
                w.uniform_(-0.01, 0.01)
                w[torch.arange(n_in), torch.arange(n_in)] = 1.0

    def forward(self, x):
        h = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.bn_out(h + self.shortcut(x))


class Encoder(nn.Module):
    """AMDIM encoder for 32, 64 or 128 px inputs: returns (r1, r5, r7), each (B, n_rkhs, d, d).

    r1 is the final 1x1 layer itself (already n_rkhs wide); r5 and r7 are the last 5x5 and 7x7
    trunk activations passed through an RKHSEmbed.
    """

    def __init__(self, image_size=32, ndf=64, n_rkhs=512, n_depth=3, use_bn=False, in_channels=3):
        super().__init__()
        if image_size not in ENCODER_SIZES:
            raise ValueError(f"image_size must be one of {ENCODER_SIZES}, got {image_size!r}")
        for name, v in (("ndf", ndf), ("n_rkhs", n_rkhs), ("n_depth", n_depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.image_size, self.n_rkhs = image_size, n_rkhs
        c = ndf if image_size == 32 else 2 * ndf   # width of the 7x7 trunk is 4*c
        if image_size == 32:
            to7 = [ConvBNReLU(in_channels, ndf, 3, 1, 0, False),           # 30
                   ResNxN(ndf, ndf, 1, 1, use_bn),
                   res_block(ndf, 2 * ndf, 4, 2, n_depth, use_bn),         # 14
                   res_block(2 * ndf, 4 * ndf, 2, 2, n_depth, use_bn)]     # 7
        else:
            stem = [ConvBNReLU(in_channels, ndf, 3, 1, 0, False)]          # 64 -> 62
            if image_size == 128:   # 128 -> 64 (reflect-padded, stride 2) -> 62
                stem = [ConvBNReLU(in_channels, ndf, 5, 2, 2, False), ConvBNReLU(ndf, ndf, 3, 1, 0, False)]
            to7 = stem + [res_block(ndf, 2 * ndf, 4, 2, n_depth, use_bn),  # 30
                          res_block(2 * ndf, 4 * ndf, 4, 2, n_depth, use_bn),   # 14
                          res_block(4 * ndf, 8 * ndf, 2, 2, n_depth, use_bn)]   # 7
        w7 = 4 * c
        self.to7 = nn.Sequential(*to7, maybe_bn(w7, use_bn))
        self.to5 = res_block(w7, w7, 3, 1, n_depth, use_bn)
        self.to1 = nn.Sequential(res_block(w7, w7, 3, 1, n_depth, use_bn),   # 3
                                 ResNxN(w7, n_rkhs, 3, 1, use_bn),           # 1
                                 nn.BatchNorm2d(n_rkhs))
        self.embed5 = RKHSEmbed(w7, n_rkhs, use_bn)
        self.embed7 = RKHSEmbed(w7, n_rkhs, use_bn)

    def forward(self, x):
        if x.dim() != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"encoder input must be (B, C, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        h7 = self.to7(x)
        h5 = self.to5(h7)
        r1 = self.to1(h5)
        return r1, self.embed5(h5), self.embed7(h7)


class OnlineClassifiers(nn.Module):
    """MLP and linear classifiers on detached global features: they track representation quality
    during training without sending any gradient into the encoder. amdim-public's Evaluator: the
    MLP is dropout, linear (no bias), BN, ReLU, dropout, linear; the linear one a plain layer."""

    def __init__(self, n_in, n_classes, n_hidden=1024, dropout=0.2):
        super().__init__()
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(n_in, n_hidden, bias=False),
                                 nn.BatchNorm1d(n_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(n_hidden, n_classes))
        self.linear = nn.Linear(n_in, n_classes)

    def forward(self, ftr) -> dict:
        ftr = ftr.detach().flatten(1)
        return {"mlp": self.mlp(ftr), "lin": self.linear(ftr)}


class MixtureHead(nn.Module):
    """m_k(f1) of AMDIM (sec. 3.5): k mixture components of the global feature, each f1 plus the
    output of a one-hidden-layer ReLU MLP (the residual keeps every component near f1 at first)."""

    def __init__(self, n_rkhs, k):
        super().__init__()
        self.k = k
        self.hidden = nn.Linear(n_rkhs, n_rkhs)
        self.out = nn.Linear(n_rkhs, k * n_rkhs)

    def forward(self, f1):
        n, d = f1.shape
        return f1[:, None] + self.out(F.relu(self.hidden(f1))).view(n, self.k, d)


class AMDIM(nn.Module):
    """Encoder plus online classifiers (and the mixture head when n_mix > 1); one module so DDP
    wraps, and checkpoints hold, all of them."""

    def __init__(self, image_size=32, ndf=64, n_rkhs=512, n_depth=3, use_bn=False, n_classes=10, n_mix=1):
        super().__init__()
        self.normalize = Normalize()
        self.encoder = Encoder(image_size, ndf, n_rkhs, n_depth, use_bn)
        self.classifiers = OnlineClassifiers(n_rkhs, n_classes) if n_classes > 0 else None
        self.mixture = MixtureHead(n_rkhs, n_mix) if n_mix > 1 else None

    def probe_features(self, x) -> dict:
        """{"r1": (B, n_rkhs)} global features of images x in [0, 1] for the linear probe."""
        return {"r1": self.encoder(self.normalize(x))[0].flatten(1)}

    def online_logits(self, x) -> dict:
        """{"mlp", "lin"} logits of the online classifiers for images x in [0, 1]."""
        return self.classifiers(self.encoder(self.normalize(x))[0])

    def forward(self, x1, x2):
        """Encode each view (images in [0, 1]) in its own pass, so that each is its own batch for
        BatchNorm (amdim-public encodes x1 and x2 in two calls); classify both views' global features.

        Returns (feats of x1, feats of x2), {"mlp", "lin"} logits of the 2B rows [x1; x2];
        feats is (r1, r5, r7), plus the (B, k, n_rkhs) mixture components of r1 when n_mix > 1."""
        feats = []
        for x in (x1, x2):
            r1, r5, r7 = self.encoder(self.normalize(x))
            feats.append((r1, r5, r7) + ((self.mixture(r1.flatten(1)),) if self.mixture is not None else ()))
        logits = (self.classifiers(torch.cat([feats[0][0], feats[1][0]]))
                  if self.classifiers is not None else None)
        return (feats[0], feats[1]), logits
