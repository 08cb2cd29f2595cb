"""Shared by the loss tests: input builders, running a loss with its gradients, the two ways
of comparing a fused result with the reference (tolerances, or error within plain torch's), and
`expect_fused`, which makes every such comparison fail when the fused kernel did not run;
`cuda_plan_on_cpu`, the public losses' CUDA plan on CPU tensors."""
import contextlib
import warnings

import torch

from amdim_kernels.nce import record_dispatch

# What backend="auto" must run on each device (README): stated here, not read from the package,
# so that a wrong choice in nce.resolve_backend cannot agree with itself.
FUSED_BACKEND = {"cpu": "cpp", "cuda": "triton"}


@contextlib.contextmanager
def expect_fused(device="cpu", calls=None):
    """The block calls the public fused losses; each call must have run the fused kernel of
    `device` (not the reference). calls: how many calls to expect (None: at least one)."""
    with record_dispatch() as ran:
        yield ran
    want = FUSED_BACKEND[torch.device(device).type]
    assert ran, "no fused loss was called"
    assert all(d.backend == want for d in ran), f"expected the {want!r} kernel, ran {ran}"
    assert calls is None or len(ran) == calls, f"expected {calls} calls, ran {ran}"


def make_inputs(n, b, l, d, dtype=torch.float32, *, k=None, seed=0, scale=1.0, requires_grad=True):
    """src (N, D), or src_mix (N, k, D) when k is given, trg (B, L, D) and pos_idx (N,) in [0, B).
    Drawn in float64 and rounded to dtype, so every dtype sees the same values."""
    g = torch.Generator().manual_seed(seed)
    src_shape = (n, d) if k is None else (n, k, d)
    src = (torch.randn(src_shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    trg = (torch.randn(b, l, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    pos_idx = torch.randint(0, b, (n,), generator=g)
    return src.requires_grad_(requires_grad), trg.requires_grad_(requires_grad), pos_idx


def loss_and_grads(fn, src, trg, pos_idx, w_loss=0.7, w_reg=1.3, **kw):
    """(loss, lgt_reg, d src, d trg) of w_loss * loss + w_reg * lgt_reg: unequal weights, so a
    gradient that mixes up the two terms shows."""
    loss, reg = fn(src, trg, pos_idx, **kw)
    return (loss, reg) + torch.autograd.grad(w_loss * loss + w_reg * reg, (src, trg))


def assert_matches(fused, ref, rtol, atol):
    for name, f, r in zip(("loss", "lgt_reg", "grad src", "grad trg"), fused, ref):
        assert f.dtype == r.dtype, name
        torch.testing.assert_close(f, r, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_error_within_torch_error(fused_fn, ref_fn, src, trg, pos_idx, **kw):
    """Against the float64 reference, the fused fp32 result may err by no more than twice the
    fp32 reference does (summation orders differ), plus 1e-5 relative."""
    def run(fn, dtype):
        return loss_and_grads(fn, src.detach().to(dtype).requires_grad_(),
                              trg.detach().to(dtype).requires_grad_(), pos_idx, **kw)
    truth = run(ref_fn, torch.float64)
    with expect_fused(src.device):
        fused = run(fused_fn, torch.float32)
    for name, f, r, t in zip(("loss", "lgt_reg", "grad src", "grad trg"), fused,
                             run(ref_fn, torch.float32), truth):
        err, err_torch = (f.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 2 * err_torch + 1e-5 * t.abs().max().item(), (name, err, err_torch)


@contextlib.contextmanager
def cuda_plan_on_cpu(fwd="", bwd="", epilogue=""):
    """Run the public losses' CUDA plan on CPU tensors: backend "auto" resolves to "triton", and
    every op's CPU dispatch key runs its CUDA kernel (the Triton kernels, under the interpreter),
    with the variants given ("" = by the table). Yields the list of CUDA kernels that ran (the
    dispatch record names kernels by device, so it says "cpp" here). Restores everything after."""
    from amdim_kernels import mixture, nce, nce_loss_op, ops  # noqa: F401 (register their ops)
    from amdim_kernels.triton_mixture import mixture_bwd_triton, mixture_fwd_triton
    from amdim_kernels.triton_nce_loss import nce_loss_bwd_cuda, nce_loss_cuda
    saved = ops.SELECTION, ops.HAS_TRITON_CUDA, dict(nce._FUSED_DEVICE)
    assert ops._register_cuda(cuda_available=True, cuda_status=(None, "CPU test"), fwd_choice=fwd,
                              bwd_choice=bwd, epilogue_choice=epilogue) is None
    ran = []

    def counted(name, kernel):
        def run(*args):
            ran.append(name)
            return kernel(*args)
        return run
    lib = torch.library.Library("amdim_kernels", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        for name, kernel in (("nce_fwd", ops._nce_fwd_cuda), ("nce_bwd", ops._nce_bwd_cuda),
                             ("nce_loss", nce_loss_cuda), ("nce_loss_bwd", nce_loss_bwd_cuda),
                             ("mixture_fwd", mixture_fwd_triton), ("mixture_bwd", mixture_bwd_triton)):
            lib.impl(name, counted(name, kernel), "CPU")
    nce._FUSED_DEVICE.update(triton="cpu", cpp="cuda")
    ops.HAS_TRITON_CUDA = True
    try:
        yield ran
    finally:
        lib._destroy()
        ops.SELECTION, ops.HAS_TRITON_CUDA = saved[:2]
        nce._FUSED_DEVICE.clear()
        nce._FUSED_DEVICE.update(saved[2])
