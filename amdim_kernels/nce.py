"""fused_nce_loss: the public fused AMDIM NCE loss, and the single dispatch point to its backends."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _validate
from .reference import nce_loss_reference

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


def fused_nce_loss(src, trg, pos_idx=None, *, tclip=20.0, reg_weight=0.05, backend="auto"):
    """AMDIM NCE loss (shared/spec/losses.md, section 1) without materialising N x M scores.

    A drop-in for nce_loss_reference. src: (N, D); trg: (B, L, D); pos_idx: (N,) ints in [0, B),
    or None when N == B. Returns (loss, lgt_reg): 0-dim float32 tensors (float64 for float64
    inputs), differentiable with respect to src and trg.
    """
    pos_idx = _validate.check_nce_inputs(src, trg, pos_idx, tclip, reg_weight)
    backend = resolve_backend(backend, src.device)
    if backend == "reference":
        return nce_loss_reference(src, trg, pos_idx, tclip=tclip, reg_weight=reg_weight)
    pos, lse_neg, sumsq = nce_statistics(src, trg, pos_idx, tclip, "logsumexp")
    _validate.check_finite_scores(sumsq, src=src, trg=trg)
    loss = F.softplus(lse_neg[:, None] - pos).mean()
    lgt_reg = sumsq * (reg_weight / pos.new_tensor(trg.shape[0] * pos.numel()))
    return loss, lgt_reg
