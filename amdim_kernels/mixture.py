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
    need_pos, need_neg_stat = ctx.needs_input_grad[:2]
    if not (need_pos or need_neg_stat):
        return None, None, None, None, None
    pos, neg_stat = ctx.saved_tensors
    args = (grad_loss, pos, neg_stat, ctx.tau, ctx.alpha, ctx.detach_q)
    # With create_graph=True (grad mode on here) the result must refuse a second backward.
    grad_pos, grad_neg_stat = (MixtureBackward.apply(*args) if torch.is_grad_enabled()
                               else mixture_bwd(*args))
    return (grad_pos if need_pos else None), (grad_neg_stat if need_neg_stat else None), None, None, None


torch.library.register_autograd("amdim_kernels::mixture_fwd", _backward, setup_context=_setup_context)
torch.library.register_autograd("amdim_kernels::mixture_bwd",
                                ops._no_second_derivative("amdim_kernels::mixture_bwd"),
                                setup_context=ops._setup_nothing)


class MixtureLoss(torch.autograd.Function):
    """mixture_fwd with its autograd formula, usable under torch.func transforms (see
    ops.NceStatistics)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(pos, neg_stat, tau, alpha, detach_q):
        return mixture_fwd(pos, neg_stat, tau, alpha, detach_q)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)
    jvp = staticmethod(ops._no_forward_mode("amdim_kernels::mixture_fwd"))


class MixtureBackward(torch.autograd.Function):
    """mixture_bwd where its result may be differentiated (create_graph=True): that raises."""
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return mixture_bwd(*args)

    setup_context = staticmethod(ops._setup_nothing)
    backward = staticmethod(ops._no_second_derivative("amdim_kernels::mixture_bwd"))


# The CUDA kernels follow nce_fwd's: Triton, where the Triton nce_fwd could be registered.
if ops.HAS_TRITON_CUDA:
    from .triton_mixture import mixture_bwd_triton, mixture_fwd_triton

    torch.library.register_kernel("amdim_kernels::mixture_fwd", "cuda", mixture_fwd_triton)
    torch.library.register_kernel("amdim_kernels::mixture_bwd", "cuda", mixture_bwd_triton)
