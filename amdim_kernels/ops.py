"""Registration of the fused ops with torch.library: fake (meta) kernels and the autograd formula.

The schemas and the CPU kernels come from the C++ extension (csrc/). The CUDA kernels of nce_fwd and
nce_bwd are registered here, where a CUDA device is present and Triton importable: each runs the
variant (amdim_kernels/variants.py) chosen for the problem's size, among the Triton kernels and,
where it can be built or was shipped, the CUDA C++ backward (op nce_bwd_cuda, csrc/cuda).

The autograd formula is registered twice over the same two functions: on the op (so that the op
is differentiable wherever it is called, and opcheck passes) and as `NceStatistics`, an
autograd.Function with a separate setup_context, which the losses call in eager mode because
torch.func transforms (grad, vjp, vmap) accept only such Functions (under torch.compile they call
the op: Dynamo does not trace a Function that defines jvp). nce_bwd has no derivative: its autograd
formula raises instead of silently giving zero; forward mode (jvp) raises too.
"""
from __future__ import annotations

import sys
import warnings

import torch

from . import _extension, auto_table, variants
from ._validate import acc_dtype

_extension.load()
nce_fwd = torch.ops.amdim_kernels.nce_fwd
nce_bwd = torch.ops.amdim_kernels.nce_bwd
nce_fwd_grad = torch.ops.amdim_kernels.nce_fwd_grad
nce_fwd_grad_backward = torch.ops.amdim_kernels.nce_fwd_grad_backward

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


@torch.library.register_fake("amdim_kernels::nce_fwd_grad")
def _nce_fwd_grad_fake(src, trg, pos_idx, tclip, reg_weight, estimator):
    return _nce_fwd_fake(src, trg, pos_idx, tclip, None) + (torch.empty_like(src), torch.empty_like(trg))


@torch.library.register_fake("amdim_kernels::nce_fwd_grad_backward")
def _nce_fwd_grad_backward_fake(grad_loss, grad_reg, grad_src, grad_trg, src, trg, pos_idx, pos,
                                neg_stat, tclip, reg_weight, estimator):
    return torch.empty_like(grad_src), torch.empty_like(grad_trg)


def cpu_kernel_inputs(src: torch.Tensor, trg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """src, trg as the CPU kernels take them: they accumulate in fp32 from fp32 tiles, so 16-bit
    inputs are upcast first (the CUDA kernels take them as they are)."""
    if src.dtype in (torch.float16, torch.bfloat16):
        return src.float(), trg.float()
    return src, trg


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


def _not_differentiable(op: str, why: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"{op} is not differentiable: {why}")
    return backward


torch.library.register_autograd("amdim_kernels::nce_fwd", _backward, setup_context=_setup_context)
torch.library.register_autograd(
    "amdim_kernels::nce_fwd_grad",
    _not_differentiable("amdim_kernels::nce_fwd_grad", "it returns the gradient of its loss, which "
                        "fused_nce_loss hands to autograd (nce.ForwardGradientLoss)"),
    setup_context=_setup_nothing)
torch.library.register_autograd(
    "amdim_kernels::nce_fwd_grad_backward",
    _no_second_derivative("amdim_kernels::nce_fwd_grad_backward"), setup_context=_setup_nothing)
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


# ---- the CUDA kernels: one Python kernel per op, which runs the variant chosen for the problem
def _problem(src: torch.Tensor, trg: torch.Tensor) -> tuple[int, int, int, torch.dtype]:
    return src.shape[0], trg.shape[0] * trg.shape[1], src.shape[1], src.dtype


def _nce_fwd_cuda(src, trg, pos_idx, tclip, neg_reduction):
    fwd, _ = SELECTION.choose(*_problem(src, trg))
    return _FWD_KERNELS[fwd](src, trg, pos_idx, tclip, neg_reduction)


def _nce_bwd_cuda(grad_pos, grad_neg_stat, grad_sumsq, src, trg, pos_idx, neg_stat, tclip,
                  neg_reduction):
    _, bwd = SELECTION.choose(*_problem(src, trg))
    return _BWD_KERNELS[bwd](grad_pos, grad_neg_stat, grad_sumsq, src, trg, pos_idx, neg_stat,
                             tclip, neg_reduction)


def _cuda_cpp_bwd():
    """The CUDA C++ backward (op nce_bwd_cuda of csrc/cuda) where it is loaded, else None."""
    try:
        return torch.ops.amdim_kernels.nce_bwd_cuda.default
    except (AttributeError, RuntimeError):
        return None


def _register_cuda(cuda_available: bool | None = None,
                   cuda_status: tuple[str | None, str | None] | None = None,
                   fwd_choice: str | None = None, bwd_choice: str | None = None,
                   epilogue_choice: str | None = None) -> str | None:
    """Register the CUDA kernels of nce_fwd and nce_bwd; return why not, or None on success.

    cuda_status: where the CUDA C++ backward comes from (`_extension.cuda_bwd_status`);
    fwd_choice / bwd_choice / epilogue_choice: the values of AMDIM_KERNELS_CUDA_FWD / _BWD /
    _EPILOGUE. They default to this machine's state (tests pass them to exercise the other
    cases). The CUDA C++ backward is built
    (once, cached) only when it may be chosen; a failed build leaves the Triton backwards, with
    one message, unless AMDIM_KERNELS_CUDA_BWD=cuda asked for it: then the CUDA kernels are not
    registered and the fused CUDA losses raise saying why.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        return "no CUDA device"
    try:
        fwd = variants.env_choice(variants.FWD_ENV, variants.FWD_VARIANTS, fwd_choice)
        bwd = variants.env_choice(variants.BWD_ENV, variants.BWD_VARIANTS, bwd_choice)
        epilogue = variants.env_choice(variants.EPILOGUE_ENV, variants.EPILOGUES, epilogue_choice)
    except ValueError as err:
        return str(err)
    try:
        from .triton_nce_bwd import nce_bwd_triton
        from .triton_nce_bwd_cublas import nce_bwd_triton_cublas
        from .triton_nce_dense import nce_fwd_dense
        from .triton_nce_fwd import nce_fwd_triton
    except ImportError as err:
        return f"triton is not importable ({err})"
    if cuda_status is None:
        capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        cuda_status = _extension.cuda_bwd_status(capabilities)
    source, why = cuda_status
    wanted = bwd == "cuda" or (bwd is None and any("cuda" in r["bwd"] for r in auto_table.RULES))
    if source == "build" and wanted:
        try:
            _extension.load_cuda_bwd()
        except _extension.BuildError as err:
            source, why = None, f"building it failed:\n{err}"
            if bwd != "cuda":
                print(f"amdim_kernels: the CUDA C++ gradient kernel could not be built; the Triton "
                      f"backward is used instead. {why}", file=sys.stderr, flush=True)
    cpp_bwd = _cuda_cpp_bwd() if source is not None else None
    if bwd == "cuda" and cpp_bwd is None:
        return (f"{variants.BWD_ENV}=cuda, but the CUDA C++ gradient kernel cannot be used: "
                f"{why or 'it is not loaded'}")
    global SELECTION
    _FWD_KERNELS.update(tiled=nce_fwd_triton, dense=nce_fwd_dense)
    _BWD_KERNELS.clear()
    _BWD_KERNELS.update(triton=nce_bwd_triton, triton_cublas=nce_bwd_triton_cublas)
    if cpp_bwd is not None:
        _BWD_KERNELS["cuda"] = cpp_bwd
    SELECTION = variants.Selection(frozenset(_BWD_KERNELS), fwd, bwd, epilogue)
    with warnings.catch_warnings():
        # registering again (tests) replaces this module's own kernels: that is the point
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        torch.library.register_kernel("amdim_kernels::nce_fwd", "cuda", _nce_fwd_cuda)
        torch.library.register_kernel("amdim_kernels::nce_bwd", "cuda", _nce_bwd_cuda)
    # the loss op of the non-strict CUDA path: imported here, in eager code, so that a compiled
    # loss finds it registered (ops is far enough along for its import of ops)
    from . import nce_loss_op  # noqa: F401
    return None


_FWD_KERNELS: dict = {}
_BWD_KERNELS: dict = {}
SELECTION: variants.Selection | None = None   # the variants in force, once registered
TRITON_CUDA_MISSING = _register_cuda()
HAS_TRITON_CUDA = TRITON_CUDA_MISSING is None
