"""Triton mixture-q epilogue: the CUDA kernels of amdim_kernels::mixture_fwd / mixture_bwd
(amdim_kernels/mixture.py, docs/design.md).

One program per source row i: it holds the row's k negative statistics Z_j and walks its L
positives in BLOCK_L chunks as a (BLOCK_K, BLOCK_L) tile of P_j[l]. The work is O(N*k*L), a few
MB at most, so the kernels are simple loads and elementwise math; per-row results are reduced by
torch (deterministic, and N numbers).

The kernels also run under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors), which the
tests use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import _sigmoid, _softplus, check_device, device_guard
# Widest chunk of positives per step: L is 25 or 49 in AMDIM, so one chunk usually holds a row.
MAX_BLOCK_L = 64


@triton.jit
def _component_log_probs(pos_ptr, z, row, ls, js, j_ok, K, L, tau):
    """nce_j[l] = -softplus(Z_j - P_j[l]), and log q_j[l] of q = softmax over j of tau * nce_j.
    Padded components get log q = -inf; padded positions (l >= L) are finite and masked later."""
    mask = j_ok[:, None] & (ls < L)[None, :]
    p = tl.load(pos_ptr + row * K * L + js[:, None] * L + ls[None, :], mask=mask, other=0.0)
    nce = -_softplus(z[:, None] - p)            # 0 when Z = -inf (B == 1: no negatives)
    # Shift by the max nce before scaling by tau, as the C++ kernel does (k = 1 gives q = 1).
    m = tl.max(tl.where(j_ok[:, None], nce, float("-inf")), axis=0)   # finite: k >= 1
    t = tl.where(j_ok[:, None], tau * (nce - m[None, :]), float("-inf"))
    log_q = t - tl.log(tl.sum(tl.exp(t), axis=0))[None, :]
    return p, nce, log_q, mask


@triton.jit
def _mixture_fwd_kernel(pos_ptr, neg_ptr, row_obj_ptr, K, L, tau, alpha,
                        BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    js = tl.arange(0, BLOCK_K)
    j_ok = js < K
    z = tl.load(neg_ptr + row * K + js, mask=j_ok, other=0.0)
    acc = tl.zeros((BLOCK_L,), tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        _, nce, log_q, mask = _component_log_probs(pos_ptr, z, row, ls, js, j_ok, K, L, tau)
        q = tl.exp(log_q)
        # padded components have q = 0 and log q = -inf: their q * log q is 0, not NaN
        q_log_q = q * tl.where(j_ok[:, None], log_q, 0.0)
        term = tl.where(mask, q * nce - alpha * q_log_q, 0.0)
        acc += tl.sum(term, axis=0)
    tl.store(row_obj_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _mixture_bwd_kernel(grad_loss_ptr, pos_ptr, neg_ptr, grad_pos_ptr, grad_neg_ptr,
                        K, L, tau, through_q, inv_count,
                        DETACH_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    js = tl.arange(0, BLOCK_K)
    j_ok = js < K
    z = tl.load(neg_ptr + row * K + js, mask=j_ok, other=0.0)
    scale = -tl.load(grad_loss_ptr) * inv_count      # d loss / d objective[i, l]
    grad_z = tl.zeros((BLOCK_K,), tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        p, nce, log_q, mask = _component_log_probs(pos_ptr, z, row, ls, js, j_ok, K, L, tau)
        q = tl.exp(log_q)
        if DETACH_Q:
            g_nce = scale * q
        else:
            # d objective / d nce_j = q_j * (1 + tau * (1 - alpha * tau) * (nce_j - sum_m q_m nce_m))
            mean_nce = tl.sum(q * nce, axis=0)
            g_nce = scale * q * (1.0 + through_q * (nce - mean_nce[None, :]))
        # nce_j = -softplus(Z_j - P_j): d/dP = sigmoid(Z_j - P_j) = -d/dZ
        g = tl.where(mask, g_nce * _sigmoid(z[:, None] - p), 0.0)
        tl.store(grad_pos_ptr + row * K * L + js[:, None] * L + ls[None, :], g, mask=mask)
        grad_z -= tl.sum(g, axis=1)
    tl.store(grad_neg_ptr + row * K + js, grad_z, mask=j_ok)


def _check(pos: torch.Tensor, neg_stat: torch.Tensor) -> None:
    if pos.dtype != torch.float32 or neg_stat.dtype != torch.float32:
        # nce_fwd's Triton forward returns float32 statistics; nothing else reaches this kernel.
        raise TypeError(f"the Triton mixture epilogue takes float32 pos and neg_stat, got "
                        f"{pos.dtype} and {neg_stat.dtype}")
    n, k, _ = pos.shape
    if neg_stat.shape != (n, k) or k == 0:
        raise ValueError(f"pos must be (N, k, L) with k >= 1 and neg_stat (N, k), got "
                         f"{tuple(pos.shape)} and {tuple(neg_stat.shape)}")
    check_device(pos, "the Triton mixture epilogue")


def _blocks(pos: torch.Tensor) -> dict:
    _, k, l = pos.shape
    return dict(BLOCK_K=triton.next_power_of_2(k), BLOCK_L=min(MAX_BLOCK_L, triton.next_power_of_2(l)))


def mixture_fwd_triton(pos: torch.Tensor, neg_stat: torch.Tensor, tau: float, alpha: float,
                       detach_q: bool) -> torch.Tensor:
    """The mixture loss (0-dim float32) from pos (N, k, L) and neg_stat (N, k), float32."""
    _check(pos, neg_stat)
    pos, neg_stat = pos.contiguous(), neg_stat.contiguous()
    n, k, l = pos.shape
    row_obj = torch.empty((n,), dtype=torch.float32, device=pos.device)
    with device_guard(pos):
        _mixture_fwd_kernel[(n,)](pos, neg_stat, row_obj, k, l, float(tau), float(alpha),
                                  **_blocks(pos))
    return row_obj.sum() / -(n * l)


def mixture_bwd_triton(grad_loss: torch.Tensor, pos: torch.Tensor, neg_stat: torch.Tensor,
                       tau: float, alpha: float, detach_q: bool):
    """(grad_pos (N, k, L), grad_neg_stat (N, k)) of mixture_fwd_triton's loss, float32."""
    _check(pos, neg_stat)
    pos, neg_stat = pos.contiguous(), neg_stat.contiguous()
    n, k, l = pos.shape
    grad_pos = torch.empty_like(pos)
    grad_neg_stat = torch.empty_like(neg_stat)
    with device_guard(pos):
        _mixture_bwd_kernel[(n,)](
            grad_loss.to(torch.float32).reshape(1), pos, neg_stat, grad_pos, grad_neg_stat,
            k, l, float(tau), float(tau * (1.0 - alpha * tau)), 1.0 / (n * l),
            DETACH_Q=detach_q, **_blocks(pos))
    return grad_pos, grad_neg_stat
