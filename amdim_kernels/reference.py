"""Plain PyTorch losses written straight from shared/spec/losses.md: the ground truth for every test.

These materialise the full N x B x L score tensor (several times over, once autograd keeps its
intermediates); they are for checking the fused kernels and for small problems.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _validate


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and output dtype: fp32, or fp64 for fp64 inputs (so gradcheck is meaningful)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def raw_scores(src: torch.Tensor, trg: torch.Tensor) -> torch.Tensor:
    """a[i, b, l] = <src[i], trg[b, l]> / sqrt(D), accumulated in fp32 (fp64 for fp64 inputs)."""
    acc = acc_dtype(src.dtype)
    b, l, d = trg.shape
    a = src.to(acc) @ trg.to(acc).reshape(b * l, d).T
    return (a / math.sqrt(d)).view(src.shape[0], b, l)


def soft_clip(a: torch.Tensor, tclip: float | None) -> torch.Tensor:
    return a if tclip is None else tclip * torch.tanh(a / tclip)


def nce_loss_reference(src, trg, pos_idx=None, *, tclip=20.0, reg_weight=0.05):
    """AMDIM NCE loss (spec section 1). Returns (loss, lgt_reg), 0-dim tensors.

    src: (N, D); trg: (B, L, D); pos_idx: (N,) ints in [0, B), or None for N == B.
    """
    pos_idx = _validate.check_nce_inputs(src, trg, pos_idx, tclip, reg_weight)
    n = src.shape[0]
    b = trg.shape[0]
    a = raw_scores(src, trg)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(a).all()):
        _validate.raise_non_finite(src=src, trg=trg)
    lgt_reg = reg_weight * a.square().mean()
    s = soft_clip(a, tclip)
    rows = torch.arange(n, device=src.device)
    pos = s[rows, pos_idx]                                            # (N, L)
    if b == 1:   # no negatives: Z = -inf, and the loss term is 0 with zero gradient
        lse_neg = torch.full((n,), -math.inf, dtype=s.dtype, device=s.device)
    else:
        is_pos = F.one_hot(pos_idx, b).bool()[:, :, None]            # (N, B, 1)
        lse_neg = s.masked_fill(is_pos, -math.inf).reshape(n, -1).logsumexp(dim=1)
    loss = F.softplus(lse_neg[:, None] - pos).mean()
    return loss, lgt_reg
