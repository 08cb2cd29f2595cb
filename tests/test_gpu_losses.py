"""The fused losses on a GPU, through the public entry points, for every forward and backward
variant: what decides correctness in benchmarks/gpu_check.sh's one call (a few minutes in all).

Each autotuned kernel compiles one config here (the first its pruning keeps) instead of
benchmarking them all: every config's accuracy is tested under the interpreter (the CPU tests),
compilation is what costs time on a fresh GPU machine. The checks:
- every estimator and dtype, the mixture, each backward variant, against the float64 reference;
- the dense forward, the single-split forward with negatives, the opt-in forward variants
  (AMDIM_KERNELS_FWD_TANH=rational, AMDIM_KERNELS_FWD_CONFIGS=wide);
- no host synchronisation, CUDA-graph capture, torch.compile (fullgraph, reduce-overhead);
- strict mode's errors, NaN poisoning, pos_idx beyond int32, float64 refused, fp32 under the
  per-backend precision API;
- launches per forward and backward, counted with the profiler.
"""
from __future__ import annotations

import math

import pytest
import torch

import amdim_kernels as ak
from amdim_kernels import ops, triton_nce_fwd as tnf
from gpu_one_config import one_config_per_kernel  # noqa: F401 (autouse: one config per kernel)
from loss_checks import make_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning")]
DEV = torch.device("cuda")
ESTIMATORS = ("nce", "jsd", "dv")
BWD_VARIANTS = ("cuda", "triton", "triton_cublas")
# allowed error beyond twice the reference's in the same dtype, relative to max |x|
TOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


@pytest.fixture
def variants():
    """use(fwd, bwd): register the CUDA kernels with these variants (None: by the table); the
    machine's own registration is restored afterwards. "cuda" skips where the CUDA C++ backward
    cannot be had (no nvcc)."""
    def use(fwd=None, bwd=None, epilogue=None):
        why = ops._register_cuda(fwd_choice=fwd or "", bwd_choice=bwd or "",
                                 epilogue_choice=epilogue or "")
        if why is not None and bwd == "cuda":
            pytest.skip(why)
        assert why is None, why
    yield use
    assert ops._register_cuda() is None


def gpu_inputs(n, b, l, d, dtype, k=None, scale=2.0, seed=0):
    src, trg, pos_idx = make_inputs(n, b, l, d, dtype, k=k, scale=scale, seed=seed)
    return (src.detach().to(DEV).requires_grad_(), trg.detach().to(DEV).requires_grad_(),
            pos_idx.to(DEV))


def loss_and_grads(fn, src, trg, pos_idx, **kw):
    loss, reg = fn(src, trg, pos_idx, **kw)
    return (loss, reg) + torch.autograd.grad(0.7 * loss + 1.3 * reg, (src, trg))


def assert_within_reference_error(fused_fn, ref_fn, src, trg, pos_idx, **kw):
    """The fused result errs (against the float64 reference) by at most twice what the reference
    in the inputs' dtype does, plus TOL of the largest value."""
    as_dtype = lambda x, dt: x.detach().to(dt).requires_grad_()   # noqa: E731
    truth = loss_and_grads(ref_fn, as_dtype(src, torch.float64), as_dtype(trg, torch.float64),
                           pos_idx, **kw)
    plain = loss_and_grads(ref_fn, src, trg, pos_idx, **kw)
    fused = loss_and_grads(fused_fn, src, trg, pos_idx, **kw)
    for name, f, p, t in zip(("loss", "lgt_reg", "grad src", "grad trg"), fused, plain, truth):
        assert f.dtype == p.dtype and torch.isfinite(f).all(), name
        err = (f.double() - t).abs().max().item()
        err_ref = (p.double() - t).abs().max().item()
        assert err <= 2 * err_ref + TOL[src.dtype] * t.abs().max().item(), (name, err, err_ref)


# ---- every estimator, dtype and backward variant -------------------------------------------------
@pytest.mark.parametrize("bwd", BWD_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_losses_match_reference(variants, bwd, dtype, estimator):
    variants(bwd=bwd)
    src, trg, pos_idx = gpu_inputs(130, 70, 49, 200, dtype)   # ragged; N > B: repeated pos_idx
    assert_within_reference_error(ak.fused_nce_loss, ak.nce_loss_reference, src, trg, pos_idx,
                                  tclip=10.0, reg_weight=0.1, estimator=estimator)


def test_torch_epilogue_matches_reference(variants):
    """AMDIM_KERNELS_CUDA_EPILOGUE=torch: nce_fwd and the torch epilogue, as before the loss op."""
    variants(epilogue="torch")
    src, trg, pos_idx = gpu_inputs(130, 70, 49, 200, torch.bfloat16)
    for estimator in ESTIMATORS:
        assert_within_reference_error(ak.fused_nce_loss, ak.nce_loss_reference, src, trg, pos_idx,
                                      estimator=estimator)


@pytest.mark.parametrize("bwd", BWD_VARIANTS)
def test_mixture_matches_reference(variants, bwd):
    variants(bwd=bwd)
    src_mix, trg, pos_idx = gpu_inputs(60, 70, 25, 96, torch.bfloat16, k=3)
    assert_within_reference_error(ak.fused_mixture_nce_loss, ak.mixture_nce_loss_reference,
                                  src_mix, trg, pos_idx, tau=2.0, alpha=0.3, detach_q=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_forward_matches_reference(variants, dtype):
    variants(fwd="dense", bwd="triton_cublas")
    src, trg, pos_idx = gpu_inputs(130, 70, 49, 200, dtype)
    for estimator in ESTIMATORS:
        assert_within_reference_error(ak.fused_nce_loss, ak.nce_loss_reference, src, trg, pos_idx,
                                      estimator=estimator)


def test_single_split_forward_with_negatives(variants, monkeypatch):
    """The split kernel's FINALIZE path (one column split) with B > 1: on a GPU only reached by
    N in the hundreds of thousands, so forced here."""
    variants(fwd="tiled", bwd="triton")
    monkeypatch.setattr(tnf, "_plan", tnf._plan.__wrapped__)
    monkeypatch.setattr(tnf, "split_columns", lambda n, m, device: (1, m))
    src, trg, pos_idx = gpu_inputs(300, 37, 49, 257, torch.bfloat16)
    for estimator in ESTIMATORS:
        assert_within_reference_error(ak.fused_nce_loss, ak.nce_loss_reference, src, trg, pos_idx,
                                      estimator=estimator)


@pytest.mark.parametrize("variant", ["rational", "wide"])
def test_opt_in_forward_variants_match_reference(variants, monkeypatch, variant):
    variants(fwd="tiled", bwd="triton")
    if variant == "rational":
        monkeypatch.setattr(tnf, "_TANH_CHOICE", "rational")
    else:   # the 256-column tiles alone (each in turn)
        monkeypatch.setattr(tnf, "_plan", tnf._plan.__wrapped__)
    configs = tnf._WIDE_CONFIGS if variant == "wide" else [None]
    for cfg in configs:
        if cfg is not None:
            monkeypatch.setattr(tnf._nce_fwd_split_kernel, "configs", [cfg])
            monkeypatch.setattr(tnf, "CONFIGS", [cfg])
            tnf._nce_fwd_split_kernel.cache.clear()
        src, trg, pos_idx = gpu_inputs(300, 37, 49, 257, torch.bfloat16)
        assert_within_reference_error(ak.fused_nce_loss, ak.nce_loss_reference, src, trg, pos_idx,
                                      tclip=5.0)
    tnf._nce_fwd_split_kernel.cache.clear()


# ---- sync-free, graphs, compile -----------------------------------------------------------------
def _step(src, trg, pos_idx):
    loss, reg = ak.fused_nce_loss(src, trg, pos_idx)
    (loss + reg).backward()
    return loss.detach()


@pytest.mark.parametrize("bwd", BWD_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_no_host_synchronisation(variants, bwd, dtype):
    if bwd == "cuda" and dtype == torch.float16:
        pytest.skip("the CUDA C++ backward reads its fp16 scale back (csrc/cuda/nce_cuda.cpp)")
    variants(bwd=bwd)
    src, trg, pos_idx = gpu_inputs(200, 130, 49, 64, dtype)
    _step(src, trg, pos_idx)   # compile, autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(src, trg, pos_idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("bwd", BWD_VARIANTS)
def test_cuda_graph_capture_replays_the_loss(variants, bwd):
    variants(bwd=bwd)
    src, trg, pos_idx = gpu_inputs(200, 130, 49, 64, torch.bfloat16)
    static_src = src.detach().clone().requires_grad_()
    static_trg = trg.detach().clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):   # warm-up on a side stream, as torch.cuda.graphs requires
        for _ in range(2):
            static_src.grad = static_trg.grad = None
            _step(static_src, static_trg, pos_idx)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_src.grad = static_trg.grad = None
    with torch.cuda.graph(graph):
        static_loss = _step(static_src, static_trg, pos_idx)
    new_src, new_trg, _ = gpu_inputs(200, 130, 49, 64, torch.bfloat16, seed=5)
    with torch.no_grad():
        static_src.copy_(new_src)
        static_trg.copy_(new_trg)
    graph.replay()
    eager_loss, eager_reg = ak.fused_nce_loss(new_src, new_trg, pos_idx)
    eager_grads = torch.autograd.grad(eager_loss + eager_reg, (new_src, new_trg))
    torch.testing.assert_close(static_loss, eager_loss.detach())
    for got, ref in zip((static_src.grad, static_trg.grad), eager_grads):
        torch.testing.assert_close(got, ref)


def test_omitted_pos_idx_on_streams_and_under_graph_capture(variants):
    """pos_idx=None is cached per (N, device, stream) in eager calls and made in the graph during
    capture (_validate.default_pos_idx): each gives the loss of the explicit arange."""
    variants()
    src, trg, _ = (x.detach() for x in gpu_inputs(200, 200, 49, 64, torch.bfloat16))
    want = ak.fused_nce_loss(src, trg, torch.arange(200, device=DEV))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # cached for the side stream; the warm-up capture needs
        for _ in range(2):
            on_side = ak.fused_nce_loss(src, trg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ak.fused_nce_loss(src, trg)
    graph.replay()
    eager = ak.fused_nce_loss(src, trg)   # cached for this stream
    for got in (on_side, captured, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile(variants, mode):
    variants()
    torch._dynamo.reset()
    src, trg, pos_idx = gpu_inputs(130, 70, 49, 200, torch.bfloat16)

    @torch.compile(fullgraph=True, mode=mode)
    def objective(s, t, p):
        loss, reg = ak.fused_nce_loss(s, t, p, tclip=10.0)
        return loss + reg

    for _ in range(3):   # reduce-overhead records its CUDA graph after warm-up runs
        out = objective(src, trg, pos_idx)
        grads = torch.autograd.grad(out, (src, trg))
    loss, reg = ak.fused_nce_loss(src, trg, pos_idx, tclip=10.0)
    want = torch.autograd.grad(loss + reg, (src, trg))
    torch.testing.assert_close(out, loss + reg, rtol=1e-5, atol=1e-6)
    for x, y in zip(grads, want):
        torch.testing.assert_close(x, y, rtol=1e-2, atol=1e-2 * y.abs().max().item())


def test_launches_per_forward_and_backward(variants):
    """At a small shape the host bounds the loss: the forward is the split and finish kernels (at
    most 3 launches; pos_idx omitted adds none after the first call: its arange is cached) and
    the backward at most 4: the epilogue kernel and the variant's kernels (no zero gradients for
    the op's unused outputs). cuBLAS may add kernels of its own to a
    product (split-K): counted apart, and printed."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(prof):
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        ours = [x for x in names if x.startswith(("_nce", "_sum_splits"))]
        return ours, [x for x in names if x not in ours]

    counts = {}
    for bwd in ("triton", "triton_cublas"):
        variants(bwd=bwd)
        src, trg, pos_idx = gpu_inputs(128, 128, 49, 256, torch.bfloat16)
        gl, gr = torch.tensor(0.7, device=DEV), torch.tensor(1.3, device=DEV)
        for _ in range(2):   # compile, autotune
            loss, reg = ak.fused_nce_loss(src, trg, pos_idx)
            torch.autograd.grad((loss, reg), (src, trg), (gl, gr))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as fwd_prof:
            loss, reg = ak.fused_nce_loss(src, trg, pos_idx)
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as bwd_prof:
            torch.autograd.grad((loss, reg), (src, trg), (gl, gr))
            torch.cuda.synchronize()
        counts[bwd] = (kernels(fwd_prof), kernels(bwd_prof))
    print("launches (Triton, other):", counts)
    for bwd, ((fwd_ours, fwd_other), (bwd_ours, bwd_other)) in counts.items():
        assert len(fwd_ours) == 2 and not fwd_other, (bwd, fwd_ours, fwd_other)
        if bwd == "triton":   # epilogue, d src, d trg, the sum of the d src partials
            assert len(bwd_ours) <= 4 and not bwd_other, (bwd, bwd_ours, bwd_other)
        else:                 # epilogue, g; two cuBLAS products
            assert len(bwd_ours) == 2 and 2 <= len(bwd_other) <= 4, (bwd, bwd_ours, bwd_other)


# ---- invalid values, strict mode, precision, dtypes -------------------------------------------
def test_invalid_values_poison_by_default_and_raise_in_strict_mode(variants):
    variants()
    src, trg, pos_idx = gpu_inputs(40, 30, 7, 32, torch.bfloat16)
    for bad in (30, -1, 2**32 + 1):   # 2**32 + 1 wraps to a valid sample in int32
        idx = pos_idx.clone()
        idx[3] = bad
        loss, reg = ak.fused_nce_loss(src, trg, idx)
        (loss + reg).backward()          # memory-safe: no illegal address
        torch.cuda.synchronize()
        assert math.isnan(loss.item()) and math.isnan(reg.item())
        with pytest.raises(ValueError, match=r"pos_idx values must lie in \[0, B\)"):
            ak.fused_nce_loss(src, trg, idx, strict=True)
    nan_trg = trg.detach().clone()
    nan_trg[2, 1, 0] = math.nan
    assert math.isnan(ak.fused_nce_loss(src, nan_trg, pos_idx)[0].item())
    with pytest.raises(ValueError, match="trg contains NaN or Inf"):
        ak.fused_nce_loss(src, nan_trg, pos_idx, strict=True)
    inf_src = src.detach().clone()
    inf_src[1, 1] = math.inf
    assert math.isnan(ak.fused_nce_loss(inf_src, trg, pos_idx)[1].item())


def test_float64_is_refused_naming_the_argument():
    src, trg, pos_idx = gpu_inputs(8, 6, 3, 5, torch.float64)
    with pytest.raises(TypeError, match="src is float64 on cuda"):
        ak.fused_nce_loss(src, trg, pos_idx)
    loss, _ = ak.fused_nce_loss(src, trg, pos_idx, backend="reference")
    assert loss.dtype == torch.float64


@pytest.mark.parametrize("api", ["cuda.matmul", "generic"])
def test_fp32_under_the_per_backend_precision_api(variants, api):
    """torch.backends.cuda.matmul.fp32_precision = "tf32" made the fp32 kernels raise (the legacy
    getter refuses mixed APIs); tf32x3 dots keep them to fp32 accuracy."""
    variants(bwd="triton")
    saved = (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    try:
        if api == "generic":
            torch.backends.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        src, trg, pos_idx = gpu_inputs(130, 70, 49, 200, torch.float32)
        fused = loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx)
        truth = loss_and_grads(ak.nce_loss_reference, src.detach().double().requires_grad_(),
                               trg.detach().double().requires_grad_(), pos_idx)
        for f, t in zip(fused, truth):
            assert (f.double() - t).abs().max() <= 1e-4 * t.abs().max()
    finally:
        torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved
