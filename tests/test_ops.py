"""The registered ops: float64 gradcheck, torch.library.opcheck, and torch.compile(fullgraph=True)."""
import pytest
import torch

import amdim_kernels as ak
from amdim_kernels import ops
from loss_checks import expect_fused, make_inputs

pytestmark = pytest.mark.usefixtures("threads")   # the C++ kernels' per-thread merges


@pytest.mark.parametrize("tclip", [3.0, None])
@pytest.mark.parametrize("neg_reduction", ["logsumexp", "softplus_sum"])
def test_gradcheck_fwd_op(tclip, neg_reduction):
    src, trg, pos_idx = make_inputs(5, 4, 3, 6, torch.float64)
    fn = lambda s, t: ops.nce_fwd(s, t, pos_idx, tclip, neg_reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (src, trg), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_fused_loss():
    src, trg, pos_idx = make_inputs(6, 5, 3, 4, torch.float64)
    fn = lambda s, t: ak.fused_nce_loss(s, t, pos_idx, tclip=5.0)  # noqa: E731
    with expect_fused():
        assert torch.autograd.gradcheck(fn, (src, trg), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_single_sample():
    src, trg, _ = make_inputs(3, 1, 4, 5, torch.float64)
    fn = lambda s, t: ak.fused_nce_loss(s, t, torch.zeros(3, dtype=torch.long))  # noqa: E731
    with expect_fused():
        assert torch.autograd.gradcheck(fn, (src, trg), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("neg_reduction", ["logsumexp", "softplus_sum"])
def test_opcheck_fwd(dtype, neg_reduction):
    src, trg, pos_idx = make_inputs(9, 7, 5, 11, dtype)
    torch.library.opcheck(ops.nce_fwd, (src, trg, pos_idx, 20.0, neg_reduction))
    torch.library.opcheck(ops.nce_fwd, (src, trg, pos_idx, None, neg_reduction))


@pytest.mark.parametrize("neg_reduction", ["logsumexp", "softplus_sum"])
def test_opcheck_bwd(neg_reduction):
    src, trg, pos_idx = make_inputs(9, 7, 5, 11, torch.float64, requires_grad=False)
    pos, neg_stat, _ = ops.nce_fwd(src, trg, pos_idx, 20.0, neg_reduction)
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(pos.shape, generator=g, dtype=pos.dtype),
            torch.randn(neg_stat.shape, generator=g, dtype=pos.dtype),
            torch.tensor(0.3, dtype=pos.dtype), src, trg, pos_idx, neg_stat, 20.0, neg_reduction)
    torch.library.opcheck(ops.nce_bwd, args)


def test_torch_compile_fullgraph():
    src, trg, pos_idx = make_inputs(17, 13, 7, 10, torch.float32)

    @torch.compile(fullgraph=True)
    def objective(s, t, p):
        loss, reg = ak.fused_nce_loss(s, t, p, tclip=10.0)
        return loss + reg

    with expect_fused():
        out = objective(src, trg, pos_idx)
    g_src, g_trg = torch.autograd.grad(out, (src, trg))
    ref_loss, ref_reg = ak.nce_loss_reference(src, trg, pos_idx, tclip=10.0)
    r_src, r_trg = torch.autograd.grad(ref_loss + ref_reg, (src, trg))
    torch.testing.assert_close(out, ref_loss + ref_reg, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g_src, r_src, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g_trg, r_trg, rtol=2e-5, atol=2e-6)
