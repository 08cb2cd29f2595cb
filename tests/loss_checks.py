"""Shared by the fused-vs-reference tests: run a loss with its gradients, compare two such runs."""
import torch


def loss_and_grads(fn, src, trg, pos_idx, w_loss=0.7, w_reg=1.3, **kw):
    """(loss, lgt_reg, d src, d trg) of w_loss * loss + w_reg * lgt_reg: unequal weights, so a
    gradient that mixes up the two terms shows."""
    loss, reg = fn(src, trg, pos_idx, **kw)
    return (loss, reg) + torch.autograd.grad(w_loss * loss + w_reg * reg, (src, trg))


def assert_matches(fused, ref, rtol, atol):
    for name, f, r in zip(("loss", "lgt_reg", "grad src", "grad trg"), fused, ref):
        assert f.dtype == r.dtype, name
        torch.testing.assert_close(f, r, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
