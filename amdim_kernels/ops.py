"""Registration of the fused ops with torch.library: fake (meta) kernels and the autograd formula.

The schemas and the CPU/CUDA kernels come from the C++ extension (csrc/); the Triton forward is
registered here as the CUDA kernel of nce_fwd when Triton is importable.
"""
from __future__ import annotations

import torch

from . import _extension
from .reference import acc_dtype

_extension.load()
nce_fwd = torch.ops.amdim_kernels.nce_fwd
nce_bwd = torch.ops.amdim_kernels.nce_bwd


@torch.library.register_fake("amdim_kernels::nce_fwd")
def _nce_fwd_fake(src, trg, pos_idx, tclip, neg_reduction):
    opts = dict(dtype=acc_dtype(src.dtype), device=src.device)
    return (src.new_empty((src.shape[0], trg.shape[1]), **opts),
            src.new_empty((src.shape[0],), **opts),
            src.new_empty((), **opts))


@torch.library.register_fake("amdim_kernels::nce_bwd")
def _nce_bwd_fake(grad_pos, grad_neg_stat, grad_sumsq, src, trg, pos_idx, neg_stat, tclip,
                  neg_reduction):
    return torch.empty_like(src), torch.empty_like(trg)


def _setup_context(ctx, inputs, output):
    src, trg, pos_idx, tclip, neg_reduction = inputs
    ctx.save_for_backward(src, trg, pos_idx, output[1])
    ctx.tclip, ctx.neg_reduction = tclip, neg_reduction


def _backward(ctx, grad_pos, grad_neg_stat, grad_sumsq):
    src, trg, pos_idx, neg_stat = ctx.saved_tensors
    # An output that did not reach the loss has no gradient: it contributes zero.
    if grad_pos is None:
        grad_pos = neg_stat.new_zeros(neg_stat.shape[0], trg.shape[1])
    grad_neg_stat = torch.zeros_like(neg_stat) if grad_neg_stat is None else grad_neg_stat
    grad_sumsq = neg_stat.new_zeros(()) if grad_sumsq is None else grad_sumsq
    grad_src, grad_trg = nce_bwd(grad_pos.contiguous(), grad_neg_stat.contiguous(), grad_sumsq,
                                 src, trg, pos_idx, neg_stat, ctx.tclip, ctx.neg_reduction)
    return grad_src, grad_trg, None, None, None


torch.library.register_autograd("amdim_kernels::nce_fwd", _backward, setup_context=_setup_context)


def _register_triton_cuda() -> str | None:
    """Make the Triton forward the CUDA kernel of nce_fwd; return why not, or None on success."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _extension.cuda_buildable():
        return "the CUDA gradient kernel cannot be built (torch without CUDA, or no nvcc/CUDA_HOME)"
    try:
        from .triton_nce_fwd import nce_fwd_triton
    except ImportError as err:
        return f"triton is not importable ({err})"
    torch.library.register_kernel("amdim_kernels::nce_fwd", "cuda", nce_fwd_triton)
    return None


TRITON_CUDA_MISSING = _register_triton_cuda()
HAS_TRITON_CUDA = TRITON_CUDA_MISSING is None
