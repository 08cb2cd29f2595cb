"""The whole NCE-family loss as one op, for the non-strict CUDA path (few launches: the host, not
the GPU, bounds the loss at AMDIM's per-GPU sizes; docs/design.md):

    amdim_kernels::nce_loss(Tensor src, Tensor trg, Tensor pos_idx, float? tclip, float reg_weight,
                            str estimator, bool check_range)
        -> (Tensor loss, Tensor lgt_reg, Tensor pos, Tensor neg_stat, Tensor bad)
    amdim_kernels::nce_loss_bwd(Tensor grad_loss, Tensor grad_reg, Tensor src, Tensor trg,
                                Tensor pos_idx, Tensor pos, Tensor neg_stat, Tensor bad,
                                float? tclip, float reg_weight, str estimator)
        -> (Tensor grad_src, Tensor grad_trg)

loss and lgt_reg are those of fused_nce_loss, already NaN where `bad` (0-dim bool: a score not
finite, or with check_range a pos_idx outside [0, B)); pos and neg_stat are nce_fwd's, kept for
the backward (not differentiable: the backward takes gradients of loss and lgt_reg only). The CUDA kernels are Triton (triton_nce_loss.py). The CPU kernels compose nce_fwd /
nce_bwd with the torch epilogue of amdim_kernels/nce.py (estimator_loss, regulariser), the one
source of the epilogue's math, which the Triton kernels are tested against; the losses take this
op on CUDA only. Its finiteness flag on the CPU is the bound-based one of _validate (the CPU
kernel's sum of a^2 is Inf, not NaN, for an infinite score).
"""
from __future__ import annotations

import torch

from . import _validate, ops
from .triton_nce_loss import nce_loss_bwd_cuda, nce_loss_cuda

torch.library.define(
    "amdim_kernels::nce_loss",
    "(Tensor src, Tensor trg, Tensor pos_idx, float? tclip, float reg_weight, str estimator, "
    "bool check_range) -> (Tensor loss, Tensor lgt_reg, Tensor pos, Tensor neg_stat, Tensor bad)")
torch.library.define(
    "amdim_kernels::nce_loss_bwd",
    "(Tensor grad_loss, Tensor grad_reg, Tensor src, Tensor trg, Tensor pos_idx, Tensor pos, "
    "Tensor neg_stat, Tensor bad, float? tclip, float reg_weight, str estimator) "
    "-> (Tensor grad_src, Tensor grad_trg)")
nce_loss = torch.ops.amdim_kernels.nce_loss
nce_loss_bwd = torch.ops.amdim_kernels.nce_loss_bwd


@torch.library.impl("amdim_kernels::nce_loss", "cpu")
def _nce_loss_cpu(src, trg, pos_idx, tclip, reg_weight, estimator, check_range):
    from .nce import estimator_loss
    s, t = ops.cpu_kernel_inputs(src, trg)
    pos, neg_stat, sumsq = ops.nce_fwd(s, t, pos_idx, tclip, _validate.NEG_REDUCTION[estimator])
    b = trg.shape[0]
    bad = _validate.score_flag(sumsq, src, trg)
    if check_range:
        bad = bad | _validate.range_flag(pos_idx, b)
    loss = estimator_loss(estimator, pos, neg_stat, b)
    lgt_reg = _validate.regulariser(sumsq / (b * pos.numel()), reg_weight)
    loss, lgt_reg = _validate.poison((loss, lgt_reg), bad)
    return loss, lgt_reg, pos, neg_stat, bad


def epilogue_grads(estimator: str, pos, neg_stat, b: int, reg_weight: float, grad_loss, grad_reg):
    """(grad_pos, grad_neg_stat, grad_sumsq) of nce.estimator_loss and lgt_reg = reg_weight *
    sumsq / (N*B*L) (written out: an op's kernel runs below autograd); tests check it against
    autograd of estimator_loss."""
    n, l = pos.shape
    n_neg = pos.numel() * (b - 1)
    if estimator == "nce":       # d softplus(Z - P) = sigmoid(Z - P) (dZ - dP)
        w = torch.sigmoid(neg_stat[:, None] - pos) * (grad_loss / (n * l))
        grad_pos, grad_neg = -w, w.sum(1)
    elif estimator == "jsd":
        grad_pos = -torch.sigmoid(-pos) * (grad_loss / (n * l))
        grad_neg = (grad_loss / max(n_neg, 1)).expand(n).clone()
    else:
        grad_pos = (-grad_loss / (n * l)).expand(n, l).clone()
        grad_neg = grad_loss * torch.softmax(neg_stat, 0)
    return grad_pos, grad_neg, (grad_reg * (reg_weight / (n * b * l))).reshape(1)


@torch.library.impl("amdim_kernels::nce_loss_bwd", "cpu")
def _nce_loss_bwd_cpu(grad_loss, grad_reg, src, trg, pos_idx, pos, neg_stat, bad, tclip,
                      reg_weight, estimator):
    zero = grad_loss.new_zeros(())   # no gradient where the forward poisoned (as torch.where's)
    grads = epilogue_grads(estimator, pos, neg_stat, trg.shape[0], reg_weight,
                           torch.where(bad, zero, grad_loss), torch.where(bad, zero, grad_reg))
    s, t = ops.cpu_kernel_inputs(src, trg)
    grad_src, grad_trg = ops.nce_bwd(*grads, s, t, pos_idx, neg_stat, tclip,
                                     _validate.NEG_REDUCTION[estimator])
    return grad_src.to(src.dtype), grad_trg.to(trg.dtype)


torch.library.impl("amdim_kernels::nce_loss", "cuda", nce_loss_cuda)
torch.library.impl("amdim_kernels::nce_loss_bwd", "cuda", nce_loss_bwd_cuda)


@torch.library.register_fake("amdim_kernels::nce_loss")
def _nce_loss_fake(src, trg, pos_idx, tclip, reg_weight, estimator, check_range):
    opts = dict(dtype=_validate.acc_dtype(src.dtype), device=src.device)
    n, l = src.shape[0], trg.shape[1]
    return (src.new_empty((), **opts), src.new_empty((), **opts), src.new_empty((n, l), **opts),
            src.new_empty((n,), **opts), src.new_empty((), dtype=torch.bool, device=src.device))


@torch.library.register_fake("amdim_kernels::nce_loss_bwd")
def _nce_loss_bwd_fake(grad_loss, grad_reg, src, trg, pos_idx, pos, neg_stat, bad, tclip,
                       reg_weight, estimator):
    return torch.empty_like(src), torch.empty_like(trg)


def _setup_context(ctx, inputs, output):
    src, trg, pos_idx, tclip, reg_weight, estimator, _ = inputs
    ctx.save_for_backward(src, trg, pos_idx, output[2], output[3], output[4])
    ctx.tclip, ctx.reg_weight, ctx.estimator = tclip, reg_weight, estimator
    # pos, neg_stat and bad are kept for the backward, not a loss: not differentiable (no gradient
    # flows back through them), and no zero gradients materialised for them (on a GPU each would
    # be one more launch)
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_reg, *unused):
    need_src, need_trg = ctx.needs_input_grad[:2]
    if not (need_src or need_trg) or (grad_loss is None and grad_reg is None):
        return None, None, None, None, None, None, None
    src, trg, pos_idx, pos, neg_stat, bad = ctx.saved_tensors
    if grad_loss is None or grad_reg is None:   # only one of loss, lgt_reg reached the objective
        zero = pos.new_zeros(())
        grad_loss = zero if grad_loss is None else grad_loss
        grad_reg = zero if grad_reg is None else grad_reg
    args = (grad_loss, grad_reg, src, trg, pos_idx, pos, neg_stat, bad, ctx.tclip,
            ctx.reg_weight, ctx.estimator)
    # With create_graph=True (grad mode on here) the result must refuse a second backward.
    grad_src, grad_trg = NceLossBackward.apply(*args) if torch.is_grad_enabled() else nce_loss_bwd(*args)
    return (grad_src if need_src else None), (grad_trg if need_trg else None), None, None, None, None, None


torch.library.register_autograd("amdim_kernels::nce_loss", _backward, setup_context=_setup_context)
torch.library.register_autograd("amdim_kernels::nce_loss_bwd",
                                ops._no_second_derivative("amdim_kernels::nce_loss_bwd"),
                                setup_context=ops._setup_nothing)


class NceLossBackward(torch.autograd.Function):
    """nce_loss_bwd where its result may be differentiated (create_graph=True): that raises."""

    @staticmethod
    def forward(*args):
        return nce_loss_bwd(*args)

    setup_context = staticmethod(ops._setup_nothing)
    backward = staticmethod(ops._no_second_derivative("amdim_kernels::nce_loss_bwd"))
