"""The Triton row/column backward of nce_bwd (amdim_kernels/triton_nce_bwd.py).

Without CUDA the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py);
16-bit dots are upcast to fp32 there (the interpreter's bf16 tl.dot is wrong), after g is rounded
to the input dtype, so the 16-bit rounding of the real kernel is still exercised. The sm_90 compile
check runs in a subprocess without the interpreter. Tests marked gpu run on a real GPU.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
from amdim_kernels import triton_nce_bwd as tnb  # noqa: E402
from amdim_kernels.nce import estimator_loss  # noqa: E402
from amdim_kernels.reference import mixture_nce_loss_reference, nce_loss_reference  # noqa: E402
from test_cuda_nce_bwd import input_grads, problem, rel_err, statistics  # noqa: E402
from sm90_compile import run_compile_script  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REDUCTIONS = ("logsumexp", "softplus_sum")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The interpreter evaluates both sides of tl.where (exp(+inf) of B == 1 rows, log2(0)).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture
def fp32_precision():
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


def run_triton(src64, trg64, pos_idx, grads, tclip, neg_reduction, dtype):
    """The Triton nce_bwd on `dtype` copies of float64 inputs, with the float64 neg_stat."""
    src, trg = src64.to(DEVICE, dtype), trg64.to(DEVICE, dtype)
    pos_idx = pos_idx.to(DEVICE)
    with torch.no_grad():
        neg_stat = statistics(_scores(src, trg), pos_idx, tclip, neg_reduction)[1]
    args = [g.to(DEVICE, torch.float32) for g in grads] + [src, trg, pos_idx,
                                                          neg_stat.to(torch.float32)]
    return tnb.nce_bwd_triton(*args, tclip, neg_reduction), (src, trg)


def _scores(src, trg):
    n, d = src.shape
    return (src.double() @ trg.double().reshape(-1, d).T / math.sqrt(d)).view(n, *trg.shape[:2])


# (N, B, L, D, tclip, neg_reduction, dtype): nothing a multiple of the interpreter's 16-wide
# tiles; D = 9 takes the one-chunk path, D = 37 three D-out chunks and three D chunks;
# B == 1 (no negatives), repeated pos_idx (N > B), a saturating clip (tclip 2).
CASES = [
    (7, 5, 3, 9, 20.0, "logsumexp", torch.float32),
    (33, 6, 5, 37, 2.0, "logsumexp", torch.float32),
    (33, 6, 5, 37, None, "softplus_sum", torch.float32),
    (20, 1, 5, 17, 20.0, "logsumexp", torch.float32),
    (20, 1, 5, 17, None, "softplus_sum", torch.float32),
    (5, 9, 7, 20, 10.0, "softplus_sum", torch.float32),
    (19, 4, 7, 37, 5.0, "logsumexp", torch.float16),
    (19, 4, 7, 9, None, "softplus_sum", torch.float16),
    (19, 4, 7, 37, 5.0, "logsumexp", torch.bfloat16),
    (6, 2, 25, 20, 20.0, "softplus_sum", torch.bfloat16),
]
# relative to max |grad| (float64 truth of the rounded inputs): fp32 to a few ulp of the sums,
# 16-bit to the rounding of g to the input dtype (2^-11, 2^-8) summed over a few terms
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("n,b,l,d,tclip,neg_reduction,dtype", CASES)
def test_matches_float64_autograd(n, b, l, d, tclip, neg_reduction, dtype, fp32_precision):
    fp32_precision("highest")
    src64, trg64, pos_idx, grads = problem(n, b, l, d, seed=n * d + b)
    (grad_src, grad_trg), (src, trg) = run_triton(src64, trg64, pos_idx, grads, tclip,
                                                  neg_reduction, dtype)
    truth = input_grads(src.double().cpu(), trg.double().cpu(), pos_idx, tclip, neg_reduction, grads)
    for name, got, want, like in zip(("grad_src", "grad_trg"), (grad_src, grad_trg), truth, (src, trg)):
        assert got.dtype == dtype and got.shape == like.shape, name
        assert torch.isfinite(got).all(), name
        err = rel_err(got.cpu(), want)
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("neg_reduction", REDUCTIONS)
def test_independent_of_column_splits(neg_reduction, monkeypatch):
    """One split, and splits of 16 columns (the interpreter's tile width) holding only positives,
    agree with the default split (which sums a few fp32 partials)."""
    src64, trg64, _, grads = problem(21, 6, 9, 20, seed=3)
    pos_idx = torch.full((21,), 2)
    pos_idx[15:] = 4
    m = 6 * 9
    default, _ = run_triton(src64, trg64, pos_idx, grads, 20.0, neg_reduction, torch.float32)
    assert tnb.src_splits(21, m, 20, torch.device(DEVICE))[0] > 1   # the default splits too
    for forced in [(1, m), (math.ceil(m / 16), 16)]:
        monkeypatch.setattr(tnb, "src_splits", lambda n, m, d, device, forced=forced: forced)
        got, _ = run_triton(src64, trg64, pos_idx, grads, 20.0, neg_reduction, torch.float32)
        for x, y in zip(got, default):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6 * y.abs().max().item())


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (7, 125, 40), (300, 25088, 2048), (4096, 200704, 1024),
                                   (50000, 100, 4096)])
def test_src_splits_cover_every_column_within_the_memory_cap(n, m, d):
    splits, cols = tnb.src_splits(n, m, d, torch.device(DEVICE))
    assert (splits - 1) * cols < m <= splits * cols
    assert splits == 1 or splits * n * d * 4 <= tnb._SPLIT_BYTES


def test_fp16_keeps_gradients_below_its_normal_range():
    """Gradients of a mean over N*L terms are ~1e-7 / sqrt(D), fp16 subnormals or zero: the
    per-row / per-column power-of-two scale keeps them to fp16's relative precision."""
    src64, trg64, pos_idx, grads = problem(19, 4, 7, 37, seed=5)
    grads = tuple(g * 1e-5 for g in grads)
    (grad_src, grad_trg), (src, trg) = run_triton(src64, trg64, pos_idx, grads, 20.0, "logsumexp",
                                                  torch.float16)
    truth = input_grads(src.double().cpu(), trg.double().cpu(), pos_idx, 20.0, "logsumexp", grads)
    assert truth[0].abs().max() < 2 ** -14   # below fp16's smallest normal
    for got, want in zip((grad_src, grad_trg), truth):
        # the outputs themselves are fp16, so only their own rounding (subnormal spacing) is lost
        assert (got.cpu().double() - want).abs().max() <= 2e-3 * want.abs().max() + 2 ** -24


# ---- the whole loss: Triton forward, autograd's composition, Triton backward ----------------
def triton_loss_grads(src, trg, pos_idx, compose, tclip, neg_reduction, backward=None):
    """d loss / d (src, trg) with the Triton nce_fwd and `backward` (default: the Triton nce_bwd),
    and `compose` (pos, neg_stat, sumsq) -> loss in between, as ops.py's autograd formula wires
    them."""
    from amdim_kernels.triton_nce_fwd import nce_fwd_triton
    stats = [x.requires_grad_() for x in nce_fwd_triton(src, trg, pos_idx, tclip, neg_reduction)]
    grads = torch.autograd.grad(compose(*stats), stats, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(stats, grads)]
    return (backward or tnb.nce_bwd_triton)(*grads, src, trg, pos_idx, stats[1].detach(), tclip,
                                            neg_reduction)


@pytest.mark.parametrize("estimator", ["nce", "jsd", "dv"])
@pytest.mark.parametrize("tclip,reg_weight", [(20.0, 0.05), (None, 0.0), (3.0, 0.2)])
def test_estimator_gradients_match_reference(estimator, tclip, reg_weight, fp32_precision):
    fp32_precision("highest")
    n, b, l, d = 18, 7, 5, 21
    src64, trg64, pos_idx, _ = problem(n, b, l, d, seed=11)
    src, trg = src64.float().to(DEVICE), trg64.float().to(DEVICE)
    neg_reduction = "softplus_sum" if estimator == "jsd" else "logsumexp"

    def compose(pos, neg_stat, sumsq):
        return estimator_loss(estimator, pos, neg_stat, b) + sumsq * (reg_weight / (b * pos.numel()))

    got = triton_loss_grads(src, trg, pos_idx.to(DEVICE), compose, tclip, neg_reduction)
    s, t = src.double().cpu().requires_grad_(), trg.double().cpu().requires_grad_()
    loss, reg = nce_loss_reference(s, t, pos_idx, tclip=tclip, reg_weight=reg_weight,
                                   estimator=estimator)
    want = torch.autograd.grad(loss + reg, (s, t))
    for name, x, y in zip(("grad_src", "grad_trg"), got, want):
        assert rel_err(x.cpu(), y) <= 2e-5, (name, rel_err(x.cpu(), y))


@pytest.mark.parametrize("detach_q,tau,alpha", [(True, 1.0, None), (False, 2.0, 0.3)])
def test_mixture_gradients_match_reference(detach_q, tau, alpha, fp32_precision):
    from amdim_kernels import mixture   # the mixture epilogue op (its CPU kernel, autograd)
    fp32_precision("highest")
    n, k, b, l, d = 6, 3, 5, 7, 19
    g = torch.Generator().manual_seed(2)
    src_mix64 = 2 * torch.randn(n, k, d, generator=g, dtype=torch.float64)
    trg64 = 2 * torch.randn(b, l, d, generator=g, dtype=torch.float64)
    pos_idx = torch.randint(0, b, (n,), generator=g)
    a = 1.0 / tau if alpha is None else alpha
    reg_weight = 0.05

    def compose(pos, neg_stat, sumsq):
        loss = mixture.mixture_fwd(pos.cpu().view(n, k, l), neg_stat.cpu().view(n, k), tau, a,
                                   detach_q)
        return loss.to(pos.device) + sumsq * (reg_weight / (b * pos.numel()))

    src_rows = src_mix64.float().reshape(n * k, d).to(DEVICE)
    got = triton_loss_grads(src_rows, trg64.float().to(DEVICE),
                            pos_idx.repeat_interleave(k).to(DEVICE), compose, 20.0, "logsumexp")
    s, t = src_mix64.clone().requires_grad_(), trg64.clone().requires_grad_()
    loss, reg = mixture_nce_loss_reference(s, t, pos_idx, tau=tau, alpha=alpha, detach_q=detach_q,
                                           tclip=20.0, reg_weight=reg_weight)
    want = torch.autograd.grad(loss + reg, (s, t))
    assert rel_err(got[0].cpu().view(n, k, d), want[0]) <= 2e-5
    assert rel_err(got[1].cpu(), want[1]) <= 2e-5


def test_saturated_scores_get_the_true_gradient_through_the_clip():
    """|a| from 10 to 30 tclip: d s / d a = 1 - tanh^2 ~ 4 exp(-2|a|/tclip) is 1e-9 .. 1e-26; with
    1 - t^2 from a rounded t it would stall at ~1e-7. No lgt_reg term, so the clip's derivative is
    the whole gradient; every element is checked relative to itself."""
    from test_saturated_scores import assert_relative_to_each_element, saturated_problem
    src64, trg64, pos_idx, grads, tclip = saturated_problem()
    got, (src, trg) = run_triton(src64, trg64, pos_idx, grads, tclip, "logsumexp", torch.float32)
    assert_relative_to_each_element(got, src, trg, pos_idx, tclip, grads, 1e-3)


_OUT_OF_RANGE_SCRIPT = textwrap.dedent(r"""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from test_cuda_nce_bwd import input_grads, problem, statistics
    from amdim_kernels.triton_nce_bwd import nce_bwd_triton
    from amdim_kernels.triton_nce_fwd import nce_fwd_triton
    src64, trg64, _, grads = problem(4, 3, 5, 6, seed=1)
    pos_idx = torch.tensor([0, 1, 2, 2**32 + 1])   # int32 truncation of the last is 1, a valid sample
    src, trg = src64.float(), trg64.float()
    pos, neg_stat, sumsq = nce_fwd_triton(src, trg, pos_idx, 20.0, "logsumexp")
    ours = nce_bwd_triton(*[g.float() for g in grads], src, trg, pos_idx, neg_stat, 20.0, "logsumexp")
    # the kernels' contract: a row whose pos_idx is outside [0, B) has no positives at all
    no_pos = torch.tensor([0, 1, 2, -1])
    a = (src64 @ trg64.reshape(-1, 6).T / 6 ** 0.5).view(4, 3, 5)
    truth_neg = statistics(a, no_pos.clamp(min=0), 20.0, "logsumexp")[1]
    s = 20.0 * torch.tanh(a[3] / 20.0)
    print(repr([float(neg_stat[3] - s.logsumexp((0, 1))), float((neg_stat[:3] - truth_neg[:3]).abs().max())]))
""")


def test_pos_idx_outside_int32_is_out_of_range_not_wrapped():
    """pos_idx = 2**32 + 1 wraps to 1 in int32: the backward gathered grad_pos at (i - pos_idx) * L
    (an address 2**32 * L below the tensor: a segfault under the interpreter, an illegal address
    on a GPU). Both kernels must treat it as what it is, out of range: no positives in that row.
    Run in a child process, so that a crash is a failure, not the end of the test session."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _OUT_OF_RANGE_SCRIPT, os.path.join(ROOT, "tests")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    last_row, others = eval(proc.stdout.strip().splitlines()[-1])
    assert abs(last_row) < 1e-4     # every column of row 3 is a negative
    assert others < 1e-4


def test_rejects_bad_arguments():
    src64, trg64, pos_idx, grads = problem(4, 3, 2, 5, seed=0)
    src, trg = src64.float().to(DEVICE), trg64.float().to(DEVICE)
    gp, gn, gs = (g.float().to(DEVICE) for g in grads)
    pos_idx, ns = pos_idx.to(DEVICE), torch.zeros(4, device=DEVICE)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        tnb.nce_bwd_triton(gp, gn, gs, src.double(), trg.double(), pos_idx, ns, 20.0, "logsumexp")
    with pytest.raises(ValueError, match="neg_reduction"):
        tnb.nce_bwd_triton(gp, gn, gs, src, trg, pos_idx, ns, 20.0, "sum")
    with pytest.raises(ValueError, match=r"grad_pos must be \(N, L\)"):
        tnb.nce_bwd_triton(gp.T, gn, gs, src, trg, pos_idx, ns, 20.0, "logsumexp")
    with pytest.raises(ValueError, match="tclip"):
        tnb.nce_bwd_triton(gp, gn, gs, src, trg, pos_idx, ns, 1e-60, "logsumexp")
    with pytest.raises(ValueError, match="pos_idx must be int64"):
        tnb.nce_bwd_triton(gp, gn, gs, src, trg, pos_idx.int(), ns, 20.0, "logsumexp")


# (which kernel backs nce_bwd on CUDA: tests/test_cuda_path.py)


# ---- sm_90 compilation without a GPU ----------------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent(r"""
    import json
    import torch
    from sm90_compile import compile_one, jit_function
    from amdim_kernels import triton_nce_bwd as tnb

    out = []
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for name, kernel in (("src", tnb._nce_bwd_src_kernel), ("trg", tnb._nce_bwd_trg_kernel)):
        fn = jit_function(kernel)
        for dtype in ("bf16", "fp16", "fp32"):
            types = {a: ("*" + dtype if a in ("src_ptr", "trg_ptr", "out_ptr") else "*i64"
                         if a == "pos_idx_ptr" else "*fp32" if a.endswith("_ptr") else "fp32"
                         if a in ("scale", "tclip", "inv_tclip") else "i32") for a in fn.arg_names}
            divisible = [a for a in fn.arg_names if a.endswith("_ptr")] + ["D"]
            # the heaviest epilogue (clip and logsumexp) in every config, both D paths; in bf16
            # the softplus_sum epilogue as well
            variants = [dict(CLIP=True, NEG_LSE=True, ONE_CHUNK=False),
                        dict(CLIP=True, NEG_LSE=True, ONE_CHUNK=True)]
            if dtype == "bf16":
                variants.append(dict(CLIP=True, NEG_LSE=False, ONE_CHUNK=False))
            named = {"src_ptr": torch.empty(0, dtype=torch_dtype[dtype]), "D": 4096}
            for prec in (["ieee", "tf32x3"] if dtype == "fp32" else ["ieee"]):
                for cfg in tnb.prune_configs(kernel.configs, named):
                    for variant in variants:
                        consts = dict(variant, HALF_G=dtype == "fp16", INPUT_PRECISION=prec,
                                      UPCAST=False, **cfg.kwargs)
                        res = compile_one(fn, types, consts, divisible, cfg.num_warps, cfg.num_stages)
                        out.append(dict(kernel=name, dtype=dtype, precision=prec, config=cfg.kwargs,
                                        num_warps=cfg.num_warps, variant=variant, **res))
    print("RESULT " + json.dumps(out))
""")

# Spill budget per thread (ptxas, sm_90), bytes: what the chosen configs need with a margin of
# ~20% (seen: 16-bit <= 132, on the 128-row / 128-column d src tiles; fp32 ieee <= 512, its dot
# runs on the FMA units). The 4-warp and 128-wide d trg tiles, which spilled 70-580 bytes, were
# dropped; so was a branch around the grad_pos gather that cost up to 14 KB.
SPILL_BUDGET = {"bf16": 160, "fp16": 160, "fp32": 640}


@pytest.fixture(scope="module")
def sm90_builds(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    return run_compile_script(_COMPILE_SCRIPT, tmp_path_factory.mktemp("triton_cache"), timeout=1800)


def test_every_config_compiles_for_sm90_within_budgets(sm90_builds):
    # the GPU config lists (this process interprets, so the kernels hold the interpreter's)
    bf16 = {"src_ptr": torch.empty(0, dtype=torch.bfloat16), "D": 4096}
    n16 = {k: len(tnb.prune_configs(configs + tnb._FP32_CONFIGS, bf16))
           for k, configs in (("src", tnb._SRC_CONFIGS), ("trg", tnb._TRG_CONFIGS))}
    n32 = len(tnb._FP32_CONFIGS)
    # per kernel: bf16 x 3 variants + fp16 x 2 over the 16-bit configs, fp32 x 2 precisions x 2
    assert len(sm90_builds) == sum(5 * v for v in n16.values()) + 2 * 4 * n32
    for r in sm90_builds:
        assert r["cubin"] > 0, r
        assert r["shared"] <= 227 * 1024, r          # an H100 block's shared-memory limit
        assert r["regs"] is not None and r["spills"] is not None, r   # ptxas -v was parsed
    over = [(r["kernel"], r["dtype"], r["precision"], tuple(r["config"].values()), r["num_warps"],
             r["variant"], r["regs"], r["spills"])
            for r in sm90_builds if r["spills"] > SPILL_BUDGET[r["dtype"]]]
    assert not over, over


# ---- on a GPU ---------------------------------------------------------------------------------
# (N, B, L, D, tclip, neg_reduction, dtype): ragged everywhere; D = 7, 33, 64 (one chunk), 257 and
# 1030 (several D-out chunks and column splits); B == 1; every dtype with both reductions. A short
# list: each new shape autotunes and each constexpr combination compiles every config.
GPU_CASES = [
    (5, 5, 3, 7, 20.0, "logsumexp", torch.float32),
    (13, 6, 5, 33, None, "softplus_sum", torch.float16),
    (4, 1, 49, 8, 20.0, "logsumexp", torch.bfloat16),
    (4, 1, 49, 8, None, "softplus_sum", torch.float32),
    (300, 600, 49, 257, 20.0, "logsumexp", torch.bfloat16),
    (300, 600, 49, 257, 20.0, "logsumexp", torch.float16),
    (300, 600, 49, 257, 20.0, "logsumexp", torch.float32),
    (300, 600, 49, 257, None, "softplus_sum", torch.bfloat16),
    (70, 300, 25, 1030, 20.0, "softplus_sum", torch.float32),
    (70, 300, 25, 1030, 20.0, "logsumexp", torch.bfloat16),
    (513, 130, 49, 64, 20.0, "logsumexp", torch.bfloat16),
    (513, 130, 49, 64, None, "softplus_sum", torch.float16),
]
GPU_TOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("n,b,l,d,tclip,neg_reduction,dtype", GPU_CASES)
@pytest.mark.parametrize("precision", ["highest", "high"])
def test_gpu_matches_float64_autograd(n, b, l, d, tclip, neg_reduction, dtype, precision,
                                      fp32_precision):
    """As tests/test_cuda_nce_bwd.py holds the CUDA kernel: within twice plain torch's error
    (fp32: ieee dots at "highest", tf32x3 at "high")."""
    if precision == "high" and dtype != torch.float32:
        pytest.skip("the fp32 matmul precision only matters for fp32 inputs")
    fp32_precision(precision)
    src64, trg64, pos_idx, grads = problem(n, b, l, d, seed=n + b)
    ours, (src, trg) = run_triton(src64, trg64, pos_idx, grads, tclip, neg_reduction, dtype)
    grads = [g.cuda() for g in grads]
    pos_idx = pos_idx.cuda()
    truth = input_grads(src.double(), trg.double(), pos_idx, tclip, neg_reduction, grads)
    plain = input_grads(src, trg, pos_idx, tclip, neg_reduction, grads)
    for name, o, p, t in zip(("grad_src", "grad_trg"), ours, plain, truth):
        assert o.dtype == dtype and torch.isfinite(o).all(), name
        assert rel_err(o, t) <= 2 * rel_err(p, t) + GPU_TOL[dtype], \
            f"{name}: error {rel_err(o, t):.3g}, plain torch {rel_err(p, t):.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_extra_memory_is_bounded(dtype):
    n, l, d = 1024, 49, 256                  # the N x M fp32 score matrix alone would be 196 MiB
    dev = torch.device("cuda")
    src = torch.randn(n, d, device=dev).to(dtype)
    trg = torch.randn(n, l, d, device=dev).to(dtype)
    args = (torch.randn(n, l, device=dev) / (n * l), torch.rand(n, device=dev) / n,
            torch.tensor(1e-3, device=dev), src, trg, torch.arange(n, device=dev),
            torch.full((n,), 30.0, device=dev), 20.0, "logsumexp")
    tnb.nce_bwd_triton(*args)                # autotunes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grad_src, grad_trg = tnb.nce_bwd_triton(*args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - grad_src.nbytes - grad_trg.nbytes
    assert extra <= tnb._SPLIT_BYTES + (1 << 20), f"{extra / 2**20:.1f} MiB beyond the gradients"
