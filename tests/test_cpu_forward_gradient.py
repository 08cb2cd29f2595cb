"""The CPU loss whose gradient is formed in the forward (op nce_fwd_grad, nce.ForwardGradientLoss):
where it is chosen, and that it matches the reference for every way a backward can weigh loss and
lgt_reg, on ragged shapes, several row blocks and thread splits; its ops pass opcheck and gradcheck;
torch.compile, retain_graph and one-sided gradients work. The other path (nce_fwd now, nce_bwd in
the backward) is checked on the same cases, forced by `path`."""
import pytest
import torch

import amdim_kernels as ak
from amdim_kernels import nce, ops
from loss_checks import assert_matches, expect_fused, make_inputs

pytestmark = pytest.mark.usefixtures("threads")

FORWARD_GRAD = "ForwardGradientLossBackward"


@pytest.fixture(params=["forward", "backward"])
def path(request, monkeypatch):
    """"forward": the gradient formed in the forward, where it applies (the default);
    "backward": nce_fwd + nce_bwd, forced by the user's switch AMDIM_KERNELS_CPU_GRADIENT."""
    monkeypatch.setenv("AMDIM_KERNELS_CPU_GRADIENT", request.param)
    return request.param


def grads_of(fn, src, trg, pos_idx, w_loss, w_reg, **kw):
    """(loss, lgt_reg, d src, d trg) of w_loss * loss + w_reg * lgt_reg (None: that output is not
    in the objective), and the name of loss's autograd node."""
    loss, reg = fn(src, trg, pos_idx, **kw)
    terms = [w * x for w, x in ((w_loss, loss), (w_reg, reg)) if w is not None]
    return (loss, reg) + torch.autograd.grad(sum(terms), (src, trg)), type(loss.grad_fn).__name__


def check_against_reference(src, trg, pos_idx, path, w_loss=1.0, w_reg=1.0, **kw):
    with expect_fused(calls=1):
        fused, node = grads_of(ak.fused_nce_loss, src, trg, pos_idx, w_loss, w_reg, **kw)
    ref, _ = grads_of(ak.nce_loss_reference, src, trg, pos_idx, w_loss, w_reg, **kw)
    assert (node == FORWARD_GRAD) == (path == "forward"), node
    tol = (dict(rtol=1e-10, atol=1e-12) if src.dtype == torch.float64
           else dict(rtol=2e-5, atol=2e-6))
    assert_matches(fused, ref, **tol)


# (N, B, L, D): N > 128 takes several row blocks; B*L > 256 several column blocks per thread;
# B*L = 9 leaves the first of two threads no columns; B = 1 has no negatives.
SHAPES = [(7, 7, 25, 13), (300, 17, 33, 70), (131, 40, 9, 5), (5, 3, 3, 9), (6, 1, 7, 4)]
WEIGHTS = [(1.0, 1.0), (0.5, 0.5), (0.7, 1.3), (1.0, None), (None, 1.0)]


@pytest.mark.parametrize("estimator", ["nce", "jsd"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_loss,w_reg", WEIGHTS)
def test_matches_reference(path, estimator, shape, w_loss, w_reg):
    n, b, l, d = shape
    src, trg, pos_idx = make_inputs(n, b, l, d, torch.float64, scale=2.0)
    check_against_reference(src, trg, pos_idx, path, w_loss, w_reg, estimator=estimator,
                            tclip=20.0, reg_weight=0.05)


@pytest.mark.parametrize("estimator", ["nce", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tclip,reg_weight", [(10.0, 0.0), (None, 0.05), (None, 0.0)])
def test_clip_regulariser_and_dtypes(path, estimator, dtype, tclip, reg_weight):
    src, trg, pos_idx = make_inputs(150, 11, 25, 37, dtype, scale=2.0)
    check_against_reference(src, trg, pos_idx, path, 0.7, 1.3, estimator=estimator, tclip=tclip,
                            reg_weight=reg_weight)


@pytest.mark.parametrize("estimator", ["nce", "jsd"])
def test_pos_idx_patterns(estimator):
    """N != B: every location of an image a row (DIM's local loss, N = B * L), and rows sharing
    a positive sample."""
    b, l, d = 6, 10, 12
    src, trg, _ = make_inputs(b * l, b, l, d, torch.float64)
    check_against_reference(src, trg, torch.arange(b).repeat_interleave(l), "forward",
                            estimator=estimator)
    check_against_reference(src[:13], trg, torch.tensor([0, 0, 0, 5, 5, 1, 2, 2, 2, 2, 3, 4, 4]),
                            "forward", estimator=estimator)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    """16-bit inputs are upcast before the op; the gradients come back in the inputs' dtype."""
    src, trg, pos_idx = make_inputs(40, 9, 25, 16, dtype)
    with expect_fused():
        fused, node = grads_of(ak.fused_nce_loss, src, trg, pos_idx, 1.0, 1.0)
    ref, _ = grads_of(ak.nce_loss_reference, src.float().detach().requires_grad_(),
                      trg.float().detach().requires_grad_(), pos_idx, 1.0, 1.0)
    assert node == FORWARD_GRAD
    assert fused[2].dtype == fused[3].dtype == dtype
    for f, r in zip(fused, ref):
        torch.testing.assert_close(f.float(), r, rtol=1e-2, atol=1e-4)


def test_kept_rows_below_the_tile_height():
    """M = 70400 columns: 128 rows x M floats would exceed the kept block's 32 MiB, so row blocks
    of 112 rows are taken (130 rows: two blocks)."""
    src, trg, pos_idx = make_inputs(130, 1100, 64, 3, torch.float32)
    check_against_reference(src, trg, pos_idx, "forward", 0.5, 0.5, tclip=5.0)


def test_where_it_applies():
    src, trg, pos_idx = make_inputs(9, 7, 5, 8, torch.float64)
    assert nce.gradient_in_forward(src, trg, "nce") and nce.gradient_in_forward(src, trg, "jsd")
    assert not nce.gradient_in_forward(src, trg, "dv")   # a statistic of all rows
    assert nce.gradient_in_forward(src.detach(), trg, "nce")
    assert not nce.gradient_in_forward(src.detach(), trg.detach(), "nce")
    with torch.no_grad():
        assert not nce.gradient_in_forward(src, trg, "nce")
    seen = []
    torch.func.grad(lambda s: seen.append(nce.gradient_in_forward(s, trg, "nce"))
                    or ak.fused_nce_loss(s, trg, pos_idx)[0])(src)
    assert seen == [False]   # torch.func transforms take nce_fwd's autograd.Function


def test_the_switch_to_the_backward(monkeypatch):
    """AMDIM_KERNELS_CPU_GRADIENT=backward: nothing formed in the forward (nce_fwd's node);
    unset or forward: the default; anything else: an error naming the variable."""
    src, trg, pos_idx = make_inputs(9, 7, 5, 8, torch.float64)
    node = lambda: type(ak.fused_nce_loss(src, trg, pos_idx)[0].grad_fn).__name__
    monkeypatch.delenv("AMDIM_KERNELS_CPU_GRADIENT", raising=False)
    assert node() == FORWARD_GRAD
    monkeypatch.setenv("AMDIM_KERNELS_CPU_GRADIENT", "backward")
    assert not nce.gradient_in_forward(src, trg, "nce") and node() != FORWARD_GRAD
    monkeypatch.setenv("AMDIM_KERNELS_CPU_GRADIENT", "forward")
    assert node() == FORWARD_GRAD
    monkeypatch.setenv("AMDIM_KERNELS_CPU_GRADIENT", "bwd")
    with pytest.raises(ValueError, match="AMDIM_KERNELS_CPU_GRADIENT must be one of forward, backward"):
        node()


@pytest.mark.parametrize("requires", ["src", "trg"])
def test_one_input_requires_grad(requires):
    src, trg, pos_idx = make_inputs(20, 9, 25, 16, torch.float64, requires_grad=False)
    x = (src if requires == "src" else trg).requires_grad_()
    loss, reg = ak.fused_nce_loss(src, trg, pos_idx)
    assert type(loss.grad_fn).__name__ == FORWARD_GRAD
    (got,) = torch.autograd.grad(loss + reg, x)
    ref_loss, ref_reg = ak.nce_loss_reference(src, trg, pos_idx)
    (want,) = torch.autograd.grad(ref_loss + ref_reg, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_retain_graph_and_accumulation():
    """The kept gradient is handed to autograd as it is: a retained graph's later backwards give
    it again (.grad accumulating into it in place would double what the third one gives)."""
    src, trg, pos_idx = make_inputs(20, 9, 25, 16, torch.float64)
    loss, reg = ak.fused_nce_loss(src, trg, pos_idx)
    (loss + reg).backward(retain_graph=True)
    first = src.grad.clone(), trg.grad.clone()
    (loss + reg).backward(retain_graph=True)
    (loss + reg).backward()
    torch.testing.assert_close(src.grad, 3 * first[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(trg.grad, 3 * first[1], rtol=0, atol=1e-15)


def test_results_depend_on_the_thread_count_only():
    """Deterministic for a given thread count (per-thread column ranges, merged in thread order);
    1 and 2 threads agree to rounding."""
    src, trg, pos_idx = make_inputs(300, 17, 33, 70, torch.float32)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (2, 2, 1):
            torch.set_num_threads(threads)
            runs.append(grads_of(ak.fused_nce_loss, src, trg, pos_idx, 1.0, 1.0)[0])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert_matches(runs[0], runs[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ["nce", "jsd"])
def test_gradcheck(estimator):
    """float64 gradcheck of the objective loss + lgt_reg (the kept gradient, handed over) and of
    the two outputs apart (their one-hot upstream gradients take the backward's other branch)."""
    src, trg, pos_idx = make_inputs(6, 5, 3, 4, torch.float64)
    kw = dict(tclip=5.0, reg_weight=0.1, estimator=estimator)
    with expect_fused():
        assert torch.autograd.gradcheck(lambda s, t: sum(ak.fused_nce_loss(s, t, pos_idx, **kw)),
                                        (src, trg), eps=1e-6, atol=1e-8, rtol=1e-6)
        assert torch.autograd.gradcheck(lambda s, t: ak.fused_nce_loss(s, t, pos_idx, **kw),
                                        (src, trg), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["nce", "jsd"])
@pytest.mark.parametrize("tclip", [20.0, None])
def test_opcheck_forward_op(dtype, estimator, tclip):
    # inputs without grad: the op's outputs are its own gradient, never differentiated (its
    # autograd formula raises: test_forward_op_refuses_dv_and_differentiation)
    src, trg, pos_idx = make_inputs(9, 7, 5, 11, dtype, requires_grad=False)
    torch.library.opcheck(ops.nce_fwd_grad, (src, trg, pos_idx, tclip, 0.05, estimator))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 1.3)])
@pytest.mark.parametrize("estimator", ["nce", "jsd"])
def test_opcheck_backward_op(weights, estimator):
    src, trg, pos_idx = make_inputs(9, 7, 5, 11, torch.float64, requires_grad=False)
    pos, neg_stat, _, grad_src, grad_trg = ops.nce_fwd_grad(src, trg, pos_idx, 20.0, 0.05, estimator)
    args = (*(torch.tensor(w, dtype=torch.float64) for w in weights), grad_src, grad_trg, src, trg,
            pos_idx, pos, neg_stat, 20.0, 0.05, estimator)
    torch.library.opcheck(ops.nce_fwd_grad_backward, args)


def test_forward_op_refuses_dv_and_differentiation():
    src, trg, pos_idx = make_inputs(9, 7, 5, 11, torch.float64)
    with pytest.raises(RuntimeError, match="estimator must be 'nce' or 'jsd'"):
        ops.nce_fwd_grad(src, trg, pos_idx, 20.0, 0.05, "dv")
    pos = ops.nce_fwd_grad(src, trg, pos_idx, 20.0, 0.05, "nce")[0]
    with pytest.raises(RuntimeError, match="nce_fwd_grad is not differentiable"):
        pos.sum().backward()


@pytest.mark.parametrize("w_reg", [1.0, 1.3])
def test_torch_compile_fullgraph(w_reg):
    src, trg, pos_idx = make_inputs(17, 13, 7, 10, torch.float32)

    @torch.compile(fullgraph=True)
    def objective(s, t, p):
        loss, reg = ak.fused_nce_loss(s, t, p, tclip=10.0)
        return loss + w_reg * reg

    with expect_fused():
        out = objective(src, trg, pos_idx)
    got = torch.autograd.grad(out, (src, trg))
    ref_loss, ref_reg = ak.nce_loss_reference(src, trg, pos_idx, tclip=10.0)
    want = torch.autograd.grad(ref_loss + w_reg * ref_reg, (src, trg))
    torch.testing.assert_close(out, ref_loss + w_reg * ref_reg, rtol=2e-5, atol=2e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-6)
