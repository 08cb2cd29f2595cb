"""The Triton g + cuBLAS backward of nce_bwd (amdim_kernels/triton_nce_bwd_cublas.py).

Without CUDA the g kernel runs under the Triton interpreter and the products are CPU matmuls
with fp32 accumulation (what cuBLAS does with 16-bit operands); g itself is rounded to the input
dtype as on the GPU. Ground truth: float64 autograd of the plain composition of the statistics.
"""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

pytest.importorskip("triton")
from amdim_kernels import triton_nce_bwd_cublas as tgc  # noqa: E402
from test_cuda_nce_bwd import input_grads, problem, rel_err, statistics  # noqa: E402
from test_triton_nce_bwd import CASES, TOL, _scores  # noqa: E402
from sm90_compile import run_compile_script  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # discarded where() lanes


@pytest.fixture(autouse=True)
def exact_fp32():
    saved = (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    yield
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def run(src64, trg64, pos_idx, grads, tclip, neg_reduction, dtype, kernel=None):
    src, trg = src64.to(DEVICE, dtype), trg64.to(DEVICE, dtype)
    pos_idx = pos_idx.to(DEVICE)
    with torch.no_grad():
        neg_stat = statistics(_scores(src, trg), pos_idx, tclip, neg_reduction)[1]
    args = [g.to(DEVICE, torch.float32) for g in grads] + [src, trg, pos_idx,
                                                          neg_stat.to(torch.float32)]
    return (kernel or tgc.nce_bwd_triton_cublas)(*args, tclip, neg_reduction), (src, trg)


@pytest.fixture
def small_chunks(monkeypatch):
    """g chunks of 56 bytes (2 x 7 fp32, 4 x 7 16-bit): several row and column chunks, ragged."""
    monkeypatch.setattr(tgc, "_COL_QUANTUM", 7)
    monkeypatch.setattr(tgc, "G_BYTES", 56)


# every case in one chunk; a few (fp32 and 16-bit, both reductions) in many small chunks
_CHUNKED = [(case, "one") for case in CASES] + [(CASES[i], "many") for i in (1, 5, 6, 8)]


@pytest.mark.parametrize("case,chunking", _CHUNKED)
def test_matches_float64_autograd(case, chunking, request):
    n, b, l, d, tclip, neg_reduction, dtype = case
    if chunking == "many":
        request.getfixturevalue("small_chunks")
        rows, cols = tgc.chunks(n, b * l, dtype.itemsize)
        assert rows < n and (cols < b * l or b * l <= tgc._COL_QUANTUM)
    src64, trg64, pos_idx, grads = problem(n, b, l, d, seed=n * d + b)
    (grad_src, grad_trg), (src, trg) = run(src64, trg64, pos_idx, grads, tclip, neg_reduction,
                                           dtype)
    truth = input_grads(src.double().cpu(), trg.double().cpu(), pos_idx, tclip, neg_reduction,
                        grads)
    for name, got, want, like in zip(("grad_src", "grad_trg"), (grad_src, grad_trg), truth,
                                     (src, trg)):
        assert got.dtype == dtype and got.shape == like.shape, name
        assert torch.isfinite(got).all(), name
        err = rel_err(got.cpu(), want)
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("n,m,esize,budget", [(1, 1, 2, 1 << 20), (4096, 200704, 2, 32 << 20),
                                               (32768, 1605632, 2, 32 << 20), (7, 125, 4, 1024),
                                               (200000, 49, 4, 1 << 20)])
def test_chunks_cover_the_matrix_within_the_budget(n, m, esize, budget):
    rows, cols = tgc.chunks(n, m, esize, budget)
    assert 1 <= rows <= n and 1 <= cols <= m
    assert rows * cols * esize <= budget
    assert cols == m or cols % tgc._COL_QUANTUM == 0
    # spread evenly: the last chunk is not a sliver
    assert m - (math.ceil(m / cols) - 1) * cols > cols - tgc._COL_QUANTUM
    assert n - (math.ceil(n / rows) - 1) * rows >= rows - math.ceil(n / rows)


def test_s2_extra_memory_is_within_64_mib():
    """S2 (N = B = 4096, L = 49, D = 1024, bf16): the g chunk plus the fp32 d src accumulator."""
    n, m, d = 4096, 4096 * 49, 1024
    rows, cols = tgc.chunks(n, m, 2)
    assert rows == n
    extra = rows * cols * 2 + (n * d * 4 if cols < m else 0)
    assert extra <= 64 << 20, extra / 2**20


def test_fp16_keeps_gradients_below_its_normal_range():
    """Gradients ~1e-7 / sqrt(D) are fp16 subnormals or zero: the power-of-two scale keeps them to
    fp16's relative precision (without it they flush to 0)."""
    src64, trg64, pos_idx, grads = problem(19, 4, 7, 37, seed=5)
    grads = tuple(g * 1e-5 for g in grads)
    (grad_src, grad_trg), (src, trg) = run(src64, trg64, pos_idx, grads, 20.0, "logsumexp",
                                           torch.float16)
    truth = input_grads(src.double().cpu(), trg.double().cpu(), pos_idx, 20.0, "logsumexp", grads)
    assert truth[0].abs().max() < 2 ** -14   # below fp16's smallest normal
    for got, want in zip((grad_src, grad_trg), truth):
        assert (got.cpu().double() - want).abs().max() <= 2e-3 * want.abs().max() + 2 ** -24


def test_fp16_scale_bound_holds_and_falls_back_to_one():
    src64, trg64, pos_idx, grads = problem(9, 4, 3, 16, seed=2)
    src, trg = src64.half(), trg64.half()
    gp, gn, gs = (g.float() for g in grads)
    p, inv_p = tgc.half_scale(gp, gn, gs, src, trg.view(-1, 16), 16)
    truth = input_grads(src.double(), trg.double(), pos_idx, 20.0, "logsumexp", grads)
    assert p.item() * inv_p.item() == 1.0 and math.log2(p.item()).is_integer()
    # p * max |g| <= 2^14: the bound holds for the true g (its largest element bounds a product)
    a = _scores(src, trg)
    g_bound = (max(gp.abs().max(), gn.abs().max()) + 2 * gs.abs() * a.abs().max()) / 4
    assert p.item() * g_bound <= 2 ** 14
    huge = torch.full_like(src, 60000.0)    # row norms overflow fp16: no usable bound
    assert tgc.half_scale(gp, gn, gs, huge, trg.view(-1, 16), 16)[0].item() == 1.0
    zero = tgc.half_scale(gp * 0, gn * 0, gs * 0, src, trg.view(-1, 16), 16)[0].item()
    assert zero == 1.0
    assert truth[0].abs().max() > 0


def test_saturated_scores_get_the_true_gradient_through_the_clip():
    from test_saturated_scores import assert_relative_to_each_element, saturated_problem
    src64, trg64, pos_idx, grads, tclip = saturated_problem()
    got, (src, trg) = run(src64, trg64, pos_idx, grads, tclip, "logsumexp", torch.float32)
    assert_relative_to_each_element(got, src, trg, pos_idx, tclip, grads, 1e-3)


@pytest.mark.parametrize("estimator", ["nce", "jsd", "dv"])
def test_estimator_gradients_match_reference(estimator):
    from amdim_kernels.nce import estimator_loss
    from amdim_kernels.reference import nce_loss_reference
    from test_triton_nce_bwd import triton_loss_grads
    n, b, l, d, tclip, reg_weight = 18, 7, 5, 21, 3.0, 0.2
    src64, trg64, pos_idx, _ = problem(n, b, l, d, seed=11)
    src, trg = src64.float().to(DEVICE), trg64.float().to(DEVICE)
    neg_reduction = "softplus_sum" if estimator == "jsd" else "logsumexp"

    def compose(pos, neg_stat, sumsq):
        return estimator_loss(estimator, pos, neg_stat, b) + sumsq * (reg_weight / (b * pos.numel()))

    got = triton_loss_grads(src, trg, pos_idx.to(DEVICE), compose, tclip, neg_reduction,
                            backward=tgc.nce_bwd_triton_cublas)
    s, t = src64.float().double().requires_grad_(), trg64.float().double().requires_grad_()
    loss, reg = nce_loss_reference(s, t, pos_idx, tclip=tclip, reg_weight=reg_weight,
                                   estimator=estimator)
    want = torch.autograd.grad(loss + reg, (s, t))
    for name, x, y in zip(("grad_src", "grad_trg"), got, want):
        assert rel_err(x.cpu(), y) <= 2e-5, (name, rel_err(x.cpu(), y))


def test_mixture_gradients_match_reference():
    from amdim_kernels import mixture
    from amdim_kernels.reference import mixture_nce_loss_reference
    from test_triton_nce_bwd import triton_loss_grads
    n, k, b, l, d, tau, alpha = 6, 3, 5, 7, 19, 2.0, 0.3
    g = torch.Generator().manual_seed(2)
    src_mix64 = 2 * torch.randn(n, k, d, generator=g, dtype=torch.float64)
    trg64 = 2 * torch.randn(b, l, d, generator=g, dtype=torch.float64)
    pos_idx = torch.randint(0, b, (n,), generator=g)

    def compose(pos, neg_stat, sumsq):
        loss = mixture.mixture_fwd(pos.cpu().view(n, k, l), neg_stat.cpu().view(n, k), tau, alpha,
                                   False)
        return loss.to(pos.device) + sumsq * (0.05 / (b * pos.numel()))

    got = triton_loss_grads(src_mix64.float().reshape(n * k, d).to(DEVICE), trg64.float().to(DEVICE),
                            pos_idx.repeat_interleave(k).to(DEVICE), compose, 20.0, "logsumexp",
                            backward=tgc.nce_bwd_triton_cublas)
    s, t = src_mix64.float().double().requires_grad_(), trg64.float().double().requires_grad_()
    loss, reg = mixture_nce_loss_reference(s, t, pos_idx, tau=tau, alpha=alpha, detach_q=False,
                                           tclip=20.0, reg_weight=0.05)
    want = torch.autograd.grad(loss + reg, (s, t))
    assert rel_err(got[0].cpu().view(n, k, d), want[0]) <= 2e-5
    assert rel_err(got[1].cpu(), want[1]) <= 2e-5


def test_pos_idx_outside_the_range_gives_the_row_no_positives():
    """As the other Triton kernels: an out-of-range pos_idx (also one beyond int32, which would
    wrap to a valid sample) is not used to index memory; the other rows' gradients are exact."""
    src64, trg64, _, grads = problem(4, 3, 5, 6, seed=1)
    src, trg = src64.float().to(DEVICE), trg64.float().to(DEVICE)
    valid = torch.tensor([0, 1, 2, 0])
    neg_stat = statistics(_scores(src, trg), valid.to(DEVICE), None, "softplus_sum")[1].float()
    got = tgc.nce_bwd_triton_cublas(*[g.to(DEVICE, torch.float32) for g in grads], src, trg,
                                    torch.tensor([0, 1, 2, 2**32 + 1], device=DEVICE), neg_stat,
                                    None, "softplus_sum")
    truth = input_grads(src.double().cpu(), trg.double().cpu(), valid, None, "softplus_sum", grads)
    assert rel_err(got[0][:3].cpu(), truth[0][:3]) < 1e-5


# ---- sm_90 compilation without a GPU ----------------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent(r"""
    import json
    import torch
    from sm90_compile import compile_one, jit_function
    from amdim_kernels import triton_nce_bwd_cublas as tgc

    fn = jit_function(tgc._nce_g_kernel)
    out = []
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dtype in ("bf16", "fp16", "fp32"):
        types = {a: ("*" + dtype if a in ("src_ptr", "trg_ptr", "g_ptr") else "*i64"
                     if a == "pos_idx_ptr" else "*fp32" if a.endswith("_ptr") else "fp32"
                     if a in ("scale", "tclip", "inv_tclip") else "i32") for a in fn.arg_names}
        divisible = [a for a in fn.arg_names if a.endswith("_ptr")] + ["D", "C"]
        variants = [dict(CLIP=True, NEG_LSE=True), dict(CLIP=True, NEG_LSE=False)]
        named = {"src_ptr": torch.empty(0, dtype=torch_dtype[dtype])}
        for prec in (["ieee", "tf32x3"] if dtype == "fp32" else ["ieee"]):
            for cfg in tgc.prune_configs(tgc._GPU_CONFIGS + tgc._FP32_CONFIGS, named):
                for variant in variants:
                    consts = dict(variant, HALF_G=dtype == "fp16", INPUT_PRECISION=prec,
                                  UPCAST=False, **cfg.kwargs)
                    res = compile_one(fn, types, consts, divisible, cfg.num_warps, cfg.num_stages)
                    out.append(dict(dtype=dtype, precision=prec, config=cfg.kwargs,
                                    num_warps=cfg.num_warps, variant=variant, **res))
    print("RESULT " + json.dumps(out))
""")

# Spill budget per thread (ptxas, sm_90), bytes: none expected for the 16-bit tiles (the g tile
# is stored, not accumulated), a little for fp32's FMA-unit dot.
SPILL_BUDGET = {"bf16": 64, "fp16": 64, "fp32": 640}


@pytest.fixture(scope="module")
def sm90_builds(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    return run_compile_script(_COMPILE_SCRIPT, tmp_path_factory.mktemp("triton_cache"), timeout=1800)


def test_every_config_compiles_for_sm90_within_budgets(sm90_builds):
    n16 = len(tgc._GPU_CONFIGS)
    n32 = len(tgc._FP32_CONFIGS)
    assert len(sm90_builds) == n16 * 2 * 2 + n32 * 2 * 2   # 2 epilogues; bf16 + fp16, 2 precisions
    for r in sm90_builds:
        assert r["cubin"] > 0, r
        assert r["shared"] <= 227 * 1024, r
        assert r["regs"] is not None and r["spills"] is not None, r
    over = [(r["dtype"], r["precision"], tuple(r["config"].values()), r["num_warps"], r["variant"],
             r["regs"], r["spills"]) for r in sm90_builds if r["spills"] > SPILL_BUDGET[r["dtype"]]]
    assert not over, over


# ---- on a GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_s2_extra_memory_is_within_64_mib(dtype):
    """S2's shape, measured: the variant's peak memory beyond its inputs and the gradients."""
    n, b, l, d = 4096, 4096, 49, 1024
    dev = torch.device("cuda")
    src = torch.randn(n, d, device=dev).to(dtype)
    trg = torch.randn(b, l, d, device=dev).to(dtype)
    args = (torch.randn(n, l, device=dev) / (n * l), torch.rand(n, device=dev) / n,
            torch.tensor(1e-3, device=dev), src, trg, torch.arange(n, device=dev),
            torch.full((n,), 30.0, device=dev), 20.0, "logsumexp")
    tgc.nce_bwd_triton_cublas(*args)   # autotunes; cuBLAS workspace
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grad_src, grad_trg = tgc.nce_bwd_triton_cublas(*args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - grad_src.nbytes - grad_trg.nbytes
    limit = 64 << 20 if dtype != torch.float16 else 80 << 20   # fp16: + its fp32 chunk product
    assert extra <= limit, f"{extra / 2**20:.1f} MiB beyond the gradients"
