"""The loss op of the non-strict CUDA path (amdim_kernels/nce_loss_op.py): its CPU kernels (the
composition with the torch epilogue) through opcheck, gradcheck and torch.compile, and its CUDA
kernels (triton_nce_loss.py: the finish and epilogue-backward kernels over each forward and
backward variant) under the Triton interpreter, against the float64 reference; the launches each
CUDA kernel issues, counted."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

pytest.importorskip("triton")
import triton.runtime.interpreter as interpreter  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from amdim_kernels import nce_loss_op, ops, triton_nce_fwd as tnf  # noqa: E402
from amdim_kernels import triton_nce_bwd_cublas as tgc, triton_nce_dense as tnd  # noqa: E402
from amdim_kernels.nce import estimator_loss  # noqa: E402
from amdim_kernels.reference import nce_loss_reference  # noqa: E402
from amdim_kernels.triton_nce_loss import nce_loss_bwd_cuda, nce_loss_cuda  # noqa: E402
from loss_checks import make_inputs  # noqa: E402
from sm90_compile import run_compile_script  # noqa: E402

ESTIMATORS = ("nce", "jsd", "dv")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # discarded where() lanes
INTERPRETED = not torch.cuda.is_available()


def reference_loss_and_grads(src, trg, pos_idx, tclip, reg_weight, estimator, w=(0.7, 1.3)):
    s = src.detach().double().cpu().requires_grad_()
    t = trg.detach().double().cpu().requires_grad_()
    loss, reg = nce_loss_reference(s, t, pos_idx.cpu(), tclip=tclip, reg_weight=reg_weight,
                                   estimator=estimator)
    return (loss, reg) + torch.autograd.grad(w[0] * loss + w[1] * reg, (s, t))


# ---- the CPU kernels: opcheck, gradcheck, compile --------------------------------------------
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_cpu_op_is_the_reference_loss(estimator):
    src, trg, pos_idx = make_inputs(9, 5, 4, 7, torch.float64, scale=2.0)
    loss, reg, pos, neg_stat, bad = nce_loss_op.nce_loss(src, trg, pos_idx, 5.0, 0.05, estimator, True)
    want = reference_loss_and_grads(src, trg, pos_idx, 5.0, 0.05, estimator)
    got = torch.autograd.grad(0.7 * loss + 1.3 * reg, (src, trg))
    for x, y in zip((loss, reg) + got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert not bad
    src, trg, pos_idx = make_inputs(4, 3, 2, 3, torch.float64, scale=2.0)
    assert torch.autograd.gradcheck(
        lambda s, t: nce_loss_op.nce_loss(s, t, pos_idx, 5.0, 0.05, estimator, True)[:2],
        (src, trg), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_opcheck(estimator):
    src, trg, pos_idx = make_inputs(9, 7, 5, 11, torch.float32)
    torch.library.opcheck(nce_loss_op.nce_loss, (src, trg, pos_idx, 20.0, 0.05, estimator, True))
    src, trg = src.detach(), trg.detach()
    loss, reg, pos, neg_stat, bad = nce_loss_op.nce_loss(src, trg, pos_idx, None, 0.0, estimator, False)
    torch.library.opcheck(nce_loss_op.nce_loss_bwd,
                          (torch.tensor(0.7), torch.tensor(1.3), src, trg, pos_idx, pos, neg_stat,
                           bad, None, 0.0, estimator))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_epilogue_grads_are_autograd_of_estimator_loss(estimator):
    g = torch.Generator().manual_seed(1)
    n, b, l, reg_weight = 6, 4, 5, 0.3
    pos = torch.randn(n, l, generator=g, dtype=torch.float64, requires_grad=True)
    neg_stat = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    sumsq = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    gl, gr = torch.tensor(0.7, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    total = gl * estimator_loss(estimator, pos, neg_stat, b) + gr * reg_weight * sumsq / (n * b * l)
    want = torch.autograd.grad(total, (pos, neg_stat, sumsq))
    got = nce_loss_op.epilogue_grads(estimator, pos.detach(), neg_stat.detach(), b, reg_weight, gl, gr)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.reshape(y.shape), y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile_fullgraph(mode):
    src, trg, pos_idx = make_inputs(11, 7, 5, 9, torch.float32)

    @torch.compile(fullgraph=True, mode=mode)
    def objective(s, t, p):
        loss, reg, *_ = nce_loss_op.nce_loss(s, t, p, 10.0, 0.05, "nce", True)
        return loss + reg

    out = objective(src, trg, pos_idx)
    got = torch.autograd.grad(out, (src, trg))
    loss, reg, *want = reference_loss_and_grads(src, trg, pos_idx, 10.0, 0.05, "nce", w=(1.0, 1.0))
    torch.testing.assert_close(out.double(), loss + reg, rtol=2e-5, atol=2e-6)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, rtol=2e-5, atol=2e-6)


class TopLevelOps(TorchDispatchMode):
    """The aten / custom ops a block dispatches itself (not those inside their kernels)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_backward_dispatches_only_the_backward_op():
    """Autograd of the op calls nce_loss_bwd and nothing else: no zero gradients materialised for
    the outputs pos, neg_stat and bad that the loss does not use (on a GPU each is a fill launch,
    three beyond the backward's four; the GPU test counts them with the profiler). With only
    loss reaching the objective, lgt_reg's zero gradient is the one extra op."""
    src, trg, pos_idx = make_inputs(9, 7, 5, 11, torch.float32)
    loss, reg, *_ = nce_loss_op.nce_loss(src, trg, pos_idx, 20.0, 0.05, "nce", True)
    upstream = (torch.tensor(0.7), torch.tensor(1.3))
    with TopLevelOps() as seen:
        torch.autograd.grad((loss, reg), (src, trg), upstream)
    assert [x for x in seen.ops if x != "detach"] == ["nce_loss_bwd"], seen.ops
    loss, reg, *_ = nce_loss_op.nce_loss(src, trg, pos_idx, 20.0, 0.05, "nce", True)
    one = torch.tensor(1.0)
    with TopLevelOps() as seen:
        got = torch.autograd.grad(loss, (src, trg), one)
    assert [x for x in seen.ops if x != "detach"] == ["new_zeros", "nce_loss_bwd"], seen.ops
    want = reference_loss_and_grads(src, trg, pos_idx, 20.0, 0.05, "nce", w=(1.0, 0.0))[2:]
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, rtol=2e-5, atol=2e-6)


def test_the_kept_statistics_are_not_differentiable():
    """pos and neg_stat are outputs for the backward: a gradient through them would be dropped
    (the backward takes those of loss and lgt_reg), so differentiating them is an error."""
    src, trg, pos_idx = make_inputs(5, 4, 3, 6, torch.float32)
    loss, reg, pos, neg_stat, bad = nce_loss_op.nce_loss(src, trg, pos_idx, 20.0, 0.05, "nce", True)
    assert loss.requires_grad and reg.requires_grad
    assert not (pos.requires_grad or neg_stat.requires_grad or bad.requires_grad)
    with pytest.raises(RuntimeError, match="does not require grad"):
        (pos.sum() + neg_stat.sum()).backward()


def test_second_derivative_raises():
    src, trg, pos_idx = make_inputs(5, 4, 3, 6, torch.float64)
    loss = nce_loss_op.nce_loss(src, trg, pos_idx, 20.0, 0.05, "nce", True)[0]
    (g,) = torch.autograd.grad(loss, (src,), create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        g.sum().backward()


# ---- the CUDA kernels, under the interpreter -------------------------------------------------
@pytest.fixture
def cuda_variants(monkeypatch):
    """Register the CUDA kernels as on a GPU without the CUDA C++ backward, with the variants
    given; the selection is restored afterwards (the kernels stay registered for the CUDA key,
    which CPU tensors never reach)."""
    monkeypatch.setattr(ops, "SELECTION", ops.SELECTION)

    def use(fwd, bwd):
        assert ops._register_cuda(cuda_available=True, cuda_status=(None, "test"),
                                  fwd_choice=fwd, bwd_choice=bwd) is None
    return use


def run_cuda_kernels(src, trg, pos_idx, tclip, reg_weight, estimator, check_range=True,
                     w=(0.7, 1.3)):
    loss, reg, pos, neg_stat, bad = nce_loss_cuda(src, trg, pos_idx, tclip, reg_weight, estimator,
                                                  check_range)
    grads = nce_loss_bwd_cuda(torch.tensor(w[0]), torch.tensor(w[1]), src, trg, pos_idx, pos,
                              neg_stat, bad, tclip, reg_weight, estimator)
    return loss, reg, bad, grads


VARIANTS = [("tiled", "triton"), ("tiled", "triton_cublas"), ("dense", "triton_cublas"),
            ("dense", "triton")]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.skipif(not INTERPRETED, reason="interpreter run of the CUDA kernels")
@pytest.mark.parametrize("fwd,bwd", VARIANTS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_reference(cuda_variants, fwd, bwd, estimator, dtype):
    cuda_variants(fwd, bwd)
    n, b, l, d = 19, 7, 5, 21           # ragged for the interpreter's 16-wide tiles; N > B
    src, trg, pos_idx = (x.detach() for x in make_inputs(n, b, l, d, dtype, scale=2.0, seed=3))
    tclip, reg_weight = 5.0, 0.2
    loss, reg, bad, grads = run_cuda_kernels(src, trg, pos_idx, tclip, reg_weight, estimator)
    want = reference_loss_and_grads(src, trg, pos_idx, tclip, reg_weight, estimator)
    assert loss.dtype == reg.dtype == torch.float32 and not bad
    for name, x, y in zip(("loss", "lgt_reg"), (loss, reg), want[:2]):
        torch.testing.assert_close(x.double(), y, rtol=2e-5, atol=2e-6, msg=name)
    for name, x, y in zip(("grad src", "grad trg"), grads, want[2:]):
        assert x.dtype == dtype
        err = ((x.double() - y).abs().max() / y.abs().max()).item()
        assert err <= TOL[dtype], (name, err)


@pytest.mark.skipif(not INTERPRETED, reason="interpreter run of the CUDA kernels")
@pytest.mark.parametrize("splits", ["one", "many"])
def test_finish_kernel_merges_any_number_of_splits(cuda_variants, monkeypatch, splits):
    """One split: the split kernel writes the final statistics (FINALIZE) and the finish kernel
    reads them; several: the finish kernel merges the partials."""
    cuda_variants("tiled", "triton")
    n, b, l, d = 21, 6, 9, 20
    m = b * l
    forced = (1, m) if splits == "one" else (math.ceil(m / 16), 16)
    monkeypatch.setattr(tnf, "_plan", tnf._plan.__wrapped__)
    monkeypatch.setattr(tnf, "split_columns", lambda n, m, device: forced)
    src, trg, pos_idx = (x.detach() for x in make_inputs(n, b, l, d, torch.float32, scale=2.0))
    for estimator in ESTIMATORS:
        loss, reg, bad, grads = run_cuda_kernels(src, trg, pos_idx, 20.0, 0.05, estimator)
        want = reference_loss_and_grads(src, trg, pos_idx, 20.0, 0.05, estimator)
        for x, y in zip((loss, reg) + tuple(grads), want):
            torch.testing.assert_close(x.double(), y, rtol=2e-5, atol=2e-6)


@pytest.mark.skipif(not INTERPRETED, reason="interpreter run of the CUDA kernels")
@pytest.mark.parametrize("fwd", ["tiled", "dense"])
def test_cuda_kernels_poison_and_edge_cases(cuda_variants, fwd):
    cuda_variants(fwd, "triton")
    src, trg, pos_idx = (x.detach() for x in make_inputs(7, 3, 4, 6, torch.float32))
    # pos_idx outside [0, B) (also beyond int32): NaN, and no gradient from the poisoned loss
    bad_idx = pos_idx.clone()
    bad_idx[2] = 2**32 + 1
    loss, reg, bad, grads = run_cuda_kernels(src, trg, bad_idx, 20.0, 0.05, "nce")
    assert bad and math.isnan(loss) and math.isnan(reg)
    assert all((g == 0).all() for g in grads)
    loss, reg, bad, _ = run_cuda_kernels(src, trg, bad_idx, 20.0, 0.05, "nce", check_range=False)
    assert not bad and math.isfinite(loss)   # not asked to check: pos_idx came from validation
    # a non-finite input score: NaN
    nan_src = src.clone()
    nan_src[1, 1] = math.inf
    loss, reg, bad, _ = run_cuda_kernels(nan_src, trg, pos_idx, 20.0, 0.05, "jsd")
    assert bad and math.isnan(loss) and math.isnan(reg)
    # finite inputs whose scores overflow to +Inf: the sum of a^2 is +Inf, not NaN (an infinite
    # input is NaN there already, through the padded lanes), so the overflow bound decides
    huge_src, huge_trg = src.abs() * 1e20, trg.abs() * 1e20
    assert tnf.nce_fwd_triton(huge_src, huge_trg, pos_idx, 20.0, "logsumexp")[2].item() == math.inf
    loss, reg, bad, _ = run_cuda_kernels(huge_src, huge_trg, pos_idx, 20.0, 0.05, "nce")
    assert bad and math.isnan(loss) and math.isnan(reg)
    # finite scores whose squares overflow: valid, lgt_reg Inf (0 without the regulariser)
    big = src.clone()
    big[1] = 3e19
    loss, reg, bad, _ = run_cuda_kernels(big, trg, pos_idx, 20.0, 0.05, "nce")
    assert not bad and math.isfinite(loss) and reg.item() == math.inf
    loss, reg, bad, _ = run_cuda_kernels(big, trg, pos_idx, 20.0, 0.0, "nce")
    assert not bad and reg.item() == 0.0
    # B == 1: nce is 0 with a zero loss gradient; jsd keeps its positive term
    one = trg[:1].contiguous()
    zeros = torch.zeros(7, dtype=torch.long)
    loss, reg, bad, grads = run_cuda_kernels(src, one, zeros, 20.0, 0.0, "nce")
    assert loss.item() == 0.0 and all((g == 0).all() for g in grads)
    loss, *_ = run_cuda_kernels(src, one, zeros, 20.0, 0.0, "jsd")
    want = reference_loss_and_grads(src, one, zeros, 20.0, 0.0, "jsd")[0]
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=2e-6)


@pytest.mark.skipif(not INTERPRETED, reason="interpreter run of the CUDA kernels")
@pytest.mark.parametrize("bwd", ["triton", "triton_cublas"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_poisoned_call_has_zero_gradient_whatever_pos_holds(cuda_variants, bwd, estimator):
    """The forward writes no positive score for a row whose pos_idx is out of range (its tile is
    never visited), so `pos` keeps what torch.empty left there: NaN bit patterns included. The
    backward of a poisoned call must not multiply its zero weights by them (0 * NaN is NaN)."""
    cuda_variants("tiled", bwd)
    src, trg, pos_idx = (x.detach() for x in make_inputs(7, 3, 4, 6, torch.float32))
    bad_idx = pos_idx.clone()
    bad_idx[2] = 5
    loss, reg, pos, neg_stat, bad = nce_loss_cuda(src, trg, bad_idx, 20.0, 0.05, estimator, True)
    assert bad and math.isnan(loss)
    pos[2] = math.nan   # what an unwritten row may hold
    grads = nce_loss_bwd_cuda(torch.tensor(0.7), torch.tensor(1.3), src, trg, bad_idx, pos,
                              neg_stat, bad, 20.0, 0.05, estimator)
    assert all((g == 0).all() for g in grads), grads


@pytest.mark.skipif(not INTERPRETED, reason="interpreter run of the CUDA kernels")
def test_the_op_runs_its_cuda_kernels_for_the_cuda_key(cuda_variants):
    """The registration: the CUDA dispatch key of nce_loss / nce_loss_bwd reaches the Triton
    kernels (the CPU key composes the torch epilogue)."""
    cuda_variants("tiled", "triton")
    src, trg, pos_idx = (x.detach() for x in make_inputs(9, 5, 4, 7, torch.float32))
    key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    args = (src, trg, pos_idx, 20.0, 0.05, "dv", True)
    out = nce_loss_op.nce_loss.default.redispatch(key, *args)
    direct = nce_loss_cuda(*args)
    assert all(torch.equal(x, y) for x, y in zip(out, direct))
    bwd_args = (torch.tensor(1.0), torch.tensor(1.0), src, trg, pos_idx, *out[2:], 20.0, 0.05, "dv")
    grads = nce_loss_op.nce_loss_bwd.default.redispatch(key, *bwd_args)
    assert all(torch.equal(x, y) for x, y in zip(grads, nce_loss_bwd_cuda(*bwd_args)))


# ---- launches ---------------------------------------------------------------------------------
# aten ops that launch nothing on a GPU (allocation, views)
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "t", "transpose",
              "slice", "select", "as_strided", "detach", "alias", "expand", "reshape",
              "lift_fresh", "new_empty"}


class LaunchCounter(TorchDispatchMode):
    """Triton kernel launches (interpreted), cuBLAS products (product_into: one mm on a GPU, an
    upcast matmul on the CPU) and the other aten ops that would launch a kernel on a GPU,
    dispatched by the code under it (not by the interpreter's own host copies)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.triton, self.aten, self._inside = [], [], False

        def counted(kind, original, name):
            def run(*args, **kwargs):
                kind.append(name(*args))
                self._inside = True
                try:
                    return original(*args, **kwargs)
                finally:
                    self._inside = False
            return run
        monkeypatch.setattr(interpreter.InterpretedFunction, "run",
                            counted(self.triton, interpreter.InterpretedFunction.run,
                                    lambda fn, *a: fn.fn.__name__))
        for module in (tnd, tgc):
            monkeypatch.setattr(module, "product_into",
                                counted(self.aten, module.product_into, lambda *a: "mm"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside and name not in _NO_LAUNCH:
            self.aten.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def launches(self):
        return len(self.triton) + len(self.aten)


@pytest.mark.skipif(not INTERPRETED, reason="interpreter run of the CUDA kernels")
@pytest.mark.parametrize("fwd,bwd,fwd_launches,bwd_launches", [
    ("tiled", "triton", 2, 4),          # split + finish; epilogue + d src + d trg + partial sum
    ("tiled", "triton_cublas", 2, 4),   # split + finish; epilogue + g + two products
    ("dense", "triton_cublas", 3, 4),   # scores + dense + finish
])
def test_launches_per_call(cuda_variants, monkeypatch, fwd, bwd, fwd_launches, bwd_launches):
    """At a small bf16 shape (several column splits): at most 3 launches forward, 4 backward
    (the fused loss's target; the GPU test counts the real launches with the profiler)."""
    cuda_variants(fwd, bwd)
    src, trg, pos_idx = (x.detach() for x in make_inputs(40, 40, 7, 24, torch.bfloat16))
    assert tnf._plan(40, 280, src.device)[0] > 1   # the merge is needed: done by the finish kernel
    with LaunchCounter(monkeypatch) as count:
        loss, reg, pos, neg_stat, bad = nce_loss_cuda(src, trg, pos_idx, 20.0, 0.05, "nce", True)
    assert count.launches == fwd_launches, (count.triton, count.aten)
    with LaunchCounter(monkeypatch) as count:
        nce_loss_bwd_cuda(torch.tensor(1.0), torch.tensor(1.0), src, trg, pos_idx, pos, neg_stat,
                          bad, 20.0, 0.05, "nce")
    assert count.launches <= bwd_launches, (count.triton, count.aten)


# ---- sm_90 compilation of the epilogue kernels ------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent(r"""
    import json
    from sm90_compile import compile_one, jit_function
    from amdim_kernels import triton_nce_loss as tnl

    out = []
    finish = jit_function(tnl._nce_loss_finish_kernel)
    types = {a: "*i64" if a == "pos_idx_ptr" else "*i1" if a == "bad_ptr" else "*bf16"
             if a in ("src_ptr", "trg_ptr") else "*fp32" if a.endswith("_ptr") else "fp32"
             if a in ("inv_nl", "inv_nbl", "inv_nneg", "log_nneg", "reg_weight", "sqrt_d")
             else "i32" for a in finish.arg_names}
    for merge in (True, False):
        for estimator in (0, 1, 2):
            block_r, block_s, block_l = tnl._blocks(49, 528 if merge else 1)
            consts = dict(MERGE=merge, NEG_LSE=estimator != 1, ESTIMATOR=estimator, CHECK_RANGE=True,
                          BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_L=block_l)
            res = compile_one(finish, types, consts, [], tnl._WARPS, 1)
            out.append(dict(kernel="finish", consts=consts, **res))
    bwd = jit_function(tnl._nce_loss_bwd_kernel)
    types = {a: "*i1" if a == "bad_ptr" else "*fp32" if a.endswith("_ptr") else "fp32"
             if a in ("inv_nl", "inv_nneg", "reg_scale") else "i32" for a in bwd.arg_names}
    for estimator in (0, 1, 2):
        block_r, _, block_l = tnl._blocks(49, 1)
        consts = dict(ESTIMATOR=estimator, BLOCK_R=block_r, BLOCK_L=block_l)
        res = compile_one(bwd, types, consts, [], tnl._WARPS, 1)
        out.append(dict(kernel="bwd", consts=consts, **res))
    print("RESULT " + json.dumps(out))
""")


def test_epilogue_kernels_compile_for_sm90_without_spills(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    results = run_compile_script(_COMPILE_SCRIPT, tmp_path, timeout=900)
    assert len(results) == 9
    for r in results:
        assert r["cubin"] > 0 and r["spills"] == 0, r
