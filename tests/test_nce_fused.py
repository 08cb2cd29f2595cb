"""fused_nce_loss (C++ CPU backend) against the spec reference: loss, lgt_reg and gradients.
Every fused call is checked to have run the C++ kernel (expect_fused), with two or more threads."""

import math

import pytest
import torch

import amdim_kernels as ak
from amdim_kernels.nce import Dispatch, record_dispatch
from loss_checks import assert_matches, expect_fused, loss_and_grads, make_inputs

pytestmark = pytest.mark.usefixtures("threads")

# (N, B, L, D): nothing a multiple of the 128 x 256 CPU tile, L in {1, 25, 49}, and shapes that
# cross tile borders in rows (N > 128) and columns (B*L > 256).
SHAPES = [(1, 1, 1, 3), (7, 7, 25, 13), (19, 23, 49, 37), (131, 131, 1, 5), (150, 11, 25, 70),
          (5, 3, 49, 300)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tclip,reg_weight", [(20.0, 0.05), (10.0, 0.0), (None, 0.05)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(shape, tclip, reg_weight, dtype):
    n, b, l, d = shape
    src, trg, _ = make_inputs(n, b, l, d, dtype, scale=2.0)   # scores up to ~+-15: the clip matters
    pos_idx = None if n == b else torch.randint(0, b, (n,), generator=torch.Generator().manual_seed(1))
    kw = dict(tclip=tclip, reg_weight=reg_weight)
    with expect_fused(calls=1):
        fused = loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx, **kw)
    ref = loss_and_grads(ak.nce_loss_reference, src, trg, pos_idx, **kw)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    assert_matches(fused, ref, **tol)


def test_repeated_pos_idx_dense_variant():
    # Dense variant: every one of a sample's 25 locations is a source row with the same positives.
    b, l, d = 9, 25, 31
    src, trg, _ = make_inputs(b * l, b, l, d, torch.float64)
    pos_idx = torch.arange(b).repeat_interleave(l)
    with expect_fused():
        fused = loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx)
    ref = loss_and_grads(ak.nce_loss_reference, src, trg, pos_idx)
    assert_matches(fused, ref, rtol=1e-10, atol=1e-12)


def test_single_sample_has_zero_loss_and_finite_grads():
    src, trg, _ = make_inputs(4, 1, 49, 16, torch.float32)
    with expect_fused():
        loss, reg, g_src, g_trg = loss_and_grads(ak.fused_nce_loss, src, trg,
                                                 torch.zeros(4, dtype=torch.long), w_reg=0.0)
    assert loss.item() == 0.0
    assert torch.count_nonzero(g_src) == 0 and torch.count_nonzero(g_trg) == 0
    assert reg.item() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    src, trg, _ = make_inputs(33, 33, 25, 40, dtype)
    with expect_fused():
        loss, reg, g_src, g_trg = loss_and_grads(ak.fused_nce_loss, src, trg, None)
    assert loss.dtype == reg.dtype == torch.float32
    assert g_src.dtype == g_trg.dtype == dtype
    # ground truth: the same (rounded) inputs in float64
    ref = loss_and_grads(ak.nce_loss_reference, src.detach().double().requires_grad_(),
                         trg.detach().double().requires_grad_(), None)
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reg.double(), ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_src.double(), ref[2], rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(g_trg.double(), ref[3], rtol=2e-2, atol=1e-5)


def test_outputs_are_scalars_and_only_needed_grads_flow():
    src, trg, _ = make_inputs(6, 6, 3, 8, torch.float32)
    with expect_fused():
        loss, reg = ak.fused_nce_loss(src, trg)
    assert loss.shape == () and reg.shape == ()
    (g_src,) = torch.autograd.grad(loss, (src,))   # lgt_reg unused: its gradient is zero
    ref_loss, _ = ak.nce_loss_reference(src, trg)
    (r_src,) = torch.autograd.grad(ref_loss, (src,))
    torch.testing.assert_close(g_src, r_src, rtol=2e-5, atol=2e-6)


def test_no_grad_and_non_contiguous_inputs():
    src, trg, _ = make_inputs(12, 23, 25, 20, torch.float64)       # M = 575: three column blocks
    pos_idx = torch.arange(12) * 2
    want = ak.nce_loss_reference(src, trg, pos_idx)
    src_t = src.detach().t().contiguous().t()                       # same values, column-major
    trg_nc = trg.detach().transpose(0, 1).contiguous().transpose(0, 1)
    with torch.no_grad(), expect_fused(calls=2):
        outputs = [ak.fused_nce_loss(src, trg, pos_idx), ak.fused_nce_loss(src_t, trg_nc, pos_idx)]
    for out in outputs:
        assert not out[0].requires_grad
        torch.testing.assert_close(out, tuple(x.detach() for x in want), rtol=1e-12, atol=1e-14)


def test_backends_agree_and_reference_backend_is_the_reference():
    src, trg, _ = make_inputs(10, 10, 4, 6, torch.float64)
    for backend, ran in (("auto", "cpp"), ("cpp", "cpp"), ("reference", "reference")):
        with record_dispatch() as record:
            out = ak.fused_nce_loss(src, trg, backend=backend)
        assert record == [Dispatch("nce", ran)], (backend, record)
        torch.testing.assert_close(out, ak.nce_loss_reference(src, trg), rtol=1e-12, atol=1e-14)


def test_dispatch_record_covers_every_entry_point():
    """The record itself: each public call appends what it ran, nested records see the calls of
    their block, nothing is kept outside a block."""
    src, trg, pos_idx = make_inputs(6, 5, 3, 4, requires_grad=False)
    mix = make_inputs(6, 5, 3, 4, k=2, requires_grad=False)[0]
    with record_dispatch() as outer:
        ak.fused_nce_loss(src, trg, pos_idx, estimator="jsd")
        with record_dispatch() as inner:
            ak.NCELoss(estimator="dv", backend="reference")(src, trg, pos_idx)
            ak.MixtureNCELoss()(mix, trg, pos_idx)
        ak.compat.g2l_loss(src, trg.reshape(15, 4).t(), torch.nn.functional.one_hot(pos_idx, 5))
        ak.nce_loss_reference(src, trg, pos_idx)          # the reference itself dispatches nothing
    assert inner == [Dispatch("dv", "reference"), Dispatch("mixture", "cpp")]
    assert outer == [Dispatch("jsd", "cpp"), *inner, Dispatch("nce", "cpp")]
    from amdim_kernels import nce
    assert nce._recorders == []


def _mutant_of_nce(replace: str, by: str, nth: int):
    """amdim_kernels/nce.py with its nth `replace` (0-based) changed to `by`: a deliberate breakage,
    loaded as a module of the package beside the real one."""
    import inspect
    import types
    from amdim_kernels import nce
    source = inspect.getsource(nce)
    parts = source.split(replace)
    assert len(parts) > nth + 1, f"{replace!r} occurs {len(parts) - 1} times in nce.py"
    mutant = replace.join(parts[:nth + 1]) + by + replace.join(parts[nth + 1:])
    module = types.ModuleType("amdim_kernels._nce_mutant")
    module.__package__ = "amdim_kernels"
    exec(compile(mutant, nce.__file__, "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("entry", ["fused_nce_loss", "fused_mixture_nce_loss"])
def test_dispatch_record_tells_a_reference_run_from_the_kernel(entry):
    """A breakage after the backend is resolved: "cpp" calls the reference. The record is made
    where the work is handed over, so it says "reference" (and expect_fused fails); recorded at
    the resolution, it said "cpp" and every fused-vs-reference comparison compared the reference
    with itself."""
    nth = 0 if entry == "fused_nce_loss" else 1
    broken = _mutant_of_nce('if backend == "reference":', 'if backend in ("reference", "cpp"):', nth)
    src, trg, pos_idx = make_inputs(6, 5, 3, 4, k=None if nth == 0 else 2, requires_grad=False)
    with broken.record_dispatch() as ran:
        getattr(broken, entry)(src, trg, pos_idx)
    assert [d.backend for d in ran] == ["reference"], ran


def test_memory_is_not_n_by_m():
    """The op allocates no N x M buffer: its workspace is fixed per thread (checked via the ATen
    CPU allocator's stats is not possible here, so compare peak RSS growth in a subprocess)."""
    import subprocess
    import sys
    code = r"""
import resource, torch, amdim_kernels as ak
from amdim_kernels.nce import Dispatch, record_dispatch
torch.manual_seed(0)
n = b = 1024; l = 49; d = 64            # N x M fp32 = 205 MB
src = torch.randn(n, d, requires_grad=True); trg = torch.randn(b, l, d, requires_grad=True)
src.grad = torch.zeros_like(src); trg.grad = torch.zeros_like(trg)
loss, reg = ak.fused_nce_loss(src[:8], trg[:8]); (loss + reg).backward()   # warm-up: load the op
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with record_dispatch() as ran:
    loss, reg = ak.fused_nce_loss(src, trg); (loss + reg).backward()
assert ran == [Dispatch("nce", "cpp")], ran
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.strip().splitlines()[-1])
    n_by_m = 1024 * 1024 * 49 * 4
    assert extra < n_by_m / 10, f"peak RSS grew by {extra / 2**20:.1f} MiB; N x M is {n_by_m / 2**20:.0f} MiB"


def test_gradient_of_lgt_reg_alone():
    # only sumsq reaches the objective: the op's backward gets no grad for pos and neg_stat
    src, trg, _ = make_inputs(9, 9, 4, 7, torch.float64)
    with expect_fused():
        (g_src,) = torch.autograd.grad(ak.fused_nce_loss(src, trg)[1], (src,))
    (r_src,) = torch.autograd.grad(ak.nce_loss_reference(src, trg)[1], (src,))
    torch.testing.assert_close(g_src, r_src, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn", [ak.nce_loss_reference, ak.fused_nce_loss], ids=["reference", "fused"])
def test_softplus_is_exact_beyond_20(fn):
    """loss = softplus(Z - P) and d loss / d(Z - P) = sigmoid(Z - P) exactly (losses.md), also
    where Z - P > 20, at which F.softplus returns its argument and a gradient of 1."""
    src = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    trg = torch.tensor([[[-10.0]], [[15.0]]], dtype=torch.float64, requires_grad=True)
    loss, _ = fn(src, trg, torch.tensor([0]), tclip=None, reg_weight=0.0)   # Z - P = 15 + 10
    g_src, g_trg = torch.autograd.grad(loss, (src, trg))
    w = 1.0 / (1.0 + math.exp(-25.0))
    assert loss.item() == pytest.approx(25.0 + math.log1p(math.exp(-25.0)), rel=1e-15, abs=0)
    assert g_src.item() == pytest.approx(25.0 * w, rel=1e-15, abs=0)
    assert g_trg.flatten().tolist() == pytest.approx([-w, w], rel=1e-15, abs=0)
