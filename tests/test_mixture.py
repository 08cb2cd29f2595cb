"""fused_mixture_nce_loss (spec section 3) against the spec reference; the mixture epilogue ops
(C++ CPU, Triton under the interpreter, sm_90 compile); bad input."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import amdim_kernels as ak
from amdim_kernels.nce import Dispatch, record_dispatch
from loss_checks import (assert_error_within_torch_error, assert_matches, expect_fused, loss_and_grads,
                         make_inputs)

pytestmark = pytest.mark.usefixtures("threads")   # the C++ kernels' per-thread merges

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # where the Triton kernels run

# (N, B, L, D): ragged; N*k crosses the CPU kernel's 128-row tile for k >= 2 at N = 131.
SHAPES = [(1, 1, 1, 3), (7, 7, 25, 13), (19, 23, 49, 37), (131, 11, 9, 5)]
# (tau, alpha, detach_q, tclip): alpha None is 1 / tau, where q is optimal and detach_q is exact.
OPTIONS = [(1.0, None, True, 20.0), (0.5, 0.3, False, 20.0), (2.0, 0.0, True, None),
           (3.0, 1.5, False, None)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("options,dtype", [(o, torch.float64) for o in OPTIONS] +
                         [(o, torch.float32) for o in OPTIONS[::3]])   # both detach_q, both tclip
def test_matches_reference(shape, k, options, dtype):
    tau, alpha, detach_q, tclip = options
    n, b, l, d = shape
    src_mix, trg, pos_idx = make_inputs(n, b, l, d, dtype, k=k, scale=2.0)
    kw = dict(tau=tau, alpha=alpha, detach_q=detach_q, tclip=tclip)
    with expect_fused(calls=1):
        fused = loss_and_grads(ak.fused_mixture_nce_loss, src_mix, trg, pos_idx, **kw)
    ref = loss_and_grads(ak.mixture_nce_loss_reference, src_mix, trg, pos_idx, **kw)
    assert_matches(fused, ref, **TOL[dtype])


def test_reference_matches_a_loop_over_the_spec():
    """The reference against spec section 3 spelled out per (i, l) with op 1 per component."""
    n, k, b, l, d = 3, 3, 4, 2, 5
    src_mix, trg, pos_idx = make_inputs(n, b, l, d, torch.float64, k=k, scale=2.0)
    tau, alpha = 0.7, 0.4
    s = torch.stack([5.0 * torch.tanh(src_mix[:, j] @ trg.reshape(b * l, d).T / math.sqrt(d) / 5.0)
                     for j in range(k)]).view(k, n, b, l).detach()
    total = 0.0
    for i in range(n):
        for li in range(l):
            nce = []
            for j in range(k):
                negs = [s[j, i, bb, ll] for bb in range(b) if bb != pos_idx[i] for ll in range(l)]
                p = s[j, i, pos_idx[i], li]
                nce.append(float(p - torch.log(torch.exp(p) + torch.exp(torch.stack(negs)).sum())))
            w = [math.exp(tau * x) for x in nce]
            q = [x / sum(w) for x in w]
            total += sum(qj * x for qj, x in zip(q, nce)) - alpha * sum(qj * math.log(qj) for qj in q)
    loss, _ = ak.mixture_nce_loss_reference(src_mix, trg, pos_idx, tau=tau, alpha=alpha, tclip=5.0)
    assert loss.item() == pytest.approx(-total / (n * l), rel=1e-12)


@pytest.mark.parametrize("detach_q", [True, False])
def test_k1_is_the_nce_loss(detach_q):
    """One component: q = 1 and H(q) = 0, so the mixture loss is the NCE loss of spec section 1,
    here the reference's (the fused NCE loss is compared too: the two fused paths share the
    statistics pass but not the epilogue)."""
    # every path's softplus is exact (logaddexp; F.softplus would return x for x > 20)
    src_mix, trg, pos_idx = make_inputs(9, 6, 7, 11, torch.float64, k=1, scale=2.0)
    with expect_fused(calls=2):
        mix = loss_and_grads(ak.fused_mixture_nce_loss, src_mix, trg, pos_idx, tau=3.0, alpha=0.2,
                             detach_q=detach_q, tclip=5.0)
        src = src_mix.detach()[:, 0].requires_grad_()
        fused_nce = loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx, tclip=5.0)
    ref = loss_and_grads(ak.nce_loss_reference, src, trg, pos_idx, tclip=5.0)
    for nce in (ref, fused_nce):
        assert_matches(mix, nce[:2] + (nce[2][:, None], nce[3]), rtol=1e-12, atol=1e-14)


def test_detach_q_is_exact_only_at_the_optimal_alpha():
    """How detach_q relates the fused results to each other (a self-comparison on purpose: that
    is the property), each of them also pinned to the reference."""
    src_mix, trg, pos_idx = make_inputs(8, 8, 5, 6, torch.float64, k=3, scale=2.0)
    grads = {}
    for alpha in (None, 0.1):            # tau = 2: alpha None = 0.5 is optimal
        for detach_q in (True, False):
            kw = dict(tau=2.0, alpha=alpha, detach_q=detach_q)
            with expect_fused(calls=1):
                out = loss_and_grads(ak.fused_mixture_nce_loss, src_mix, trg, pos_idx, **kw)
            assert_matches(out, loss_and_grads(ak.mixture_nce_loss_reference, src_mix, trg, pos_idx, **kw),
                           **TOL[torch.float64])
            grads[alpha, detach_q] = out
    for alpha in (None, 0.1):            # detach_q never changes the values
        torch.testing.assert_close(grads[alpha, True][:2], grads[alpha, False][:2], rtol=0, atol=0)
    torch.testing.assert_close(grads[None, True][2:], grads[None, False][2:], rtol=1e-10, atol=1e-13)
    assert not torch.allclose(grads[0.1, True][2], grads[0.1, False][2], rtol=1e-3, atol=0)


@pytest.mark.parametrize("detach_q", [True, False])
def test_single_sample_gives_uniform_q_and_zero_gradient(detach_q):
    # B == 1: no negatives, every nce_j = 0, q uniform, loss = -alpha * log k, no gradient.
    src_mix, trg, _ = make_inputs(5, 1, 3, 6, torch.float32, k=4, scale=2.0)
    pos_idx = torch.zeros(5, dtype=torch.long)
    with expect_fused():
        loss, reg, g_src, g_trg = loss_and_grads(ak.fused_mixture_nce_loss, src_mix, trg, pos_idx,
                                                 tau=2.0, detach_q=detach_q, w_reg=0.0)
    assert loss.item() == pytest.approx(-0.5 * math.log(4), rel=1e-6)
    assert torch.count_nonzero(g_src) == 0 and torch.count_nonzero(g_trg) == 0
    assert reg.item() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    src_mix, trg, pos_idx = make_inputs(12, 10, 9, 16, dtype, k=3)
    with expect_fused():
        loss, reg, g_src, g_trg = loss_and_grads(ak.fused_mixture_nce_loss, src_mix, trg, pos_idx,
                                                 detach_q=False, alpha=0.2)
    assert loss.dtype == reg.dtype == torch.float32 and g_src.dtype == g_trg.dtype == dtype
    # ground truth: the same (rounded) inputs in float64
    ref = loss_and_grads(ak.mixture_nce_loss_reference, src_mix.detach().double().requires_grad_(),
                         trg.detach().double().requires_grad_(), pos_idx, detach_q=False, alpha=0.2)
    for got, want in zip((loss, reg), ref[:2]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for got, want in zip((g_src, g_trg), ref[2:]):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("detach_q,alpha", [(True, None), (False, 0.3)])
def test_gradcheck_fused(detach_q, alpha):
    src_mix, trg, pos_idx = make_inputs(5, 4, 3, 4, torch.float64, k=3)
    fn = lambda s, t: ak.fused_mixture_nce_loss(s, t, pos_idx, tau=1.5, alpha=alpha,  # noqa: E731
                                                detach_q=detach_q, tclip=4.0)
    with expect_fused():
        assert torch.autograd.gradcheck(fn, (src_mix, trg), eps=1e-6, atol=1e-8, rtol=1e-6)


def epilogue_inputs(n, k, l, dtype=torch.float32, seed=0):
    """pos (N, k, L) and neg_stat (N, k) as nce_fwd gives them, with a row without negatives."""
    g = torch.Generator().manual_seed(seed)
    pos = (torch.randn(n, k, l, generator=g, dtype=torch.float64) * 3).to(dtype)
    neg_stat = (torch.randn(n, k, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
    neg_stat[0] = -math.inf
    return pos, neg_stat


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("detach_q", [True, False])
def test_opcheck(dtype, detach_q):
    from amdim_kernels import mixture
    pos, neg_stat = epilogue_inputs(6, 3, 5, dtype)
    pos.requires_grad_(), neg_stat.requires_grad_()
    torch.library.opcheck(mixture.mixture_fwd, (pos, neg_stat, 1.5, 0.2, detach_q))
    grad = torch.tensor(0.8, dtype=dtype)
    torch.library.opcheck(mixture.mixture_bwd, (grad, pos.detach(), neg_stat.detach(), 1.5, 0.2, detach_q))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's numpy warns on inf/NaN in masked-out lanes
@pytest.mark.parametrize("n,k,l", [(3, 1, 5), (4, 3, 70), (5, 4, 49)])
@pytest.mark.parametrize("tau,alpha,detach_q", [(1.0, 1.0, True), (2.5, 0.2, False), (0.5, 0.0, False)])
def test_triton_epilogue_matches_cpp(n, k, l, tau, alpha, detach_q):
    """On the GPU where there is one, else under TRITON_INTERPRET=1 (tests/conftest.py), and the
    C++ kernels on the CPU, each against the epilogue written from spec section 3 in float64;
    L = 70 takes two BLOCK_L chunks."""
    from amdim_kernels import mixture
    from amdim_kernels.triton_mixture import mixture_bwd_triton, mixture_fwd_triton
    pos, neg_stat = epilogue_inputs(n, k, l)
    grad = torch.tensor(0.7)
    want = epilogue_reference(grad, pos, neg_stat, tau, alpha, detach_q)
    cpp = (mixture.mixture_fwd(pos, neg_stat, tau, alpha, detach_q),
           *mixture.mixture_bwd(grad, pos, neg_stat, tau, alpha, detach_q))
    pos, neg_stat, grad = pos.to(DEVICE), neg_stat.to(DEVICE), grad.to(DEVICE)
    triton = (mixture_fwd_triton(pos, neg_stat, tau, alpha, detach_q),
              *mixture_bwd_triton(grad, pos, neg_stat, tau, alpha, detach_q))
    for got in (cpp, triton):
        for name, x, y in zip(("loss", "grad pos", "grad neg_stat"), got, want):
            torch.testing.assert_close(x.cpu().double(), y, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{name}: {m}")


def epilogue_reference(grad_loss, pos, neg_stat, tau, alpha, detach_q):
    """(loss, d pos, d neg_stat) of the mixture epilogue, spec section 3 in float64 autograd:
    nce_j = P - log(e^P + e^Z_j), q = softmax_j(tau * nce_j), loss = -mean(sum_j q_j nce_j + alpha H(q))."""
    pos, neg_stat = pos.double().requires_grad_(), neg_stat.double().requires_grad_()
    nce = pos - torch.logaddexp(pos, neg_stat[:, :, None])               # (N, k, L)
    logits = tau * (nce.detach() if detach_q else nce)
    q, log_q = logits.softmax(dim=1), logits.log_softmax(dim=1)
    loss = -((q * nce).sum(dim=1) - alpha * (q * log_q).sum(dim=1)).mean()
    return (loss.detach(), *torch.autograd.grad(loss * grad_loss.double(), (pos, neg_stat)))


COMPILE_SM90 = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from amdim_kernels import triton_mixture as tm
    target = GPUTarget("cuda", 90, 32)
    fwd = dict(pos_ptr="*fp32", neg_ptr="*fp32", row_obj_ptr="*fp32", K="i32", L="i32",
               tau="fp32", alpha="fp32", BLOCK_K="constexpr", BLOCK_L="constexpr")
    bwd = dict(grad_loss_ptr="*fp32", pos_ptr="*fp32", neg_ptr="*fp32", grad_pos_ptr="*fp32",
               grad_neg_ptr="*fp32", K="i32", L="i32", tau="fp32", through_q="fp32",
               inv_count="fp32", DETACH_Q="constexpr", BLOCK_K="constexpr", BLOCK_L="constexpr")
    for block_k in (1, 4, 16):
        for block_l in (32, tm.MAX_BLOCK_L):
            blocks = dict(BLOCK_K=block_k, BLOCK_L=block_l)
            kernels = [triton.compile(ASTSource(tm._mixture_fwd_kernel, fwd, blocks), target=target)]
            for detach_q in (True, False):
                kernels.append(triton.compile(ASTSource(tm._mixture_bwd_kernel, bwd,
                                                        dict(DETACH_Q=detach_q, **blocks)), target=target))
            assert all(len(k.asm["cubin"]) > 0 for k in kernels)
    print("compiled")
""")


def test_triton_epilogue_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", COMPILE_SM90], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_backends():
    src_mix, trg, pos_idx = make_inputs(6, 5, 4, 7, torch.float64, k=2, scale=2.0)
    ref = ak.mixture_nce_loss_reference(src_mix, trg, pos_idx, tau=1.5)
    for backend, ran in (("auto", "cpp"), ("cpp", "cpp"), ("reference", "reference")):
        with record_dispatch() as record:
            out = ak.fused_mixture_nce_loss(src_mix, trg, pos_idx, tau=1.5, backend=backend)
        assert record == [Dispatch("mixture", ran)], (backend, record)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)


def test_memory_is_not_nk_by_m():
    """Fused forward + backward allocates nothing of size N*k x M (peak RSS growth in a subprocess)."""
    code = r"""
import resource, torch, amdim_kernels as ak
from amdim_kernels.nce import Dispatch, record_dispatch
torch.manual_seed(0)
n = b = 256; k = 4; l = 49; d = 32                # N*k x M fp32 = 49 MiB
src = torch.randn(n, k, d, requires_grad=True); trg = torch.randn(b, l, d, requires_grad=True)
src.grad = torch.zeros_like(src); trg.grad = torch.zeros_like(trg)
loss, reg = ak.fused_mixture_nce_loss(src[:8], trg[:8]); (loss + reg).backward()   # warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with record_dispatch() as ran:
    loss, reg = ak.fused_mixture_nce_loss(src, trg, detach_q=False); (loss + reg).backward()
assert ran == [Dispatch("mixture", "cpp")], ran
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.strip().splitlines()[-1])
    nk_by_m = 256 * 4 * 256 * 49 * 4
    assert extra < nk_by_m / 10, f"peak RSS grew by {extra / 2**20:.1f} MiB; N*k x M is {nk_by_m / 2**20:.0f} MiB"


def ok():
    return make_inputs(4, 4, 3, 5, k=2, requires_grad=False)[:2]


BAD = [
    # (description, arguments, exception, words that must appear in the message)
    ("src_mix rank", lambda: dict(src_mix=torch.randn(4, 5), trg=ok()[1]), ValueError, ["src_mix", "(N, k, D)"]),
    ("k = 0", lambda: dict(src_mix=torch.randn(4, 0, 5), trg=ok()[1]), ValueError, ["src_mix", "k >= 1"]),
    ("D mismatch", lambda: dict(src_mix=torch.randn(4, 2, 6), trg=ok()[1]), ValueError, ["src_mix", "trg", "D"]),
    ("mixed dtypes", lambda: dict(src_mix=ok()[0].double(), trg=ok()[1]), TypeError, ["src_mix", "dtype"]),
    ("src_mix not a tensor", lambda: dict(src_mix=[[[1.0]]], trg=ok()[1]), TypeError, ["src_mix"]),
    ("device mismatch", lambda: dict(src_mix=ok()[0], trg=ok()[1].to("meta")), ValueError, ["device"]),
    ("tau = 0", lambda: dict(src_mix=ok()[0], trg=ok()[1], tau=0.0), ValueError, ["tau"]),
    ("tau < 0", lambda: dict(src_mix=ok()[0], trg=ok()[1], tau=-1.0), ValueError, ["tau"]),
    ("tau inf", lambda: dict(src_mix=ok()[0], trg=ok()[1], tau=math.inf), ValueError, ["tau"]),
    ("tau tensor", lambda: dict(src_mix=ok()[0], trg=ok()[1], tau=torch.tensor(1.0)), TypeError, ["tau"]),
    ("alpha < 0", lambda: dict(src_mix=ok()[0], trg=ok()[1], alpha=-0.5), ValueError, ["alpha"]),
    ("alpha NaN", lambda: dict(src_mix=ok()[0], trg=ok()[1], alpha=math.nan), ValueError, ["alpha"]),
    ("alpha string", lambda: dict(src_mix=ok()[0], trg=ok()[1], alpha="1"), TypeError, ["alpha"]),
    ("detach_q not bool", lambda: dict(src_mix=ok()[0], trg=ok()[1], detach_q=1), TypeError, ["detach_q"]),
    ("pos_idx out of range", lambda: dict(src_mix=ok()[0], trg=ok()[1], pos_idx=torch.tensor([0, 1, 2, 4])), ValueError, ["pos_idx"]),
    ("N != B without pos_idx", lambda: dict(src_mix=torch.randn(5, 2, 5), trg=ok()[1]), ValueError, ["pos_idx"]),
    ("tclip <= 0", lambda: dict(src_mix=ok()[0], trg=ok()[1], tclip=-2.0), ValueError, ["tclip"]),
    ("NaN in src_mix", lambda: dict(src_mix=ok()[0].index_fill(0, torch.tensor([1]), math.nan), trg=ok()[1]), ValueError, ["src_mix", "NaN"]),
    # the shapes the caller passed, not those of the (N, D) slice checked like an NCE source
    ("B = 0", lambda: dict(src_mix=ok()[0], trg=torch.randn(0, 3, 5)), ValueError, ["non-empty", "src_mix (4, 2, 5)", "trg (0, 3, 5)"]),
    ("L = 0", lambda: dict(src_mix=ok()[0], trg=torch.randn(4, 0, 5)), ValueError, ["non-empty", "src_mix (4, 2, 5)", "trg (4, 0, 5)"]),
    ("N = 0", lambda: dict(src_mix=torch.randn(0, 2, 5), trg=ok()[1]), ValueError, ["non-empty", "src_mix (0, 2, 5)", "trg (4, 3, 5)"]),
]


@pytest.mark.parametrize("fn", [ak.fused_mixture_nce_loss, ak.mixture_nce_loss_reference],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("desc,build,exc,words", BAD, ids=[c[0] for c in BAD])
def test_bad_input(fn, desc, build, exc, words):
    kw = build()
    src_mix, trg, pos_idx = kw.pop("src_mix"), kw.pop("trg"), kw.pop("pos_idx", None)
    with pytest.raises(exc) as info:
        fn(src_mix, trg, pos_idx, **kw)
    for word in words:
        assert word in str(info.value), f"{desc}: {word!r} not in {info.value}"


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        ak.fused_mixture_nce_loss(*ok(), backend="gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("detach_q", [True, False])
def test_cuda_opcheck(detach_q):
    """The registered CUDA kernels (the Triton epilogue) through the op, with opcheck."""
    from amdim_kernels import mixture
    pos, neg_stat = (x.cuda() for x in epilogue_inputs(300, 4, 49))
    grad = torch.tensor(0.7, device="cuda")
    torch.library.opcheck(mixture.mixture_fwd, (pos.requires_grad_(), neg_stat.requires_grad_(),
                                                1.5, 0.2, detach_q))
    torch.library.opcheck(mixture.mixture_bwd, (grad, pos.detach(), neg_stat.detach(), 1.5, 0.2, detach_q))


@pytest.mark.gpu
@pytest.mark.parametrize("detach_q,alpha", [(True, None), (False, 0.3)])
def test_cuda_matches_reference(detach_q, alpha):
    src_mix, trg, pos_idx = (x.detach().cuda() for x in make_inputs(300, 300, 49, 256, torch.float32, k=4))
    kw = dict(tau=1.5, alpha=alpha, detach_q=detach_q)
    assert_error_within_torch_error(ak.fused_mixture_nce_loss, ak.mixture_nce_loss_reference,
                                    src_mix, trg, pos_idx, **kw)



def test_torch_compile_fullgraph():
    src_mix, trg, pos_idx = make_inputs(9, 7, 5, 10, torch.float32, k=3)

    @torch.compile(fullgraph=True)
    def objective(s, t, p):
        loss, reg = ak.fused_mixture_nce_loss(s, t, p, tau=2.0, detach_q=False)
        return loss + reg

    with expect_fused():
        out = objective(src_mix, trg, pos_idx)
    grads = torch.autograd.grad(out, (src_mix, trg))
    ref_loss, ref_reg = ak.mixture_nce_loss_reference(src_mix, trg, pos_idx, tau=2.0, detach_q=False)
    ref_grads = torch.autograd.grad(ref_loss + ref_reg, (src_mix, trg))
    torch.testing.assert_close(out, ref_loss + ref_reg, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grads, ref_grads, rtol=2e-5, atol=2e-6)


def test_bench_quick_writes_json_and_markdown(tmp_path):
    import json
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_mixture.py"),
                           "--quick", "--losses", "mixture", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert {"device", "torch", "triton", "git_commit"} <= set(result["env"])
    assert [(r["variant"], r["mode"], r["status"]) for r in result["records"]] == [
        ("reference", "fwd", "ok"), ("fused", "fwd", "ok"), ("reference", "fwd+bwd", "ok"),
        ("fused", "fwd+bwd", "ok")]
    # the fused rows ran the C++ kernels (the reference rows call the reference directly)
    assert [r["backends"] for r in result["records"]] == [[], ["cpp"], [], ["cpp"]]
    assert [s["mode"] for s in result["summary"]] == ["fwd", "fwd+bwd"]
    assert "| mixture | fwd+bwd | fused |" in out.with_suffix(".md").read_text()
