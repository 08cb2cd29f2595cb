"""fused_nce_loss(estimator="jsd" | "dv") (spec section 4) against the spec reference: loss,
lgt_reg and gradients; float64 gradcheck; B == 1; bad input; the Triton statistics (interpreter)."""
import math

import pytest
import torch

import amdim_kernels as ak
from loss_checks import (assert_error_within_torch_error, assert_matches, expect_fused, loss_and_grads,
                         make_inputs)
from amdim_kernels.nce import Dispatch, estimator_loss, record_dispatch

pytestmark = pytest.mark.usefixtures("threads")   # the C++ kernels' per-thread merges

# (N, B, L, D): ragged, crossing the CPU tiles in rows (N > 128) and columns (B*L > 256).
SHAPES = [(1, 2, 1, 3), (7, 7, 25, 13), (19, 23, 49, 37), (131, 131, 1, 5), (150, 11, 25, 70)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("estimator", ["jsd", "dv"])
@pytest.mark.parametrize("tclip,reg_weight", [(20.0, 0.05), (None, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(shape, estimator, tclip, reg_weight, dtype):
    kw = dict(tclip=tclip, reg_weight=reg_weight, estimator=estimator)
    src, trg, pos_idx = make_inputs(*shape, dtype, scale=2.0)
    with expect_fused(calls=1):
        fused = loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx, **kw)
    ref = loss_and_grads(ak.nce_loss_reference, src, trg, pos_idx, **kw)
    assert_matches(fused, ref, **TOL[dtype])


def test_reference_matches_the_spec_by_hand():
    """Spec section 4 spelled out over the pairs of a tiny problem, in plain Python floats."""
    src, trg, pos_idx = make_inputs(3, 4, 2, 5, torch.float64, scale=2.0)
    s = (5.0 * torch.tanh(src @ trg.reshape(8, 5).T / math.sqrt(5) / 5.0)).view(3, 4, 2).tolist()
    pos = [s[i][b][l] for i in range(3) for b in range(4) for l in range(2) if b == pos_idx[i]]
    neg = [s[i][b][l] for i in range(3) for b in range(4) for l in range(2) if b != pos_idx[i]]
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    jsd = sum(softplus(-x) for x in pos) / len(pos) + sum(softplus(x) for x in neg) / len(neg)
    dv = -(sum(pos) / len(pos) - math.log(sum(math.exp(x) for x in neg) / len(neg)))
    for estimator, want in (("jsd", jsd), ("dv", dv)):
        loss, _ = ak.nce_loss_reference(src, trg, pos_idx, tclip=5.0, estimator=estimator)
        assert loss.item() == pytest.approx(want, rel=1e-12), estimator


@pytest.mark.parametrize("estimator", ["jsd", "dv"])
@pytest.mark.parametrize("tclip", [4.0, None])
def test_gradcheck(estimator, tclip):
    src, trg, pos_idx = make_inputs(6, 5, 3, 4, torch.float64)
    fn = lambda s, t: ak.fused_nce_loss(s, t, pos_idx, tclip=tclip, estimator=estimator)  # noqa: E731
    with expect_fused():
        assert torch.autograd.gradcheck(fn, (src, trg), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_jsd_without_negatives_keeps_the_positive_term():
    src, trg, _ = make_inputs(4, 1, 5, 6, torch.float64, scale=2.0)
    pos_idx = torch.zeros(4, dtype=torch.long)
    with expect_fused():
        fused = loss_and_grads(ak.fused_nce_loss, src, trg, pos_idx, estimator="jsd")
    ref = loss_and_grads(ak.nce_loss_reference, src, trg, pos_idx, estimator="jsd")
    assert_matches(fused, ref, **TOL[torch.float64])
    s = 20.0 * torch.tanh(src.detach() @ trg.detach()[0].T / math.sqrt(6) / 20.0)
    assert fused[0].item() == pytest.approx(torch.nn.functional.softplus(-s).mean().item(), rel=1e-12)


@pytest.mark.parametrize("fn", [ak.fused_nce_loss, ak.nce_loss_reference], ids=lambda f: f.__name__)
def test_dv_without_negatives_raises(fn):
    src, trg, _ = make_inputs(4, 1, 5, 6, torch.float32, scale=2.0)
    with pytest.raises(ValueError, match=r"estimator='dv'.*B >= 2"):
        fn(src, trg, torch.zeros(4, dtype=torch.long), estimator="dv")


@pytest.mark.parametrize("fn", [ak.fused_nce_loss, ak.nce_loss_reference], ids=lambda f: f.__name__)
@pytest.mark.parametrize("estimator", ["infonce", "JSD", None, 1])
def test_unknown_estimator(fn, estimator):
    src, trg, _ = make_inputs(4, 4, 2, 3, torch.float32, scale=2.0)
    with pytest.raises(ValueError, match="estimator must be one of"):
        fn(src, trg, estimator=estimator)


def test_nce_is_the_default_and_lgt_reg_does_not_depend_on_the_estimator():
    """Partly a self-comparison on purpose: the default must be "nce" itself, and lgt_reg the same
    for every estimator; the reference pins the values."""
    src, trg, pos_idx = make_inputs(9, 6, 4, 7, torch.float64, scale=2.0)
    with record_dispatch() as ran:
        default = ak.fused_nce_loss(src, trg, pos_idx)
    assert ran == [Dispatch("nce", "cpp")]
    torch.testing.assert_close(default, ak.nce_loss_reference(src, trg, pos_idx), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ak.fused_nce_loss(src, trg, pos_idx, estimator="nce"), default,
                               rtol=0, atol=0)
    for estimator in ("jsd", "dv"):
        loss, reg = ak.fused_nce_loss(src, trg, pos_idx, estimator=estimator)
        torch.testing.assert_close(reg, default[1], rtol=1e-14, atol=0)
        assert not torch.isclose(loss, default[0])


@pytest.mark.parametrize("estimator", ["jsd", "dv"])
def test_reference_backend_is_the_reference(estimator):
    src, trg, pos_idx = make_inputs(5, 4, 3, 6, torch.float64, scale=2.0)
    with record_dispatch() as ran:
        out = ak.fused_nce_loss(src, trg, pos_idx, estimator=estimator, backend="reference")
    assert ran == [Dispatch(estimator, "reference")]
    torch.testing.assert_close(out, ak.nce_loss_reference(src, trg, pos_idx, estimator=estimator),
                               rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's numpy warns on inf/NaN in masked-out lanes
@pytest.mark.parametrize("estimator,neg_reduction", [("jsd", "softplus_sum"), ("dv", "logsumexp")])
def test_from_triton_statistics(estimator, neg_reduction):
    """The GPU path's forward: the Triton nce_fwd (on the GPU where there is one, else under the
    interpreter) feeding the same composition."""
    from amdim_kernels.triton_nce_fwd import nce_fwd_triton
    src, trg, pos_idx = make_inputs(20, 9, 7, 24, torch.float32, scale=2.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pos, neg_stat, _ = nce_fwd_triton(src.detach().to(device), trg.detach().to(device),
                                      pos_idx.to(device), 20.0, neg_reduction)
    loss = estimator_loss(estimator, pos, neg_stat, trg.shape[0]).cpu()
    ref, _ = ak.nce_loss_reference(src, trg, pos_idx, estimator=estimator)
    torch.testing.assert_close(loss, ref.detach(), rtol=2e-5, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("estimator", ["jsd", "dv"])
@pytest.mark.parametrize("tclip", [20.0, None])
def test_cuda_matches_reference(estimator, tclip):
    src, trg, pos_idx = (x.detach().cuda() for x in make_inputs(300, 300, 49, 256, torch.float32))
    assert_error_within_torch_error(ak.fused_nce_loss, ak.nce_loss_reference, src, trg, pos_idx,
                                    tclip=tclip, estimator=estimator)
