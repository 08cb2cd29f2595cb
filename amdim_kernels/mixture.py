"""Registration of the mixture-q epilogue ops (csrc/mixture.cpp) with torch.library: fake kernels,
the autograd formula, and the Triton kernels as their CUDA kernels.

    amdim_kernels::mixture_fwd(Tensor pos, Tensor neg_stat, float tau, float alpha, bool detach_q)
        -> Tensor loss
    amdim_kernels::mixture_bwd(Tensor grad_loss, Tensor pos, Tensor neg_stat, float tau,
                               float alpha, bool detach_q) -> (Tensor grad_pos, Tensor grad_neg_stat)

pos (N, k, L) and neg_stat (N, k) are nce_fwd's outputs for the N*k component rows (logsumexp
negatives). detach_q changes only the gradient, but it is an argument of mixture_fwd so that the
autograd formula can see it. The epilogue's backward is its own op rather than torch code so that
it is one pass over the O(N*k*L) statistics on either device (docs/design.md has the formula).
"""
from __future__ import annotations

import torch

from . import ops  # builds the extension, whose csrc/mixture.cpp defines the schemas

mixture_fwd = torch.ops.amdim_kernels.mixture_fwd
mixture_bwd = torch.ops.amdim_kernels.mixture_bwd


@torch.library.register_fake("amdim_kernels::mixture_fwd")
def _mixture_fwd_fake(pos, neg_stat, tau, alpha, detach_q):
    return pos.new_empty(())


@torch.library.register_fake("amdim_kernels::mixture_bwd")
def _mixture_bwd_fake(grad_loss, pos, neg_stat, tau, alpha, detach_q):
    return torch.empty_like(pos), torch.empty_like(neg_stat)


def _setup_context(ctx, inputs, output):
    pos, neg_stat, tau, alpha, detach_q = inputs
    ctx.save_for_backward(pos, neg_stat)
    ctx.tau, ctx.alpha, ctx.detach_q = tau, alpha, detach_q


def _backward(ctx, grad_loss):
    pos, neg_stat = ctx.saved_tensors
    grad_pos, grad_neg_stat = mixture_bwd(grad_loss, pos, neg_stat, ctx.tau, ctx.alpha, ctx.detach_q)
    return grad_pos, grad_neg_stat, None, None, None


torch.library.register_autograd("amdim_kernels::mixture_fwd", _backward, setup_context=_setup_context)

# The CUDA kernels follow nce_fwd's: Triton, where the Triton nce_fwd could be registered.
if ops.HAS_TRITON_CUDA:
    from .triton_mixture import mixture_bwd_triton, mixture_fwd_triton

    torch.library.register_kernel("amdim_kernels::mixture_fwd", "cuda", mixture_fwd_triton)
    torch.library.register_kernel("amdim_kernels::mixture_bwd", "cuda", mixture_bwd_triton)
