"""Nothing silently wrong: invalid values give a clear error (strict) or NaN (compiled, CUDA
default), never a plausible number; no host synchronisation on the default CUDA path; a clear
error for double backward; autocast-independent results; float32-safe option ranges."""
import contextlib
import math
import os
import re

import pytest
import torch

import amdim_kernels as ak
from amdim_kernels import _validate, compat, nce, ops
from amdim_kernels.nce import record_dispatch
from loss_checks import assert_matches, expect_fused, loss_and_grads, make_inputs

NCE_FNS = [ak.fused_nce_loss, ak.nce_loss_reference]
MIX_FNS = [ak.fused_mixture_nce_loss, ak.mixture_nce_loss_reference]
ESTIMATORS = ["nce", "jsd", "dv"]


def nan_in(x, index=2):
    return x.detach().clone().index_fill(0, torch.tensor([index]), math.nan)


def inf_in(x, index=1):
    return x.detach().clone().index_fill(0, torch.tensor([index]), math.inf)


def assert_all_nan(outputs):
    assert all(bool(torch.isnan(x)) for x in outputs), outputs


# ------------------------------------------------------------------------ torch.compile: poisoning

def compiled(fn, compiler="aot_eager", **kw):
    torch._dynamo.reset()
    return torch.compile(lambda s, t, p: fn(s, t, p, **kw), fullgraph=True, backend=compiler)


@contextlib.contextmanager
def expect_backend(backend):
    """backend="auto" must run the C++ kernel on the CPU; "reference" the reference."""
    if backend == "auto":
        with expect_fused():
            yield
        return
    with record_dispatch() as ran:
        yield
    assert ran and all(d.backend == backend for d in ran), ran


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compiled_nce_poisons_invalid_values(estimator, backend):
    src, trg, pos_idx = make_inputs(6, 5, 3, 4, requires_grad=False)
    f = compiled(ak.fused_nce_loss, estimator=estimator, backend=backend)
    # valid input: the reference's loss, from the backend asked for
    with expect_backend(backend):
        out = f(src, trg, pos_idx)
    torch.testing.assert_close(out, ak.nce_loss_reference(src, trg, pos_idx, estimator=estimator))
    for bad_idx in (5, -1, 1000):
        assert_all_nan(f(src, trg, pos_idx.index_fill(0, torch.tensor([3]), bad_idx)))
    assert_all_nan(f(nan_in(src), trg, pos_idx))
    assert_all_nan(f(src, inf_in(trg), pos_idx))
    assert_all_nan(f(src * 1e20, trg * 1e20, pos_idx))    # finite inputs, scores overflow to Inf


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compiled_mixture_poisons_invalid_values(backend):
    src_mix, trg, pos_idx = make_inputs(6, 5, 3, 4, k=3, requires_grad=False)
    f = compiled(ak.fused_mixture_nce_loss, tau=2.0, backend=backend)
    with expect_backend(backend):
        out = f(src_mix, trg, pos_idx)
    torch.testing.assert_close(out, ak.mixture_nce_loss_reference(src_mix, trg, pos_idx, tau=2.0))
    assert_all_nan(f(src_mix, trg, pos_idx.index_fill(0, torch.tensor([0]), 5)))
    assert_all_nan(f(nan_in(src_mix), trg, pos_idx))
    assert_all_nan(f(src_mix, inf_in(trg), pos_idx))


def test_compiled_with_inductor_poisons_and_matches_the_reference():
    src, trg, pos_idx = make_inputs(7, 6, 3, 5, requires_grad=False)
    f = compiled(ak.fused_nce_loss, compiler="inductor")
    with expect_fused():
        out = f(src, trg, pos_idx)
    torch.testing.assert_close(out, ak.nce_loss_reference(src, trg, pos_idx))
    assert_all_nan(f(src, trg, pos_idx.index_fill(0, torch.tensor([1]), 6)))
    assert_all_nan(f(src, inf_in(trg), pos_idx))


def test_compiled_gradients_of_valid_input_match_the_reference():
    src, trg, pos_idx = make_inputs(7, 6, 3, 5, torch.float64)
    f = compiled(ak.fused_nce_loss, tclip=5.0)
    with expect_fused():
        fused = loss_and_grads(f, src, trg, pos_idx)
    assert_matches(fused,
                   loss_and_grads(ak.nce_loss_reference, src, trg, pos_idx, tclip=5.0),
                   rtol=1e-10, atol=1e-12)


def test_compiled_compat_poisons_bad_mask():
    r_src, r_trg = torch.randn(3, 4), torch.randn(4, 6)
    mask = torch.eye(3)
    f = torch.compile(compat.g2l_loss, fullgraph=True, backend="aot_eager")
    with expect_fused():
        out = f(r_src, r_trg, mask)
    # column b*L + l of r_trg is trg[b, l]; row i's positives are sample i
    torch.testing.assert_close(out, ak.nce_loss_reference(r_src, r_trg.t().reshape(3, 2, 4)))
    mask[1, 2] = 1.0
    assert_all_nan(f(r_src, r_trg, mask))


# ------------------------------------------------------------------------------------ strict mode

@pytest.mark.parametrize("fn", NCE_FNS, ids=lambda f: f.__name__)
def test_non_strict_gives_nan_strict_raises(fn):
    src, trg, pos_idx = make_inputs(6, 5, 3, 4, requires_grad=False)
    bad_idx = pos_idx.index_fill(0, torch.tensor([0]), 5)
    assert_all_nan(fn(src, trg, bad_idx, strict=False))
    assert_all_nan(fn(nan_in(src), trg, pos_idx, strict=False))
    assert_all_nan(fn(src * 1e20, trg * 1e20, pos_idx, strict=False))
    # valid input: both modes give the reference's value (for fn the reference itself, that the
    # mode changes nothing is the point)
    want = ak.nce_loss_reference(src, trg, pos_idx)
    for strict in (False, True):
        torch.testing.assert_close(fn(src, trg, pos_idx, strict=strict), want)
    with pytest.raises(ValueError, match=r"pos_idx values must lie in \[0, B\) = \[0, 5\)"):
        fn(src, trg, bad_idx, strict=True)
    with pytest.raises(ValueError, match="src contains NaN"):
        fn(nan_in(src), trg, pos_idx, strict=True)


@pytest.mark.parametrize("fn", MIX_FNS, ids=lambda f: f.__name__)
def test_mixture_non_strict_gives_nan(fn):
    src_mix, trg, pos_idx = make_inputs(6, 5, 3, 4, k=2, requires_grad=False)
    assert_all_nan(fn(src_mix, trg, pos_idx.index_fill(0, torch.tensor([2]), -3), strict=False))
    assert_all_nan(fn(src_mix, inf_in(trg), pos_idx, strict=False))
    with pytest.raises(ValueError, match="trg contains NaN or Inf"):
        fn(src_mix, inf_in(trg), pos_idx, strict=True)


def test_non_strict_gradients_of_valid_input_match():
    src, trg, pos_idx = make_inputs(7, 6, 3, 5, torch.float64)
    kw = dict(tclip=5.0, estimator="jsd")
    with expect_fused():
        fused = loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx, strict=False, **kw)
    assert_matches(fused,
                   loss_and_grads(ak.nce_loss_reference, src, trg, pos_idx, strict=False, **kw),
                   rtol=1e-10, atol=1e-12)


def test_strict_resolution_and_environment_variable(monkeypatch):
    cpu, meta = torch.empty(1), torch.empty(1, device="meta")   # meta stands in for a GPU tensor
    monkeypatch.delenv(_validate.STRICT_ENV, raising=False)
    assert _validate.resolve_strict(None, cpu) is True
    assert _validate.resolve_strict(None, meta) is False
    assert _validate.resolve_strict(True, meta) is True and _validate.resolve_strict(False, cpu) is False
    monkeypatch.setenv(_validate.STRICT_ENV, "1")
    assert _validate.resolve_strict(None, meta) is True
    assert _validate.resolve_strict(False, meta) is False          # the argument wins
    monkeypatch.setenv(_validate.STRICT_ENV, "0")
    assert _validate.resolve_strict(None, meta) is False and _validate.resolve_strict(None, cpu) is True
    monkeypatch.setenv(_validate.STRICT_ENV, "yes")
    with pytest.raises(ValueError, match="AMDIM_KERNELS_STRICT"):
        ak.fused_nce_loss(*make_inputs(3, 3, 2, 4, requires_grad=False)[:2])
    monkeypatch.delenv(_validate.STRICT_ENV)
    with pytest.raises(TypeError, match="strict"):
        ak.fused_nce_loss(*make_inputs(3, 3, 2, 4, requires_grad=False)[:2], strict=1)


# -------------------------------------------------------------------------------- CUDA (gpu mark)

@pytest.mark.gpu
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_default_path_never_synchronises(estimator, dtype):
    from amdim_kernels import ops
    # known, and only for the CUDA C++ backward: its binding (csrc/cuda/nce_cuda.cpp,
    # half_g_scale) copies five scalars to the host to scale fp16 gradients. The Triton
    # backwards scale on the device and must not synchronise.
    known_sync = dtype == torch.float16 and "cuda" in {
        ops.SELECTION.choose(n, 257 * 25, 64, dtype)[1] for n in (300, 100 * 3)}
    src, trg, pos_idx = (x.detach().cuda() for x in make_inputs(300, 257, 25, 64, dtype))
    src.requires_grad_(), trg.requires_grad_()
    mix = make_inputs(100, 257, 25, 64, dtype, k=3)[0].detach().cuda().requires_grad_()
    r_trg = trg.detach().reshape(-1, 64).t().contiguous().requires_grad_()
    mask = torch.nn.functional.one_hot(pos_idx, 257).bool()

    def step():
        loss, reg = ak.fused_nce_loss(src, trg, pos_idx, estimator=estimator)
        (loss + reg).backward()
        loss, reg = ak.fused_mixture_nce_loss(mix, trg, pos_idx[:100], detach_q=False, alpha=0.3)
        (loss + reg).backward()
        loss, reg = compat.g2l_loss(src, r_trg, mask)
        (loss + reg).backward()
        return loss

    step()   # warm-up: build, autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if known_sync:
            with pytest.raises(RuntimeError, match="synchroniz"):
                step()
            return
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and torch.isfinite(src.grad).all().item()


@pytest.mark.gpu
def test_cuda_graph_capture_and_poisoning_on_replay():
    """fwd + bwd captured once; replays see new values, and an invalid pos_idx written into the
    captured buffer gives NaN (nothing was decided on the host at capture time)."""
    src, trg, pos_idx = (x.detach().cuda() for x in make_inputs(200, 131, 25, 64))
    src.requires_grad_(), trg.requires_grad_()

    def step():
        loss, reg = ak.fused_nce_loss(src, trg, pos_idx)
        return (loss, reg) + torch.autograd.grad(loss + reg, (src, trg))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        src.mul_(0.5)
    graph.replay()
    torch.testing.assert_close(captured, step())
    pos_idx[7] = 131
    graph.replay()
    assert torch.isnan(captured[0]).item() and torch.isnan(captured[1]).item()


@pytest.mark.gpu
def test_cuda_default_poisons_strict_raises(monkeypatch):
    monkeypatch.delenv(_validate.STRICT_ENV, raising=False)
    src, trg, pos_idx = (x.detach().cuda() for x in make_inputs(30, 20, 5, 16))
    bad_idx = pos_idx.index_fill(0, torch.tensor([4], device="cuda"), 20)
    assert_all_nan(ak.fused_nce_loss(src, trg, bad_idx))
    assert_all_nan(ak.fused_nce_loss(src, inf_in(trg.cpu()).cuda(), pos_idx))
    with pytest.raises(ValueError, match="pos_idx"):
        ak.fused_nce_loss(src, trg, bad_idx, strict=True)
    monkeypatch.setenv(_validate.STRICT_ENV, "1")
    with pytest.raises(ValueError, match="trg contains NaN"):
        ak.fused_nce_loss(src, inf_in(trg.cpu()).cuda(), pos_idx)


@pytest.mark.gpu
def test_cuda_autocast_does_not_change_the_reference():
    src, trg, pos_idx = (x.detach().cuda() for x in make_inputs(30, 20, 5, 16))
    plain = ak.nce_loss_reference(src, trg, pos_idx)
    fused = ak.fused_nce_loss(src, trg, pos_idx)
    with torch.autocast("cuda", dtype=torch.float16):
        auto = ak.nce_loss_reference(src, trg, pos_idx)
        auto_fused = ak.fused_nce_loss(src, trg, pos_idx)
    for x, y in ((auto, plain), (auto_fused, fused)):
        assert x[0].dtype == torch.float32
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ------------------------------------------------------------------------------- double backward

@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_double_backward_raises(estimator):
    src, trg, pos_idx = make_inputs(6, 5, 3, 4, torch.float64)
    with expect_fused():
        loss, reg = ak.fused_nce_loss(src, trg, pos_idx, estimator=estimator)
    (g_src,) = torch.autograd.grad(loss + reg, src, create_graph=True)   # first order still works
    (r_src,) = torch.autograd.grad(sum(ak.nce_loss_reference(src, trg, pos_idx, estimator=estimator)), src)
    torch.testing.assert_close(g_src.detach(), r_src)
    with pytest.raises(RuntimeError, match="no second derivative.*backend='reference'"):
        g_src.square().sum().backward()     # a gradient penalty


def test_gradgradcheck_raises_and_reference_supports_it():
    src, trg, pos_idx = make_inputs(4, 3, 2, 3, torch.float64)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.gradgradcheck(lambda s, t: ak.fused_nce_loss(s, t, pos_idx)[0], (src, trg))
    assert torch.autograd.gradgradcheck(
        lambda s, t: ak.fused_nce_loss(s, t, pos_idx, backend="reference")[0], (src, trg))


@pytest.mark.parametrize("fn,k", [(ak.fused_nce_loss, None), (ak.fused_mixture_nce_loss, 2)])
def test_nested_torch_func_grad_raises(fn, k):
    src, trg, pos_idx = (x.detach() for x in make_inputs(5, 4, 3, 4, torch.float64, k=k))
    inner = torch.func.grad(lambda s: fn(s, trg, pos_idx)[0])
    inner(src)   # first order is fine
    with pytest.raises(RuntimeError, match="no second derivative.*backend='reference'"):
        torch.func.grad(lambda s: inner(s).square().sum())(src)


def test_mixture_double_backward_raises():
    src_mix, trg, pos_idx = make_inputs(6, 5, 3, 4, torch.float64, k=2)
    loss, _ = ak.fused_mixture_nce_loss(src_mix, trg, pos_idx, detach_q=False, alpha=0.2)
    (g,) = torch.autograd.grad(loss, src_mix, create_graph=True)
    with pytest.raises(RuntimeError, match="has no second derivative.*backend='reference'"):
        g.square().sum().backward()


def test_op_level_double_backward_raises():
    """Through the registered op itself (not the public loss): no zero gradient either."""
    src, trg, pos_idx = make_inputs(5, 4, 3, 4, torch.float64)
    pos, neg_stat, sumsq = ops.nce_fwd(src, trg, pos_idx, 20.0, "logsumexp")
    (g,) = torch.autograd.grad(pos.sum() + neg_stat.sum() + sumsq, src, create_graph=True)
    with pytest.raises(RuntimeError, match="nce_bwd has no second derivative"):
        g.sum().backward()


def test_backward_returns_only_the_gradients_asked_for():
    src, trg, pos_idx = make_inputs(5, 4, 3, 4, torch.float64)
    pos, neg_stat, _ = ops.nce_fwd(src, trg, pos_idx, 20.0, "logsumexp")

    class Ctx:
        saved_tensors = (src.detach(), trg.detach(), pos_idx, neg_stat.detach())
        tclip, neg_reduction = 20.0, "logsumexp"

    grads = (torch.ones_like(pos), torch.ones_like(neg_stat), torch.tensor(0.5, dtype=torch.float64))
    for need in ((True, False), (False, True), (True, True)):
        Ctx.needs_input_grad = need + (False, False, False)
        with torch.no_grad():
            out = ops._backward(Ctx, *grads)
        assert [g is not None for g in out[:2]] == list(need)


# --------------------------------------------------------------------------------- torch.func

@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_torch_func_grad_and_vjp(estimator):
    src, trg, pos_idx = (x.detach() for x in make_inputs(6, 5, 3, 4, torch.float64))

    def objective(fn):
        return lambda s, t: sum(fn(s, t, pos_idx, estimator=estimator))

    with expect_fused():
        got = torch.func.grad(objective(ak.fused_nce_loss), argnums=(0, 1))(src, trg)
    want = torch.func.grad(objective(ak.nce_loss_reference), argnums=(0, 1))(src, trg)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    value, vjp_fn = torch.func.vjp(objective(ak.fused_nce_loss), src, trg)
    torch.testing.assert_close(vjp_fn(torch.tensor(1.0, dtype=torch.float64)), want, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:There is a performance drop")   # jacrev vmaps the backward
@pytest.mark.parametrize("fn,k", [(ak.fused_nce_loss, None), (ak.fused_mixture_nce_loss, 2)])
def test_forward_mode_raises_a_clear_error(fn, k):
    src, trg, pos_idx = (x.detach() for x in make_inputs(5, 4, 3, 4, torch.float64, k=k))
    with pytest.raises(RuntimeError, match="no forward-mode derivative.*backend='reference'"):
        torch.func.jvp(lambda s: fn(s, trg, pos_idx)[0], (src,), (torch.ones_like(src),))
    # reverse mode over the same function: jacrev of the (loss, lgt_reg) pair
    with expect_fused():
        jac = torch.func.jacrev(lambda s: torch.stack(fn(s, trg, pos_idx)))(src)
    ref = ak.nce_loss_reference if k is None else ak.mixture_nce_loss_reference
    torch.testing.assert_close(jac, torch.func.jacrev(lambda s: torch.stack(ref(s, trg, pos_idx)))(src),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:There is a performance drop")   # vmap loops over the op
def test_torch_func_vmap_and_per_sample_grad():
    srcs, trg, _ = make_inputs(3, 5, 3, 4, torch.float64, k=6, requires_grad=False)  # 3 problems (6, 4)
    pos_idx = torch.arange(6) % 5

    def loss(fn):
        return lambda s: fn(s, trg, pos_idx)[0]

    with expect_fused(calls=2):
        values = torch.vmap(loss(ak.fused_nce_loss))(srcs)
        grads = torch.vmap(torch.func.grad(loss(ak.fused_nce_loss)))(srcs)
    torch.testing.assert_close(values, torch.stack([ak.nce_loss_reference(s, trg, pos_idx)[0] for s in srcs]))
    torch.testing.assert_close(grads, torch.vmap(torch.func.grad(loss(ak.nce_loss_reference)))(srcs))
    # under vmap nothing is read back: an invalid problem gives NaN, the others their loss
    bad = srcs.clone()
    bad[1, 0, 0] = math.nan
    out = torch.vmap(loss(ak.fused_nce_loss))(bad)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


def test_torch_func_grad_mixture():
    src_mix, trg, pos_idx = (x.detach() for x in make_inputs(6, 5, 3, 4, torch.float64, k=3))

    def objective(fn):
        return lambda s, t: sum(fn(s, t, pos_idx, tau=2.0, alpha=0.3, detach_q=False))

    with expect_fused():
        got = torch.func.grad(objective(ak.fused_mixture_nce_loss), argnums=(0, 1))(src_mix, trg)
    torch.testing.assert_close(got, torch.func.grad(objective(ak.mixture_nce_loss_reference), argnums=(0, 1))(src_mix, trg),
                               rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------- autocast

@pytest.mark.parametrize("fn", NCE_FNS, ids=lambda f: f.__name__)
def test_cpu_autocast_does_not_change_the_result(fn):
    """With and without autocast: the same function on purpose (the property is invariance).
    On the CPU only the reference has an autocast-eligible op (its product); the fused path has
    none, which is why test_fused_ops_run_with_autocast_disabled checks its guard directly."""
    src, trg, pos_idx = make_inputs(9, 7, 5, 16)
    want = loss_and_grads(fn, src, trg, pos_idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(src, trg, pos_idx)
    # the backward outside autocast, as torch's autocast documentation asks
    got = out + torch.autograd.grad(0.7 * out[0] + 1.3 * out[1], (src, trg))
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_matches(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("fn", MIX_FNS, ids=lambda f: f.__name__)
def test_cpu_autocast_does_not_change_the_mixture(fn):
    """As above, for the mixture loss."""
    src_mix, trg, pos_idx = make_inputs(9, 7, 5, 16, k=3)
    want = loss_and_grads(fn, src_mix, trg, pos_idx, tau=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(src_mix, trg, pos_idx, tau=2.0)
    got = out + torch.autograd.grad(0.7 * out[0] + 1.3 * out[1], (src_mix, trg))
    assert_matches(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("entry", ["nce", "mixture"])
def test_fused_ops_run_with_autocast_disabled(entry, monkeypatch):
    """The guard of both fused entry points: their ops and epilogue see autocast off. No op of the
    fused CPU path is autocast-eligible, so values cannot show a missing guard here; the ops'
    view of the autocast state does (on CUDA, autocast would recast the epilogue's float ops)."""
    seen = []

    def spy(real, what):
        def wrapper(*args, **kw):
            seen.append((what, torch.is_autocast_enabled("cpu")))
            return real(*args, **kw)
        return wrapper

    monkeypatch.setattr(nce, "nce_statistics", spy(nce.nce_statistics, "statistics"))
    # the CPU loss whose gradient is formed in the forward (inputs requiring grad)
    monkeypatch.setattr(nce, "forward_gradient_loss", spy(nce.forward_gradient_loss, "statistics"))
    monkeypatch.setattr(_validate, "regulariser", spy(_validate.regulariser, "regulariser"))
    k = None if entry == "nce" else 3
    src, trg, pos_idx = make_inputs(9, 7, 5, 16, k=k)
    fn = ak.fused_nce_loss if entry == "nce" else ak.fused_mixture_nce_loss
    with torch.autocast("cpu", dtype=torch.bfloat16), expect_fused(calls=1):
        fn(src, trg, pos_idx)
    assert seen == [("statistics", False), ("regulariser", False)], seen


# ------------------------------------------------------------------------ float32-safe options

@pytest.mark.parametrize("fn", NCE_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("kw,name", [(dict(tclip=1e39), "tclip"), (dict(tclip=1e-30), "tclip"),
                                     (dict(tclip=1e20), "tclip"), (dict(reg_weight=1e39), "reg_weight")])
def test_options_outside_float32_are_rejected(fn, kw, name):
    src, trg, _ = make_inputs(4, 4, 3, 5, requires_grad=False)
    with pytest.raises(ValueError, match=rf"^{name} must be .*(\[|at most)") as info:
        fn(src, trg, **kw)
    assert "got" in str(info.value)


@pytest.mark.parametrize("fn", MIX_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("kw,name", [(dict(tau=1e39), "tau"), (dict(tau=1e-300), "tau"),
                                     (dict(tau=2e6), "tau"), (dict(alpha=1e39), "alpha")])
def test_mixture_options_outside_float32_are_rejected(fn, kw, name):
    src_mix, trg, _ = make_inputs(4, 4, 3, 5, k=2, requires_grad=False)
    with pytest.raises(ValueError, match=rf"^{name} must be a float in \["):
        fn(src_mix, trg, **kw)


def test_extreme_accepted_options_are_finite_and_agree():
    src, trg, pos_idx = make_inputs(8, 6, 4, 5, scale=2.0)
    lo, hi = _validate.TCLIP_RANGE
    # the largest tclip clips nothing: the unclipped loss (fused against fused on purpose; the
    # loop below pins both ends to the reference)
    assert_matches(loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx, tclip=hi),
                   loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx, tclip=None), rtol=1e-5, atol=1e-6)
    for tclip in (lo, hi):
        with expect_fused():
            fused = loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx, tclip=tclip)
        assert all(torch.isfinite(x).all() for x in fused)
        assert_matches(fused, loss_and_grads(ak.nce_loss_reference, src, trg, pos_idx, tclip=tclip),
                       rtol=2e-5, atol=2e-6)
    src_mix, trg, pos_idx = make_inputs(8, 6, 4, 5, k=3, scale=2.0)
    for tau, alpha in ((_validate.TAU_RANGE[0], None), (_validate.TAU_RANGE[1], None),
                       (_validate.TAU_RANGE[1], _validate.ALPHA_MAX)):
        kw = dict(tau=tau, alpha=alpha, detach_q=False)
        with expect_fused():
            fused = loss_and_grads(ak.fused_mixture_nce_loss, src_mix, trg, pos_idx, **kw)
        assert all(torch.isfinite(x).all() for x in fused), kw
        assert_matches(fused, loss_and_grads(ak.mixture_nce_loss_reference, src_mix, trg, pos_idx, **kw),
                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fn", NCE_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("tclip", [20.0, None])
def test_finite_scores_whose_square_overflows(fn, tclip):
    # scores ~1e20 > sqrt(FLT_MAX) ~ 1.8e19: finite, only their squares overflow
    src, trg, pos_idx = make_inputs(6, 5, 3, 4)
    src_big = (src.detach() * 1e10).requires_grad_()
    trg_big = (trg.detach() * 1e10).requires_grad_()
    loss, reg, g_src, g_trg = loss_and_grads(fn, src_big, trg_big, pos_idx, tclip=tclip, reg_weight=0.0)
    assert reg.item() == 0.0 and math.isfinite(loss.item())
    assert torch.isfinite(g_src).all() and torch.isfinite(g_trg).all()
    # the same loss as the reference in float64, where nothing overflows
    ref, _ = ak.nce_loss_reference(src_big.detach().double(), trg_big.detach().double(), pos_idx,
                                   tclip=tclip, reg_weight=0.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    # with a weight the regulariser itself exceeds float32: +Inf, reported as such, not an error
    _, reg = fn(src_big, trg_big, pos_idx, tclip=tclip, reg_weight=0.05)
    assert reg.item() == math.inf


# ---------------------------------------------------------------------------------- names, compat

NAME_CASES = [
    ("mixture: empty trg", lambda: ak.fused_mixture_nce_loss(torch.randn(4, 2, 5), torch.randn(4, 0, 5)), "src_mix"),
    ("mixture: NaN", lambda: ak.fused_mixture_nce_loss(nan_in(torch.randn(4, 2, 5), 1), torch.randn(4, 3, 5)), "src_mix"),
    ("mixture: overflow", lambda: ak.fused_mixture_nce_loss(torch.randn(4, 2, 5) * 1e30, torch.randn(4, 3, 5) * 1e30), "src_mix"),
    ("mixture: pos_idx device", lambda: ak.fused_mixture_nce_loss(torch.randn(4, 2, 5), torch.randn(4, 3, 5),
                                                                  torch.arange(4, device="meta")), "src_mix"),
    ("compat: dtype", lambda: compat.g2l_loss(torch.randn(3, 4), torch.randn(4, 6).double(), torch.eye(3)), "r_src"),
    ("compat: NaN", lambda: compat.g2l_loss(torch.randn(3, 4), inf_in(torch.randn(4, 6)), torch.eye(3)), "r_trg"),
    ("compat: overflow", lambda: compat.g2l_loss(torch.randn(3, 4) * 1e30, torch.randn(4, 6) * 1e30, torch.eye(3)), "r_src"),
    ("compat: empty", lambda: compat.g2l_loss(torch.randn(3, 4), torch.randn(4, 0), torch.eye(3)), "r_trg"),
]


@pytest.mark.parametrize("desc,call,name", NAME_CASES, ids=[c[0] for c in NAME_CASES])
def test_errors_name_the_callers_arguments(desc, call, name):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    message = str(info.value)
    assert name in message, message
    # the mixture's trg is its own argument; compat's are r_src and r_trg
    forbidden = r"\bsrc\b" if name == "src_mix" else r"\b(src|trg)\b"
    assert not re.search(forbidden, message), message


def test_compat_accepts_bool_masks():
    """The mask's dtype must not change the result: a self-comparison on purpose (test_compat.py
    compares g2l_loss with the public code)."""
    r_src, r_trg = torch.randn(5, 4, requires_grad=True), torch.randn(4, 12, requires_grad=True)
    mask = torch.zeros(5, 3)
    mask[torch.arange(5), torch.tensor([0, 2, 1, 1, 0])] = 1
    want = compat.g2l_loss(r_src, r_trg, mask)
    torch.testing.assert_close(compat.g2l_loss(r_src, r_trg, mask.bool()), want, rtol=0, atol=0)
    torch.testing.assert_close(compat.g2l_loss(r_src, r_trg, mask.long()), want, rtol=0, atol=0)
    bad = mask.bool()
    bad[3] = True
    with pytest.raises(ValueError, match="row 3"):
        compat.g2l_loss(r_src, r_trg, bad)
    assert_all_nan(compat.g2l_loss(r_src, r_trg, bad, strict=False))


# ------------------------------------------------------------------------------- torch.jit.trace

def trace_cases():
    """(name, loss(strict) -> the function to trace, its arguments)."""
    src, trg, pos_idx = make_inputs(6, 5, 3, 4, requires_grad=False)
    mix = make_inputs(6, 5, 3, 4, k=2, requires_grad=False)[0]
    r_trg, mask = trg.reshape(15, 4).t().contiguous(), torch.nn.functional.one_hot(pos_idx, 5)

    def bind(fn, **kw):
        return lambda strict: (lambda *a: fn(*a, strict=strict, **kw))

    return [("fused_nce_loss", bind(ak.fused_nce_loss), (src, trg, pos_idx)),
            ("fused_nce_loss dv", bind(ak.fused_nce_loss, estimator="dv"), (src, trg, pos_idx)),
            ("nce_loss_reference", bind(ak.nce_loss_reference), (src, trg, pos_idx)),
            ("fused_mixture_nce_loss", bind(ak.fused_mixture_nce_loss), (mix, trg, pos_idx)),
            ("mixture_nce_loss_reference", bind(ak.mixture_nce_loss_reference), (mix, trg, pos_idx)),
            ("NCELoss", lambda strict: ak.NCELoss(strict=strict), (src, trg, pos_idx)),
            ("g2l_loss", bind(compat.g2l_loss), (src, r_trg, mask))]


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("name,loss,args", trace_cases(), ids=[c[0] for c in trace_cases()])
def test_jit_trace_is_refused_and_eager_calls_stay_checked(name, loss, args):
    """A trace would keep the strict checks' outcome as constants: an invalid pos_idx would then
    give a finite loss (and DV would keep the traced sizes). Refused with an error saying what
    works, in either strict mode; the eager calls around it keep their checks."""
    want = loss(None)(*args)
    for strict in (None, False):
        with pytest.raises(RuntimeError, match=r"cannot be traced with torch\.jit\.trace.*torch\.compile or torch\.export"):
            torch.jit.trace(loss(strict), args, check_trace=False)
    torch.testing.assert_close(loss(None)(*args), want, rtol=0, atol=0)
    bad_args = list(args)
    if name == "g2l_loss":
        bad_args[2] = args[2].clone().index_fill(1, torch.tensor([0]), 1)   # two 1s in some rows
        error = "mask_mat rows must be one-hot"
    else:
        bad_args[2] = args[2].index_fill(0, torch.tensor([1]), 5)
        error = "pos_idx values must lie in"
    with pytest.raises(ValueError, match=error):
        loss(None)(*bad_args)
    assert_all_nan(loss(False)(*bad_args))


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_jit_trace_of_a_model_holding_the_loss_is_refused():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.loss = torch.nn.Linear(4, 4), ak.NCELoss()

        def forward(self, src, trg):
            return self.loss(self.proj(src), trg)[0]

    src, trg, _ = make_inputs(5, 5, 3, 4, requires_grad=False)
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.trace(Model(), (src, trg))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_torch_export_keeps_the_checks(estimator):
    """What the trace error recommends: an exported program poisons invalid values, and on other
    sizes gives their loss, or refuses them where export specialised on the sizes (DV's log of
    the count of negative pairs): never the example's count applied to other sizes."""
    class Loss(torch.nn.Module):
        def forward(self, src, trg, pos_idx):
            return ak.fused_nce_loss(src, trg, pos_idx, estimator=estimator)

    src, trg, pos_idx = make_inputs(6, 5, 3, 4, requires_grad=False)
    dims = dict(src=(torch.export.Dim("n"), None), trg=(torch.export.Dim("b"), None, None),
                pos_idx=(torch.export.Dim("n"),))
    with expect_fused():
        program = torch.export.export(Loss(), (src, trg, pos_idx), dynamic_shapes=dims).module()
    torch.testing.assert_close(program(src, trg, pos_idx),
                               ak.nce_loss_reference(src, trg, pos_idx, estimator=estimator))
    assert_all_nan(program(src, trg, pos_idx.index_fill(0, torch.tensor([1]), 5)))
    other = make_inputs(9, 7, 3, 4, seed=1, requires_grad=False)
    if estimator == "dv":
        with pytest.raises(AssertionError, match="Guard failed"):
            program(*other)
    else:
        torch.testing.assert_close(program(*other), ak.nce_loss_reference(*other, estimator=estimator))


# ------------------------------------------------------------------------ TORCH_EXTENSIONS_DIR

def _unbuildable_spec():
    """A spec no cache holds, so build_and_load must create its directory (it fails before any
    compiler runs)."""
    from amdim_kernels import _extension
    return _extension.make_spec("amdim_kernels_cache_probe", [], "no sources", cflags=[],
                                ldflags=[], cuda_cflags=[], with_cuda=False)


@pytest.mark.parametrize("kind", ["a file", "under a file", "read-only"])
def test_unusable_torch_extensions_dir_is_named(tmp_path, monkeypatch, kind):
    from amdim_kernels import _extension
    if kind == "read-only":
        path = tmp_path / "ro"
        path.mkdir()
        path.chmod(0o555)
        if os.access(path, os.W_OK):
            pytest.skip("this user (root) can write to a read-only directory")
    else:
        (tmp_path / "f").write_text("not a directory")
        path = tmp_path / "f" if kind == "a file" else tmp_path / "f" / "sub"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(path))
    with pytest.raises(_extension.BuildError) as info:
        _extension.build_and_load(_unbuildable_spec())
    message = str(info.value)
    assert f"TORCH_EXTENSIONS_DIR={str(path)!r}" in message, message
    assert "writable directory" in message and "AMDIM_KERNELS_BUILD_OPS=1" in message, message


def test_unusable_default_extension_cache_is_named(tmp_path, monkeypatch):
    """Unset TORCH_EXTENSIONS_DIR and a default cache that cannot be created: the error names the
    default and the variable that moves it."""
    from amdim_kernels import _extension
    (tmp_path / "home").write_text("not a directory")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    with pytest.raises(_extension.BuildError) as info:
        _extension.build_and_load(_unbuildable_spec())
    message = str(info.value)
    assert str(tmp_path / "home") in message and "TORCH_EXTENSIONS_DIR is unset" in message, message
    assert "set TORCH_EXTENSIONS_DIR to" in message, message
