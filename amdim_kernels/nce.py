"""The public fused losses (AMDIM NCE and the DIM estimators, the mixture NCE loss), and the single
dispatch point to their backends."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple, Optional

import torch

from . import _validate
from ._validate import softplus
from .reference import mixture_nce_loss_reference, nce_loss_reference

BACKENDS = ("auto", "cpp", "triton", "reference")
_FUSED_DEVICE = {"cpp": "cpu", "triton": "cuda"}   # where each fused backend runs


class Dispatch(NamedTuple):
    """One call of a public loss: which loss ("nce", "jsd", "dv" or "mixture") ran on which
    backend ("cpp", "triton" or "reference")."""
    loss: str
    backend: str


_recorders: list[list[Dispatch]] = []


@contextlib.contextmanager
def record_dispatch() -> Iterator[list[Dispatch]]:
    """Within the block, every fused_nce_loss / fused_mixture_nce_loss call (also through
    compat.g2l_loss and the modules, and under torch.compile) appends the Dispatch it ran to the
    list this yields: which backend backend="auto" really chose. Outside a block nothing is kept.
    The record is made where the work is handed over (the call of the fused op, named by the
    device whose kernel the dispatcher runs for its tensors, or the call of the reference), not
    where the backend is resolved: a branch that ran something else cannot record "cpp".

        with record_dispatch() as ran:
            loss, lgt_reg = fused_nce_loss(src, trg)
        assert ran == [Dispatch("nce", "cpp")]
    """
    ran: list[Dispatch] = []
    _recorders.append(ran)
    try:
        yield ran
    finally:
        _recorders.remove(ran)


def _dispatched(loss: str, backend: str) -> None:
    for ran in _recorders:
        ran.append(Dispatch(loss, backend))


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


def check_fused_dtype(backend: str, x: torch.Tensor, name: str) -> None:
    """The CUDA kernels accumulate in float32 (losses.md: float64 results need float64 math): a
    float64 input to backend "triton" is an error naming the argument, before any work."""
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError(f"{name} is float64 on {x.device}: the fused CUDA kernels take float16, "
                        f"bfloat16 or float32 (accumulated in float32). For float64 results use "
                        f"backend='reference' on the GPU, or float64 CPU tensors (the C++ kernels "
                        f"accumulate in float64)")


def _ran_fused(loss: str, x: torch.Tensor) -> None:
    """Record that `loss` hands its work to the fused op, whose kernel is that of x's device
    (the dispatcher runs the Triton kernels for CUDA tensors, the C++ ones for CPU tensors)."""
    _dispatched(loss, "triton" if x.is_cuda else "cpp")


def nce_statistics(src, trg, pos_idx, tclip, neg_reduction, loss):
    """(pos, neg_stat, sumsq) of the score matrix through the registered op (docs/design.md), for
    the public loss `loss` (its dispatch record)."""
    from . import ops  # builds the extension on first use

    if src.device.type == "cpu":
        src, trg = ops.cpu_kernel_inputs(src, trg)
    # torch.compile traces the op with its registered autograd (Dynamo rejects a Function with a
    # jvp); eager calls take the Function, which torch.func transforms accept.
    op = ops.nce_fwd if torch.compiler.is_compiling() else ops.NceStatistics.apply
    _ran_fused(loss, src)
    return op(src.contiguous(), trg.contiguous(), pos_idx, tclip, neg_reduction)


class ForwardGradientLoss(torch.autograd.Function):
    """(loss, lgt_reg, sumsq) of the CPU fused loss, its gradient formed in the forward: the op
    nce_fwd_grad returns the statistics with d(loss + lgt_reg)/d(src, trg) (three score-sized
    products where nce_fwd and nce_bwd make four, docs/design.md); the loss is composed from the
    statistics here as on every other path, and the backward scales the kept gradient by the
    upstream gradient, or forms it anew where lgt_reg's upstream gradient differs from loss's
    (nce_fwd_grad_backward). Estimators "nce" and "jsd"."""

    @staticmethod
    def forward(src, trg, pos_idx, tclip, reg_weight, estimator):
        from . import ops
        pos, neg_stat, sumsq, grad_src, grad_trg = ops.nce_fwd_grad(
            src, trg, pos_idx, tclip, float(reg_weight), estimator)
        b = trg.shape[0]
        loss = estimator_loss(estimator, pos, neg_stat, b)
        lgt_reg = _validate.regulariser(sumsq / (b * pos.numel()), reg_weight)
        return loss, lgt_reg, sumsq, pos, neg_stat, grad_src, grad_trg

    @staticmethod
    def setup_context(ctx, inputs, output):
        src, trg, pos_idx, tclip, reg_weight, estimator = inputs
        ctx.save_for_backward(*output[5:], src, trg, pos_idx, *output[3:5])
        ctx.tclip, ctx.reg_weight, ctx.estimator = tclip, float(reg_weight), estimator
        ctx.mark_non_differentiable(*output[2:])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, grad_reg, *unused):
        from . import ops
        saved = ctx.saved_tensors
        zero = saved[0].new_zeros(())
        grad_loss = zero if grad_loss is None else grad_loss
        grad_reg = zero if grad_reg is None else grad_reg
        if (not torch.compiler.is_compiling() and not torch.is_grad_enabled()
                and bool(grad_loss == 1) and (ctx.reg_weight == 0 or bool(grad_reg == 1))):
            # d(loss + lgt_reg) itself, the common case: handed over without a copy (a read of
            # two CPU scalars)
            return saved[0], saved[1], None, None, None, None
        args = (grad_loss, grad_reg, *saved, ctx.tclip, ctx.reg_weight, ctx.estimator)
        # With create_graph=True (grad mode on here) the result must refuse a second backward.
        grad = (ForwardGradientBackward.apply(*args) if torch.is_grad_enabled()
                else ops.nce_fwd_grad_backward(*args))
        return grad + (None, None, None, None)


class ForwardGradientBackward(torch.autograd.Function):
    """nce_fwd_grad_backward where its result may be differentiated (create_graph=True): that
    raises."""

    @staticmethod
    def forward(*args):
        from . import ops
        return ops.nce_fwd_grad_backward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        from . import ops
        raise RuntimeError(ops.SECOND_DERIVATIVE_MISSING.format(op="amdim_kernels::nce_fwd_grad_backward"))


def gradient_in_forward(src: torch.Tensor, trg: torch.Tensor, estimator: str) -> bool:
    """The one choice between the CPU kernels' two ways to the gradient (docs/design.md): the
    gradient formed in the forward (nce_fwd_grad, three products) where a backward will follow,
    else nce_fwd now and nce_bwd in the backward (four products with the backward, one without).
    DV's gradient needs a statistic of all rows, so it always takes the second; so do torch.func
    transforms, which take the autograd.Function of nce_fwd. No size rule: the first was measured
    faster at every size tried, tiny to DIM's local loss, with one or both inputs requiring grad
    (benchmarks/NOTES.md). AMDIM_KERNELS_CPU_GRADIENT=backward takes the second everywhere: it
    holds nothing from the forward to the backward (the first holds the input-sized gradients and,
    for NCE, 128 rows of scores during the forward)."""
    from .variants import CPU_GRADIENT_ENV, CPU_GRADIENTS, env_choice
    if env_choice(CPU_GRADIENT_ENV, CPU_GRADIENTS) == "backward":
        return False
    return (estimator in ("nce", "jsd") and torch.is_grad_enabled()
            and (src.requires_grad or trg.requires_grad) and not _functorch_transform())


def forward_gradient_loss(src, trg, pos_idx, tclip, reg_weight, estimator):
    """(loss, lgt_reg, sumsq) through ForwardGradientLoss (the dispatch record is `estimator`)."""
    from . import ops
    src, trg = ops.cpu_kernel_inputs(src, trg)
    _ran_fused(estimator, src)
    loss, lgt_reg, sumsq, *_ = ForwardGradientLoss.apply(
        src.contiguous(), trg.contiguous(), pos_idx, tclip, reg_weight, estimator)
    return loss, lgt_reg, sumsq


def fused_nce_loss(src: torch.Tensor, trg: torch.Tensor, pos_idx: Optional[torch.Tensor] = None, *,
                   tclip: Optional[float] = 20.0, reg_weight: float = 0.05, estimator: str = "nce",
                   backend: str = "auto", strict: Optional[bool] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """AMDIM NCE loss (docs/losses.md, section 1) without materialising N x M scores, or with
    estimator="jsd" / "dv" the DIM estimators of section 4 over the same pairs, fused the same way.

    A drop-in for nce_loss_reference. src: (N, D); trg: (B, L, D); pos_idx: (N,) ints in [0, B),
    or None when N == B. Returns (loss, lgt_reg): 0-dim float32 tensors (float64 for float64
    inputs), differentiable once with respect to src and trg. With B == 1 (no negative pairs)
    "nce" gives 0, "jsd" keeps only its positive term and "dv" raises ValueError.

    strict: how pos_idx outside [0, B) and NaN/Inf scores are reported. True: a ValueError naming
    the argument (reads values back from the device: a host synchronisation). False: no host read;
    loss and lgt_reg are NaN. None (default): True for CPU tensors, False for CUDA tensors, or
    True everywhere when the environment variable AMDIM_KERNELS_STRICT=1. Under torch.compile and
    torch.func.vmap nothing is read back: always NaN.
    """
    return _fused_nce_loss(src, trg, pos_idx, tclip, reg_weight, estimator, backend, strict)


def _fused_nce_loss(src, trg, pos_idx, tclip, reg_weight, estimator, backend, strict,
                    src_name="src", trg_name="trg"):
    """fused_nce_loss, with the caller's names for src and trg in its errors."""
    strict = _validate.resolve_strict(strict, src)
    pos_idx_given = pos_idx is not None
    pos_idx = _validate.check_nce_inputs(src, trg, pos_idx, tclip, reg_weight, strict=strict,
                                         src_name=src_name, trg_name=trg_name)
    b = trg.shape[0]
    _validate.check_estimator(estimator, b)
    backend = resolve_backend(backend, src.device)
    if backend == "reference":
        _dispatched(estimator, "reference")
        return nce_loss_reference(src, trg, pos_idx, tclip=tclip, reg_weight=reg_weight,
                                  estimator=estimator, strict=strict)
    check_fused_dtype(backend, src, src_name)
    if backend == "triton" and not strict and not _functorch_transform() and _fused_epilogue():
        return _fused_loss_op(src, trg, pos_idx, tclip, reg_weight, estimator, pos_idx_given)
    with _validate.autocast_disabled(src.device):
        if backend == "cpp" and gradient_in_forward(src, trg, estimator):
            loss, lgt_reg, sumsq = forward_gradient_loss(src, trg, pos_idx, tclip, reg_weight,
                                                         estimator)
        else:
            pos, neg_stat, sumsq = nce_statistics(src, trg, pos_idx, tclip,
                                                  _validate.NEG_REDUCTION[estimator], estimator)
            loss = estimator_loss(estimator, pos, neg_stat, b)
            lgt_reg = _validate.regulariser(sumsq / (b * pos.numel()), reg_weight)
        bad = _validate.check_scores(sumsq, strict, **{src_name: src, trg_name: trg})
        if pos_idx_given and not strict:   # a strict call has checked the range already
            bad = bad | _validate.range_flag(pos_idx, b)
    return _validate.poison((loss, lgt_reg), bad)


def _functorch_transform() -> bool:
    """Inside torch.func.grad / vmap / ...: those take autograd.Functions, not the loss op."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def _fused_epilogue() -> bool:
    """The loss op's fused epilogue (default), unless AMDIM_KERNELS_CUDA_EPILOGUE=torch."""
    from . import ops
    return ops.SELECTION.epilogue == "fused"


def _fused_loss_op(src, trg, pos_idx, tclip, reg_weight, estimator, check_range):
    """The non-strict CUDA path: the whole loss in one op (nce_loss_op.py), a few launches
    instead of nce_fwd and some twenty launches of the torch epilogue below."""
    from . import nce_loss_op
    _ran_fused(estimator, src)
    with _validate.autocast_disabled(src.device):
        loss, lgt_reg, _, _, _ = nce_loss_op.nce_loss(src.contiguous(), trg.contiguous(), pos_idx,
                                                      tclip, float(reg_weight), estimator, check_range)
    return loss, lgt_reg


def estimator_loss(estimator: str, pos: torch.Tensor, neg_stat: torch.Tensor, b: int) -> torch.Tensor:
    """The loss of `estimator` from nce_fwd's (pos (N, L), neg_stat (N,)) for B target samples;
    neg_stat is the negatives' logsumexp ("nce", "dv") or softplus sum ("jsd") per row."""
    if estimator == "nce":
        return softplus(neg_stat[:, None] - pos).mean()
    n_neg_pairs = pos.numel() * (b - 1)
    if estimator == "jsd":   # the mean over no negative pairs (B == 1) counts as 0
        return softplus(-pos).mean() + neg_stat.sum() / max(n_neg_pairs, 1)
    # "dv": the global log-mean-exp of the negatives is a logsumexp of the row logsumexps
    return -(pos.mean() - (torch.logsumexp(neg_stat, dim=0) - math.log(n_neg_pairs)))


def fused_mixture_nce_loss(src_mix: torch.Tensor, trg: torch.Tensor,
                           pos_idx: Optional[torch.Tensor] = None, *, tau: float = 1.0,
                           alpha: Optional[float] = None, detach_q: bool = True,
                           tclip: Optional[float] = 20.0, reg_weight: float = 0.05,
                           backend: str = "auto", strict: Optional[bool] = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture NCE loss (docs/losses.md, section 3) without materialising N*k x M scores.

    A drop-in for mixture_nce_loss_reference. src_mix: (N, k, D), k mixture components per source;
    trg, pos_idx as in fused_nce_loss. Each component is scored with its own negatives, giving
    nce_j[i, l]; q = softmax over j of tau * nce_j; loss = -mean over (i, l) of
    (sum_j q_j nce_j + alpha * H(q)), alpha = 1 / tau when None (q is then the optimal q).
    detach_q=True treats q as a constant in the backward; False differentiates through it.
    lgt_reg = reg_weight * mean of a^2 over all N * k * B * L component scores a.
    k = 1 gives exactly fused_nce_loss. strict: as in fused_nce_loss.
    """
    strict = _validate.resolve_strict(strict, src_mix)
    pos_idx_given = pos_idx is not None
    pos_idx, alpha = _validate.check_mixture_inputs(src_mix, trg, pos_idx, tau, alpha, detach_q,
                                                    tclip, reg_weight, strict=strict)
    backend = resolve_backend(backend, src_mix.device)
    if backend == "reference":
        _dispatched("mixture", "reference")
        return mixture_nce_loss_reference(src_mix, trg, pos_idx, tau=tau, alpha=alpha,
                                          detach_q=detach_q, tclip=tclip, reg_weight=reg_weight,
                                          strict=strict)
    check_fused_dtype(backend, src_mix, "src_mix")
    from . import mixture  # registers the epilogue ops (and builds the extension) on first use

    n, k, d = src_mix.shape
    b = trg.shape[0]
    with _validate.autocast_disabled(src_mix.device):
        # Component rows r = i*k + j go through the same tiled pass as plain sources.
        pos, lse_neg, sumsq = nce_statistics(src_mix.reshape(n * k, d), trg,
                                             pos_idx[:, None].expand(n, k).reshape(n * k),
                                             tclip, "logsumexp", "mixture")
        bad = _validate.check_scores(sumsq, strict, src_mix=src_mix, trg=trg)
        if pos_idx_given and not strict:
            bad = bad | _validate.range_flag(pos_idx, b)
        epilogue = mixture.mixture_fwd if torch.compiler.is_compiling() else mixture.MixtureLoss.apply
        loss = epilogue(pos.view(n, k, -1), lse_neg.view(n, k), float(tau), alpha, detach_q)
        lgt_reg = _validate.regulariser(sumsq / (b * pos.numel()), reg_weight)
    return _validate.poison((loss, lgt_reg), bad)
