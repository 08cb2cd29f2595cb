"""The fused loss on CUDA in few launches: the CUDA kernels of amdim_kernels::nce_loss and
nce_loss_bwd (amdim_kernels/nce_loss_op.py, docs/design.md).

At AMDIM's per-GPU sizes the loss is bound by the host: the composition of nce_fwd with the torch
epilogue (softplus, means, lgt_reg, the finiteness and pos_idx flags, NaN poisoning) issues some
twenty launches. Here:
- forward: the forward variant's statistics (tiled: the split kernel; dense: cuBLAS scores and
  the dense kernel), then `_nce_loss_finish_kernel`, one program that merges the split partials
  (writing neg_stat), sums a^2, forms the estimator's loss and lgt_reg, and poisons both with NaN
  when a score is not finite or a pos_idx lies outside [0, B). Finiteness is _validate.score_flag's
  test: a NaN sum of a^2, or an infinite one where the scores can overflow (sqrt(D) max|src|
  max|trg| >= FLT_MAX); only then, never in a valid call, does the program read src and trg;
- backward: `_nce_loss_bwd_kernel`, one program for the gradients of the epilogue (grad_pos,
  grad_neg_stat, grad_sumsq; zero where the forward poisoned), then the backward variant.
One program suffices: the epilogue's work is O(N * (L + S)), a few MB at the largest shapes.

Estimators (docs/losses.md, sections 1 and 4), with P = pos, Z = neg_stat, n_neg = N*(B-1)*L:
    nce: mean softplus(Z_i - P_il);  jsd: mean softplus(-P) + sum Z / max(n_neg, 1);
    dv: -(mean P - (logsumexp_i Z_i - log n_neg)).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_common import _sigmoid, _softplus, check_device, device_guard
from ._validate import NEG_REDUCTION, autocast_disabled

ESTIMATOR_CODES = {"nce": 0, "jsd": 1, "dv": 2}
_WARPS = 8


@triton.jit
def _max_abs(x_ptr, NUMEL, BLOCK: tl.constexpr):
    """max |x| over NUMEL elements, NaN if any is NaN (as _validate._max_abs)."""
    mx = tl.zeros((BLOCK,), tl.float32)
    nan = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, NUMEL, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(x_ptr + offs, mask=offs < NUMEL, other=0.0).to(tl.float32)
        mx = tl.maximum(mx, tl.abs(x))
        nan |= (x != x).to(tl.int32)
    return tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.max(mx, axis=0))


@triton.jit
def _nce_loss_finish_kernel(
    part_max_ptr, part_acc_ptr, part_sq_ptr,   # (N, S) fp32 split partials (MERGE)
    neg_stat_ptr, row_sq_ptr,                  # (N,) fp32: written (MERGE) or read
    pos_ptr, pos_idx_ptr,                      # (N, L) fp32; (N,) int64 (CHECK_RANGE)
    src_ptr, trg_ptr,                          # the inputs, read only for an infinite sum of a^2
    loss_ptr, reg_ptr, bad_ptr,                # 0-dim fp32, fp32, bool out
    N, S, L, B, inv_nl, inv_nbl, inv_nneg, log_nneg, reg_weight, SRC_NUMEL, TRG_NUMEL, sqrt_d,
    MERGE: tl.constexpr, NEG_LSE: tl.constexpr, ESTIMATOR: tl.constexpr,
    CHECK_RANGE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    sq_acc = tl.zeros((BLOCK_R,), tl.float32)
    term_acc = tl.zeros((BLOCK_R,), tl.float32)    # nce: softplus terms; jsd, dv: P terms
    neg_acc = tl.zeros((BLOCK_R,), tl.float32)     # jsd: sum of Z
    z_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)   # dv: running logsumexp of Z
    z_sum = tl.zeros((BLOCK_R,), tl.float32)
    out_of_range = tl.zeros((BLOCK_R,), tl.int32)
    for r0 in range(0, N, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        if MERGE:   # as _nce_fwd_merge_kernel
            splits = tl.arange(0, BLOCK_S)
            mask = row_ok[:, None] & (splits < S)[None, :]
            offs = rows64[:, None] * S + splits[None, :]
            acc = tl.load(part_acc_ptr + offs, mask=mask, other=0.0)
            sq = tl.sum(tl.load(part_sq_ptr + offs, mask=mask, other=0.0), axis=1)
            if NEG_LSE:
                mx = tl.load(part_max_ptr + offs, mask=mask, other=float("-inf"))
                m = tl.max(mx, axis=1)
                m_safe = tl.where(m == float("-inf"), 0.0, m)
                z = m_safe + tl.log(tl.sum(acc * tl.exp(mx - m_safe[:, None]), axis=1))
            else:
                z = tl.sum(acc, axis=1)
            tl.store(neg_stat_ptr + rows, z, mask=row_ok)
        else:
            z = tl.load(neg_stat_ptr + rows, mask=row_ok, other=0.0)
            sq = tl.load(row_sq_ptr + rows, mask=row_ok, other=0.0)
        sq_acc += tl.where(row_ok, sq, 0.0)
        if CHECK_RANGE:
            p_idx = tl.load(pos_idx_ptr + rows, mask=row_ok, other=0)
            out_of_range |= (row_ok & ((p_idx < 0) | (p_idx >= B))).to(tl.int32)
        if ESTIMATOR == 1:
            neg_acc += tl.where(row_ok, z, 0.0)
        if ESTIMATOR == 2:
            z_new = tl.maximum(z_max, tl.where(row_ok, z, float("-inf")))
            z_safe = tl.where(z_new == float("-inf"), 0.0, z_new)
            z_sum = z_sum * tl.exp(z_max - z_safe) + tl.where(row_ok, tl.exp(z - z_safe), 0.0)
            z_max = z_new
        for l0 in range(0, L, BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)
            ok = row_ok[:, None] & (ls < L)[None, :]
            p = tl.load(pos_ptr + rows64[:, None] * L + ls[None, :], mask=ok, other=0.0)
            if ESTIMATOR == 0:
                t = _softplus(z[:, None] - p)   # 0 when Z = -inf (B == 1: no negatives)
            elif ESTIMATOR == 1:
                t = _softplus(-p)
            else:
                t = p
            term_acc += tl.sum(tl.where(ok, t, 0.0), axis=1)

    sumsq = tl.sum(sq_acc, axis=0)
    mean_terms = tl.sum(term_acc, axis=0) * inv_nl
    if ESTIMATOR == 0:
        loss = mean_terms
    elif ESTIMATOR == 1:
        loss = mean_terms + tl.sum(neg_acc, axis=0) * inv_nneg
    else:
        zm = tl.max(z_max, axis=0)
        lse = zm + tl.log(tl.sum(z_sum * tl.exp(z_max - zm), axis=0))
        loss = -(mean_terms - (lse - log_nneg))
    mean_sq = sumsq * inv_nbl
    if reg_weight == 0.0:   # 0 even where finite scores' squares overflow (0 * Inf is NaN)
        reg = tl.minimum(mean_sq, 3.4028234663852886e38) * 0.0
    else:
        reg = mean_sq * reg_weight
    # as _validate.score_flag: an infinite sum of squares is bad only where a score can be
    # infinite; finite scores whose squares overflow are valid (lgt_reg is then Inf)
    can_overflow = sumsq != sumsq
    if sumsq == float("inf"):
        bound = sqrt_d * _max_abs(src_ptr, SRC_NUMEL, BLOCK_R * BLOCK_L) \
            * _max_abs(trg_ptr, TRG_NUMEL, BLOCK_R * BLOCK_L)
        can_overflow = ~(bound < 3.4028234663852886e38)   # NaN (a NaN input) too
    bad = ((sumsq != sumsq) | ((sumsq == float("inf")) & can_overflow)
           | (tl.max(out_of_range, axis=0) > 0))
    tl.store(loss_ptr, tl.where(bad, float("nan"), loss))
    tl.store(reg_ptr, tl.where(bad, float("nan"), reg))
    tl.store(bad_ptr, bad)


@triton.jit
def _nce_loss_bwd_kernel(
    grad_loss_ptr, grad_reg_ptr, bad_ptr,     # 0-dim fp32, fp32, bool
    pos_ptr, neg_stat_ptr,                    # (N, L), (N,) fp32
    grad_pos_ptr, grad_neg_ptr, grad_sq_ptr,  # (N, L), (N,), (1,) fp32 out
    N, L, inv_nl, inv_nneg, reg_scale,
    ESTIMATOR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # where the forward poisoned its outputs, they are constants: no gradient (as torch.where's)
    bad = tl.load(bad_ptr)
    g_loss = tl.where(bad, 0.0, tl.load(grad_loss_ptr))
    g_reg = tl.where(bad, 0.0, tl.load(grad_reg_ptr))
    tl.store(grad_sq_ptr, g_reg * reg_scale)
    if ESTIMATOR == 2:   # softmax over rows of Z: its logsumexp first
        z_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        z_sum = tl.zeros((BLOCK_R,), tl.float32)
        for r0 in range(0, N, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            z = tl.load(neg_stat_ptr + rows, mask=rows < N, other=float("-inf"))
            z_new = tl.maximum(z_max, z)
            z_safe = tl.where(z_new == float("-inf"), 0.0, z_new)
            z_sum = z_sum * tl.exp(z_max - z_safe) + tl.exp(z - z_safe)
            z_max = z_new
        zm = tl.max(z_max, axis=0)
        lse = zm + tl.log(tl.sum(z_sum * tl.exp(z_max - zm), axis=0))
    for r0 in range(0, N, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        z = tl.load(neg_stat_ptr + rows, mask=row_ok, other=0.0)
        w_acc = tl.zeros((BLOCK_R,), tl.float32)
        for l0 in range(0, L, BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)
            ok = row_ok[:, None] & (ls < L)[None, :]
            offs = rows64[:, None] * L + ls[None, :]
            p = tl.load(pos_ptr + offs, mask=ok, other=0.0)
            if ESTIMATOR == 0:   # d softplus(Z - P) = sigmoid(Z - P) (dZ - dP)
                w = tl.where(ok & ~bad, _sigmoid(z[:, None] - p) * (g_loss * inv_nl), 0.0)
                w_acc += tl.sum(w, axis=1)
                gp = -w
            elif ESTIMATOR == 1:
                gp = -_sigmoid(-p) * (g_loss * inv_nl)
            else:
                gp = tl.zeros((BLOCK_R, BLOCK_L), tl.float32) - g_loss * inv_nl
            # a poisoned call's unmatched rows hold unwritten positives (0 * NaN is NaN)
            tl.store(grad_pos_ptr + offs, tl.where(bad, 0.0, gp), mask=ok)
        if ESTIMATOR == 0:
            gz = w_acc
        elif ESTIMATOR == 1:
            gz = tl.zeros((BLOCK_R,), tl.float32) + g_loss * inv_nneg
        else:
            gz = g_loss * tl.exp(z - lse)
        tl.store(grad_neg_ptr + rows, tl.where(bad, 0.0, gz), mask=row_ok)


def _blocks(l: int, s: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_S, BLOCK_L): positives in chunks of up to 64, ~2K elements a step (8 per
    thread: no spills on sm_90)."""
    block_l = min(64, triton.next_power_of_2(l))
    block_s = max(2, triton.next_power_of_2(s))
    return max(2, 2048 // max(block_l, block_s)), block_s, block_l


def _counts(n: int, b: int, l: int) -> dict:
    n_neg = n * (b - 1) * l
    return dict(inv_nl=1.0 / (n * l), inv_nneg=1.0 / max(n_neg, 1),
                log_nneg=math.log(n_neg) if n_neg else 0.0)


def nce_loss_cuda(src: torch.Tensor, trg: torch.Tensor, pos_idx: torch.Tensor,
                  tclip: float | None, reg_weight: float, estimator: str, check_range: bool):
    """amdim_kernels::nce_loss on CUDA (or on CPU tensors under the interpreter):
    (loss, lgt_reg, pos, neg_stat, bad) with the forward variant chosen for the problem."""
    from . import ops
    from .triton_nce_dense import dense_statistics
    from .triton_nce_fwd import split_statistics

    check_device(src, "the Triton nce_loss")
    n, d = src.shape
    b, l, _ = trg.shape
    neg_reduction = NEG_REDUCTION[estimator]
    fwd, _ = ops.SELECTION.choose(*ops._problem(src, trg))
    with autocast_disabled(src.device), device_guard(src):
        if fwd == "dense":
            pos, neg_stat, row_sq = dense_statistics(src, trg, pos_idx, tclip, neg_reduction)
            parts, splits = (row_sq, row_sq, row_sq), 1   # unread
        else:
            st = split_statistics(src, trg, pos_idx, tclip, neg_reduction)
            pos, neg_stat, row_sq, splits = st.pos, st.neg_stat, st.row_sq, st.splits
            parts = (st.part_max, st.part_acc, st.part_sq)
        f32 = torch.float32
        loss = torch.empty((), dtype=f32, device=src.device)
        lgt_reg = torch.empty((), dtype=f32, device=src.device)
        bad = torch.empty((), dtype=torch.bool, device=src.device)
        block_r, block_s, block_l = _blocks(l, splits)
        _nce_loss_finish_kernel[(1,)](
            *parts, neg_stat, row_sq, pos, pos_idx, src, trg, loss, lgt_reg, bad,
            n, splits, l, b, inv_nbl=1.0 / (n * b * l), reg_weight=float(reg_weight),
            SRC_NUMEL=src.numel(), TRG_NUMEL=trg.numel(), sqrt_d=math.sqrt(d),
            **_counts(n, b, l), MERGE=splits > 1, NEG_LSE=neg_reduction == "logsumexp",
            ESTIMATOR=ESTIMATOR_CODES[estimator], CHECK_RANGE=check_range,
            BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_L=block_l, num_warps=_WARPS)
    return loss, lgt_reg, pos, neg_stat, bad


def nce_loss_bwd_cuda(grad_loss: torch.Tensor, grad_reg: torch.Tensor, src: torch.Tensor,
                      trg: torch.Tensor, pos_idx: torch.Tensor, pos: torch.Tensor,
                      neg_stat: torch.Tensor, bad: torch.Tensor, tclip: float | None,
                      reg_weight: float, estimator: str):
    """amdim_kernels::nce_loss_bwd on CUDA: (grad_src, grad_trg) by the backward variant."""
    from . import ops

    check_device(src, "the Triton nce_loss_bwd")
    n = src.shape[0]
    b, l, _ = trg.shape
    f32 = torch.float32
    grad_pos = torch.empty((n, l), dtype=f32, device=src.device)
    grad_neg = torch.empty((n,), dtype=f32, device=src.device)
    grad_sq = torch.empty((1,), dtype=f32, device=src.device)
    block_r, _, block_l = _blocks(l, 1)
    counts = _counts(n, b, l)
    with autocast_disabled(src.device), device_guard(src):
        _nce_loss_bwd_kernel[(1,)](
            grad_loss, grad_reg, bad, pos, neg_stat, grad_pos, grad_neg, grad_sq, n, l,
            counts["inv_nl"], counts["inv_nneg"], float(reg_weight) / (n * b * l),
            ESTIMATOR=ESTIMATOR_CODES[estimator], BLOCK_R=block_r, BLOCK_L=block_l,
            num_warps=_WARPS)
        return ops._nce_bwd_cuda(grad_pos, grad_neg, grad_sq, src, trg, pos_idx, neg_stat, tclip,
                                 NEG_REDUCTION[estimator])
