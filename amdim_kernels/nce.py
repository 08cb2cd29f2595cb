"""The public fused losses (AMDIM NCE and the DIM estimators, the mixture NCE loss), and the single
dispatch point to their backends."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _validate
from .reference import (check_estimator, check_mixture_inputs, mixture_nce_loss_reference,
                        nce_loss_reference, softplus)

BACKENDS = ("auto", "cpp", "triton", "reference")
_FUSED_DEVICE = {"cpp": "cpu", "triton": "cuda"}   # where each fused backend runs


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map backend="auto" to the fastest backend for `device`; reject what cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        fused = [name for name, dev in _FUSED_DEVICE.items() if dev == device.type]
        if not fused:
            raise ValueError(f"no fused backend runs on {device.type} tensors; "
                             f"pass backend='reference'")
        backend = fused[0]
    if backend in _FUSED_DEVICE and device.type != _FUSED_DEVICE[backend]:
        raise ValueError(f"backend={backend!r} runs on {_FUSED_DEVICE[backend]} tensors, "
                         f"got tensors on {device}")
    if backend == "triton":
        from . import ops
        if not ops.HAS_TRITON_CUDA:
            raise ValueError(f"backend='triton' is unavailable: {ops.TRITON_CUDA_MISSING}")
    return backend


def nce_statistics(src, trg, pos_idx, tclip, neg_reduction):
    """(pos, neg_stat, sumsq) of the score matrix through the registered op (docs/design.md)."""
    from . import ops  # builds the extension on first use

    if src.device.type == "cpu" and src.dtype in (torch.float16, torch.bfloat16):
        src, trg = src.float(), trg.float()   # the CPU kernels accumulate in fp32 from fp32 tiles
    return ops.nce_fwd(src.contiguous(), trg.contiguous(), pos_idx, tclip, neg_reduction)


def fused_nce_loss(src, trg, pos_idx=None, *, tclip=20.0, reg_weight=0.05, estimator="nce",
                   backend="auto"):
    """AMDIM NCE loss (shared/spec/losses.md, section 1) without materialising N x M scores, or with
    estimator="jsd" / "dv" the DIM estimators of section 4 over the same pairs, fused the same way.

    A drop-in for nce_loss_reference. src: (N, D); trg: (B, L, D); pos_idx: (N,) ints in [0, B),
    or None when N == B. Returns (loss, lgt_reg): 0-dim float32 tensors (float64 for float64
    inputs), differentiable with respect to src and trg. With B == 1 (no negative pairs) "nce"
    gives 0, "jsd" keeps only its positive term and "dv" raises ValueError.
    """
    # the fused kernels only compare pos_idx with column samples: its range is checked afterwards
    given_pos_idx = pos_idx is not None
    pos_idx = _validate.check_nce_inputs(src, trg, pos_idx, tclip, reg_weight,
                                         check_range=backend == "reference")
    check_estimator(estimator, trg.shape[0])
    backend = resolve_backend(backend, src.device)
    if backend == "reference":
        return nce_loss_reference(src, trg, pos_idx, tclip=tclip, reg_weight=reg_weight,
                                  estimator=estimator)
    neg_reduction = "softplus_sum" if estimator == "jsd" else "logsumexp"
    pos, neg_stat, sumsq = nce_statistics(src, trg, pos_idx, tclip, neg_reduction)
    _validate.check_fused_outputs(pos_idx if given_pos_idx else None, trg.shape[0], sumsq,
                                  src=src, trg=trg)
    loss = estimator_loss(estimator, pos, neg_stat, trg.shape[0])
    lgt_reg = sumsq * (reg_weight / (trg.shape[0] * pos.numel()))
    return loss, lgt_reg


def estimator_loss(estimator, pos, neg_stat, b):
    """The loss of `estimator` from nce_fwd's (pos (N, L), neg_stat (N,)) for B target samples;
    neg_stat is the negatives' logsumexp ("nce", "dv") or softplus sum ("jsd") per row."""
    if estimator == "nce":
        return F.softplus(neg_stat[:, None] - pos).mean()
    n_neg_pairs = pos.numel() * (b - 1)
    if estimator == "jsd":   # the mean over no negative pairs (B == 1) counts as 0
        return softplus(-pos).mean() + neg_stat.sum() / max(n_neg_pairs, 1)
    # "dv": the global log-mean-exp of the negatives is a logsumexp of the row logsumexps
    return -(pos.mean() - (torch.logsumexp(neg_stat, dim=0) - math.log(n_neg_pairs)))


def fused_mixture_nce_loss(src_mix, trg, pos_idx=None, *, tau=1.0, alpha=None, detach_q=True,
                           tclip=20.0, reg_weight=0.05, backend="auto"):
    """Mixture NCE loss (spec section 3) without materialising N*k x M scores.

    A drop-in for mixture_nce_loss_reference. src_mix: (N, k, D), k mixture components per source;
    trg, pos_idx as in fused_nce_loss. Each component is scored with its own negatives, giving
    nce_j[i, l]; q = softmax over j of tau * nce_j; loss = -mean over (i, l) of
    (sum_j q_j nce_j + alpha * H(q)), alpha = 1 / tau when None (q is then the optimal q).
    detach_q=True treats q as a constant in the backward; False differentiates through it.
    lgt_reg = reg_weight * mean of a^2 over all N * k * B * L component scores a.
    k = 1 gives exactly fused_nce_loss.
    """
    pos_idx, alpha = check_mixture_inputs(src_mix, trg, pos_idx, tau, alpha, detach_q, tclip,
                                          reg_weight)
    backend = resolve_backend(backend, src_mix.device)
    if backend == "reference":
        return mixture_nce_loss_reference(src_mix, trg, pos_idx, tau=tau, alpha=alpha,
                                          detach_q=detach_q, tclip=tclip, reg_weight=reg_weight)
    from . import mixture  # registers the epilogue ops (and builds the extension) on first use

    n, k, d = src_mix.shape
    # Component rows r = i*k + j go through the same tiled pass as plain sources.
    pos, lse_neg, sumsq = nce_statistics(src_mix.reshape(n * k, d), trg,
                                         pos_idx.repeat_interleave(k), tclip, "logsumexp")
    # check_mixture_inputs has checked the pos_idx range already
    _validate.check_fused_outputs(None, trg.shape[0], sumsq, src_mix=src_mix, trg=trg)
    loss = mixture.mixture_fwd(pos.view(n, k, -1), lse_neg.view(n, k), float(tau), alpha, detach_q)
    lgt_reg = sumsq * (reg_weight / (trg.shape[0] * pos.numel()))
    return loss, lgt_reg
