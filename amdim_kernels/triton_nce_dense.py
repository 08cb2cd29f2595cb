"""Dense forward of amdim_kernels::nce_fwd (docs/design.md) for small problems: cuBLAS writes the
N x M raw dot products in fp32 (fp32 accumulation), and one Triton kernel reduces them to the three
statistics. It holds the N x M fp32 matrix (4 bytes per score), so it is chosen only where that is
cheap (auto_table.py); in exchange it is two launches of the fastest product there is, where the
tiled forward's score tiles feed the tensor cores less well at small N.

`_nce_dense_kernel`, grid (row blocks): each program walks its rows' M columns in BLOCK_C chunks
with the same clip, positive scatter and negatives' reduction as the tiled forward (the shared
helpers of _triton_common.py).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_common import (_clip, _negatives_final, _negatives_update, _positive_sample,
                             check_device, device_guard, product_into)
from .triton_nce_fwd import _MAX_FIXED_SHIFT_TCLIP, _TANH_CHOICE, check_fwd_inputs

BLOCK_R, BLOCK_C = 4, 256   # rows per program, columns per step: 1024 scores, 4 warps


@triton.jit
def _nce_dense_kernel(
    dots_ptr, pos_idx_ptr,                    # (N, M) fp32 unscaled dots; (N,) int64
    pos_ptr, neg_stat_ptr, row_sq_ptr,        # (N, L), (N,), (N,) fp32 out
    N, M, L, scale, tclip, inv_tclip,
    CLIP: tl.constexpr, NEG_LSE: tl.constexpr, FIXED_SHIFT: tl.constexpr,
    TANH_RATIONAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    pidx = _positive_sample(pos_idx_ptr, rows, row_ok, M // L)
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    acc_i = tl.zeros((BLOCK_R,), tl.float32)
    sq_i = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, M, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < M)[None, :]
        a = tl.load(dots_ptr + rows64[:, None] * M + cols[None, :], mask=ok, other=0.0) * scale
        sq_i += tl.sum(a * a, axis=1)
        s = _clip(a, tclip, inv_tclip, CLIP, TANH_RATIONAL)
        is_pos = (cols // L)[None, :] == pidx[:, None]
        # pos[i, l] of column m = pidx[i] * L + l lives at (i - pidx[i]) * L + m
        tl.store(pos_ptr + ((rows64 - pidx) * L)[:, None] + cols[None, :], s, mask=is_pos & ok)
        m_i, acc_i = _negatives_update(s, (~is_pos) & ok, m_i, acc_i, tclip, NEG_LSE, FIXED_SHIFT)
    tl.store(row_sq_ptr + rows, sq_i, mask=row_ok)
    tl.store(neg_stat_ptr + rows, _negatives_final(m_i, acc_i, tclip, NEG_LSE, FIXED_SHIFT),
             mask=row_ok)


def dense_statistics(src: torch.Tensor, trg: torch.Tensor, pos_idx: torch.Tensor,
                     tclip: float | None, neg_reduction: str):
    """(pos (N, L), neg_stat (N,), row sums of a^2 (N,)), float32, from the dense scores."""
    check_fwd_inputs(src, trg, pos_idx, neg_reduction, "the dense nce_fwd")
    check_device(src, "the dense nce_fwd")
    n, d = src.shape
    b, l, _ = trg.shape
    m = b * l
    f32, dev = torch.float32, src.device
    dots = torch.empty((n, m), dtype=f32, device=dev)
    product_into(dots, src, trg.view(m, d).t())
    pos = torch.empty((n, l), dtype=f32, device=dev)
    neg_stat = torch.empty((n,), dtype=f32, device=dev)
    row_sq = torch.empty((n,), dtype=f32, device=dev)
    neg_lse = neg_reduction == "logsumexp"
    with device_guard(src):
        _nce_dense_kernel[(triton.cdiv(n, BLOCK_R),)](
            dots, pos_idx, pos, neg_stat, row_sq, n, m, l, 1.0 / math.sqrt(d),
            1.0 if tclip is None else float(tclip), 1.0 if tclip is None else 1.0 / tclip,
            CLIP=tclip is not None, NEG_LSE=neg_lse,
            FIXED_SHIFT=neg_lse and tclip is not None and tclip <= _MAX_FIXED_SHIFT_TCLIP,
            TANH_RATIONAL=_TANH_CHOICE == "rational", BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
            num_warps=4)
    return pos, neg_stat, row_sq


def nce_fwd_dense(src: torch.Tensor, trg: torch.Tensor, pos_idx: torch.Tensor,
                  tclip: float | None, neg_reduction: str):
    """(pos (N, L), neg_stat (N,), sumsq 0-dim), float32, exactly as docs/design.md's
    amdim_kernels::nce_fwd, holding the N x M fp32 scores."""
    pos, neg_stat, row_sq = dense_statistics(src, trg, pos_idx, tclip, neg_reduction)
    return pos, neg_stat, row_sq.sum()
