"""Saturated scores (|a| >> tclip): the gradient through the soft clip, d s / d a = 1 - tanh^2,
is ~4 exp(-2 |a| / tclip), far below what 1 - t^2 of a rounded t can express (~1.2e-7 in float,
~1e-16 in double). Every nce_bwd kernel must get these tiny gradients right relative to
themselves: the C++ CPU kernel here (float32 and float64); the Triton kernel in
tests/test_triton_nce_bwd.py; the CUDA kernel's per-element code in tests/test_cuda_nce_bwd.py."""
from __future__ import annotations

import pytest
import torch

import math

import torch.nn.functional as F

from test_cuda_nce_bwd import statistics
from amdim_kernels.reference import raw_scores


def saturated_problem(seed: int = 0):
    """float64 (src, trg, pos_idx, (grad_pos, grad_neg_stat, grad_sumsq = 0), tclip) whose every
    score has |a| / tclip in about [11, 30]: one dominant coordinate of random sign and magnitude,
    a little noise in the others."""
    g = torch.Generator().manual_seed(seed)
    n, b, l, d, tclip = 6, 5, 3, 8, 1.0
    sign = lambda *shape: torch.randint(0, 2, shape, generator=g).double() * 2 - 1  # noqa: E731
    src = 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    trg = 0.1 * torch.randn(b, l, d, generator=g, dtype=torch.float64)
    src[:, 0] = sign(n) * (8 + 4 * torch.rand(n, generator=g, dtype=torch.float64))
    trg[..., 0] = sign(b, l) * (4 + 3 * torch.rand(b, l, generator=g, dtype=torch.float64))
    pos_idx = torch.randint(0, b, (n,), generator=g)
    grads = (torch.randn(n, l, generator=g, dtype=torch.float64) / (n * l),
             (0.5 + torch.rand(n, generator=g, dtype=torch.float64)) / n,
             torch.zeros((), dtype=torch.float64))
    a = raw_scores(src.float().double(), trg.float().double()).abs() / tclip
    assert 10 < a.min() and a.max() < 32, (a.min(), a.max())
    return src, trg, pos_idx, grads, tclip


def exact_input_grads(src, trg, pos_idx, tclip, grads):
    """d <grads, (pos, neg_stat, sumsq)> / d (src, trg) in float64, with the clip written as
    tclip * (1 - 2 / (exp(2a / tclip) + 1)): autograd's chain through it forms the derivative
    4u / (u + 1)^2 (u = exp(2a / tclip)) without cancellation, where torch.tanh's backward,
    1 - tanh^2, is exactly 0 in float64 beyond |a| ~ 19 tclip."""
    src, trg = src.detach().double().requires_grad_(), trg.detach().double().requires_grad_()
    stats = exact_clip_statistics(raw_scores(src, trg), pos_idx, tclip)
    total = sum((st * g).sum() for st, g in zip(stats, grads))
    return torch.autograd.grad(total, (src, trg))


def exact_clip_statistics(a, pos_idx, tclip):
    """(pos, logsumexp neg_stat, sumsq) of float64 scores a (N, B, L), the clip as above."""
    s = tclip * (1 - 2 / (torch.exp(2 * a / tclip) + 1))
    n, b = a.shape[:2]
    pos = s[torch.arange(n), pos_idx]
    is_pos = F.one_hot(pos_idx, b).bool()[:, :, None]
    neg_stat = s.masked_fill(is_pos, -math.inf).reshape(n, -1).logsumexp(1)
    return pos, neg_stat, a.square().sum()


def assert_relative_to_each_element(got, src, trg, pos_idx, tclip, grads, rtol):
    truth = exact_input_grads(src, trg, pos_idx, tclip, grads)
    for x, want in zip(got, truth):
        assert want.abs().max() < 1e-6    # far below what 1 - t^2 of a rounded float t allows
        assert (want != 0).all()
        rel = ((x.cpu().double() - want).abs() / want.abs()).max().item()
        assert rel < rtol, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_cpu_kernel(dtype, seed):
    from amdim_kernels import ops
    src64, trg64, pos_idx, grads, tclip = saturated_problem(seed)
    src, trg = src64.to(dtype), trg64.to(dtype)
    with torch.no_grad():
        neg_stat = statistics(raw_scores(src.double(), trg.double()), pos_idx, tclip, "logsumexp")[1]
    got = ops.nce_bwd(*[x.to(dtype) for x in grads], src, trg, pos_idx, neg_stat.to(dtype), tclip,
                      "logsumexp")
    assert_relative_to_each_element(got, src, trg, pos_idx, tclip, grads,
                                    1e-3 if dtype == torch.float32 else 1e-9)
