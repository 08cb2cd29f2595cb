"""Registration of the fused ops with torch.library: fake (meta) kernels and the autograd formula.

The schemas and the CPU/CUDA kernels come from the C++ extension (csrc/); the Triton forward is
registered here as the CUDA kernel of nce_fwd when Triton is importable, and the Triton backward as
that of nce_bwd where the CUDA extension cannot be built or AMDIM_KERNELS_CUDA_BWD=triton.

The autograd formula is registered twice over the same two functions: on the op (so that the op
is differentiable wherever it is called, and opcheck passes) and as `NceStatistics`, an
autograd.Function with a separate setup_context, which the losses call in eager mode because
torch.func transforms (grad, vjp, vmap) accept only such Functions (under torch.compile they call
the op: Dynamo does not trace a Function that defines jvp). nce_bwd has no derivative: its autograd
formula raises instead of silently giving zero; forward mode (jvp) raises too.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import _extension
from ._validate import acc_dtype

_extension.load()
nce_fwd = torch.ops.amdim_kernels.nce_fwd
nce_bwd = torch.ops.amdim_kernels.nce_bwd

SECOND_DERIVATIVE_MISSING = (
    "{op} has no second derivative: the fused losses can be differentiated once, not twice "
    "(create_graph=True and then backward through the gradient, e.g. a gradient penalty, or "
    "nested torch.func.grad). Use backend='reference' (plain PyTorch, any order) for such objectives.")


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
    need_src, need_trg = ctx.needs_input_grad[:2]
    if not (need_src or need_trg):
        return None, None, None, None, None
    src, trg, pos_idx, neg_stat = ctx.saved_tensors
    # An output that did not reach the loss has no gradient: it contributes zero.
    if grad_pos is None:
        grad_pos = neg_stat.new_zeros(neg_stat.shape[0], trg.shape[1])
    grad_neg_stat = torch.zeros_like(neg_stat) if grad_neg_stat is None else grad_neg_stat
    grad_sumsq = neg_stat.new_zeros(()) if grad_sumsq is None else grad_sumsq
    args = (grad_pos.contiguous(), grad_neg_stat.contiguous(), grad_sumsq, src, trg, pos_idx,
            neg_stat, ctx.tclip, ctx.neg_reduction)
    # With create_graph=True (grad mode on here) the result must refuse a second backward.
    grad_src, grad_trg = NceBackward.apply(*args) if torch.is_grad_enabled() else nce_bwd(*args)
    # nce_bwd forms both products; autograd gets only the gradients that were asked for.
    return (grad_src if need_src else None), (grad_trg if need_trg else None), None, None, None


def _no_second_derivative(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(SECOND_DERIVATIVE_MISSING.format(op=op))
    return backward


def _setup_nothing(ctx, inputs, output):
    pass


def _no_forward_mode(op: str):
    def jvp(ctx, *tangents):
        raise RuntimeError(f"{op} has no forward-mode derivative (torch.func.jvp, jacfwd, "
                           f"torch.autograd.forward_ad): use reverse mode (backward, torch.func.grad, "
                           f"vjp, jacrev), or backend='reference' (plain PyTorch, every mode).")
    return jvp


torch.library.register_autograd("amdim_kernels::nce_fwd", _backward, setup_context=_setup_context)
torch.library.register_autograd("amdim_kernels::nce_bwd", _no_second_derivative("amdim_kernels::nce_bwd"),
                                setup_context=_setup_nothing)


class NceStatistics(torch.autograd.Function):
    """nce_fwd with its autograd formula, usable under torch.func transforms (vmap runs the op
    once per batch element: it has no batching rule)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(src, trg, pos_idx, tclip, neg_reduction):
        return nce_fwd(src, trg, pos_idx, tclip, neg_reduction)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)
    jvp = staticmethod(_no_forward_mode("amdim_kernels::nce_fwd"))


class NceBackward(torch.autograd.Function):
    """nce_bwd where its result may be differentiated (create_graph=True): that raises."""
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return nce_bwd(*args)

    setup_context = staticmethod(_setup_nothing)
    backward = staticmethod(_no_second_derivative("amdim_kernels::nce_bwd"))


# Which kernel backs nce_bwd on CUDA where both can: "cuda" (csrc/cuda) or "triton"
# (triton_nce_bwd.py). The CUDA one stays the default: it is the one measured on a GPU. The Triton
# one becomes the default only once a GPU run measures it faster and passes the GPU tests
# (benchmarks/NOTES.md, benchmarks/gpu_check.sh).
CUDA_BWD_ENV = "AMDIM_KERNELS_CUDA_BWD"
_CUDA_BWD_CHOICES = ("cuda", "triton")


def select_cuda_bwd(cuda_buildable: bool, choice: str | None) -> tuple[str | None, str | None]:
    """(kernel for nce_bwd on CUDA, None) or (None, why there is none).

    cuda_buildable: whether the C++/CUDA extension gets its CUDA part (`_extension.cuda_buildable()`);
    choice: the value of AMDIM_KERNELS_CUDA_BWD (None or "" when unset). Without the CUDA part the
    Triton kernel is the only one, so a pip install of torch and triton (no CUDA toolkit) works.
    """
    if choice not in (None, "", *_CUDA_BWD_CHOICES):
        return None, f"{CUDA_BWD_ENV} must be 'cuda' or 'triton' (or unset), got {choice!r}"
    if not cuda_buildable:
        if choice == "cuda":
            return None, (f"{CUDA_BWD_ENV}=cuda, but the CUDA gradient kernel cannot be built "
                          f"(torch without CUDA, or no nvcc/CUDA_HOME)")
        return "triton", None
    return choice or "cuda", None


def _register_triton_cuda(cuda_available: bool | None = None, cuda_buildable: bool | None = None,
                          choice: str | None = None) -> str | None:
    """Make the Triton forward the CUDA kernel of nce_fwd, and the selected kernel that of nce_bwd;
    return why not, or None on success. The arguments default to this machine's state (tests
    pass them to exercise the other cases)."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        return "no CUDA device"
    if cuda_buildable is None:
        cuda_buildable = _extension.cuda_buildable()
    if choice is None:
        choice = os.environ.get(CUDA_BWD_ENV)
    bwd, why_not = select_cuda_bwd(cuda_buildable, choice)
    if bwd is None:
        return why_not
    try:
        from .triton_nce_bwd import nce_bwd_triton
        from .triton_nce_fwd import nce_fwd_triton
    except ImportError as err:
        return f"triton is not importable ({err})"
    torch.library.register_kernel("amdim_kernels::nce_fwd", "cuda", nce_fwd_triton)
    if bwd == "triton":
        with warnings.catch_warnings():
            # where csrc/cuda registered its kernel, replacing it is the point of the choice
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            torch.library.register_kernel("amdim_kernels::nce_bwd", "cuda", nce_bwd_triton)
    global CUDA_BWD
    CUDA_BWD = bwd
    return None


CUDA_BWD: str | None = None   # the kernel registered for nce_bwd on CUDA, once registered
TRITON_CUDA_MISSING = _register_triton_cuda()
HAS_TRITON_CUDA = TRITON_CUDA_MISSING is None
