"""compat.g2l_loss against a straight port of the public AMDIM code's _loss_g2l (spec section 1)."""
import pytest
import torch

from amdim_kernels import compat
from loss_checks import expect_fused

pytestmark = pytest.mark.usefixtures("threads")   # B*L = 294 > 256: the C++ kernels split columns


def public_g2l_loss(r_src, r_trg, mask_mat, tclip):
    """NCE_MI_MULTI._model_scores / _loss_g2l as the spec describes them: dense N x B x L masks."""
    n_batch_gpu, n_batch = mask_mat.shape
    n_locs = r_trg.shape[1] // n_batch
    n_rkhs = r_src.shape[1]
    mask_pos = mask_mat.unsqueeze(2).expand(-1, -1, n_locs).float()
    mask_neg = 1.0 - mask_pos
    raw = torch.mm(r_src, r_trg).float().reshape(n_batch_gpu, n_batch, n_locs) / n_rkhs ** 0.5
    lgt_reg = 5e-2 * (raw ** 2).mean()
    if tclip is not None:
        raw = tclip * torch.tanh(raw / tclip)
    pos = (mask_pos * raw).sum(dim=1)
    neg = ((mask_neg * raw) - (tclip or 0.0) * mask_pos).reshape(n_batch_gpu, -1)
    mask_neg = mask_neg.reshape(n_batch_gpu, -1)
    neg_max = neg.max(dim=1, keepdim=True)[0]
    neg_sumexp = (mask_neg * torch.exp(neg - neg_max)).sum(dim=1, keepdim=True)
    all_lse = torch.log(torch.exp(pos - neg_max) + neg_sumexp)
    nce = (pos - neg_max) - all_lse
    return -nce.mean(), lgt_reg


@pytest.mark.parametrize("n,b,l,d", [(6, 6, 49, 10), (11, 5, 25, 33), (40, 40, 1, 7)])
@pytest.mark.parametrize("tclip", [20.0, 10.0])
def test_matches_public_code(n, b, l, d, tclip):
    g = torch.Generator().manual_seed(0)
    r_src = (2 * torch.randn(n, d, generator=g)).requires_grad_()
    r_trg = (2 * torch.randn(d, b * l, generator=g)).requires_grad_()
    mask = torch.zeros(n, b)
    mask[torch.arange(n), torch.randint(0, b, (n,), generator=g)] = 1
    with expect_fused():
        ours = compat.g2l_loss(r_src, r_trg, mask, tclip=tclip)
        g_ours = torch.autograd.grad(sum(ours), (r_src, r_trg))
    theirs = public_g2l_loss(r_src, r_trg, mask, tclip)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6)
    g_theirs = torch.autograd.grad(sum(theirs), (r_src, r_trg))
    for x, y in zip(g_ours, g_theirs):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("row", [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.5, 0.0], [2.0, 0.0, -1.0]])
def test_mask_rows_must_be_one_hot(row):
    mask = torch.eye(3)
    mask[1] = torch.tensor(row)
    with pytest.raises(ValueError, match="mask_mat rows must be one-hot.*row 1"):
        compat.g2l_loss(torch.randn(3, 4), torch.randn(4, 6), mask)


@pytest.mark.parametrize("r_src,r_trg,mask,word", [
    (torch.randn(3, 4), torch.randn(5, 6), torch.eye(3), "r_trg"),
    (torch.randn(3, 4), torch.randn(4, 7), torch.eye(3), "B*L"),
    (torch.randn(3, 4), torch.randn(4, 6), torch.eye(4), "mask_mat"),
    (torch.randn(3, 4, 1), torch.randn(4, 6), torch.eye(3), "r_src"),
])
def test_shape_errors(r_src, r_trg, mask, word):
    with pytest.raises(ValueError, match=word):
        compat.g2l_loss(r_src, r_trg, mask)
