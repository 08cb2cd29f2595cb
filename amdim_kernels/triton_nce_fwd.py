"""Triton forward of amdim_kernels::nce_fwd (docs/design.md): the three statistics of the score
matrix a = src @ trg_flat^T / sqrt(D) without ever storing it.

Two kernels:
- `_nce_fwd_split_kernel`, grid (row blocks, column splits): each program walks its share of the
  M = B*L columns in BLOCK_M tiles, forms each BLOCK_N x BLOCK_M tile of `a` with tl.dot over D in
  BLOCK_D chunks, or in one dot with the row block kept loaded when D <= BLOCK_D (fp32
  accumulation either way), scatters the positives into `pos`, and keeps per-row partial
  statistics of its negatives (logsumexp as (max, sum of exp) or a sum of softplus) and of a^2;
- `_nce_fwd_merge_kernel`, grid (row blocks): merges the per-split partials of each row; not
  launched when there is one split (then the split kernel writes the final statistics).
Splitting the columns matters because N is often a few hundred rows while M is tens of thousands:
row blocks alone would leave most SMs idle.

The kernels also run under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors), which the
tests use; see `INTERPRET` for what differs there.
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._triton_common import (INTERPRET, _clip, _negatives_final, _negatives_update,
                             _positive_sample, _resident_block, _score_tile, check_device,
                             device_guard, input_precision, sm_count)

# Opt-in variants, read once at import; both UNMEASURED on a GPU (benchmarks/NOTES.md), so not
# the default. AMDIM_KERNELS_FWD_TANH=rational: the clip's tanh as a rational function (one
# special-function op instead of two per score). AMDIM_KERNELS_FWD_CONFIGS=wide: also autotune
# over 256-column tiles (wgmma's widest N), 16-bit inputs only.
TANH_ENV, CONFIGS_ENV = "AMDIM_KERNELS_FWD_TANH", "AMDIM_KERNELS_FWD_CONFIGS"
_TANH_CHOICE = os.environ.get(TANH_ENV) or "exp"
_CONFIGS_CHOICE = os.environ.get(CONFIGS_ENV) or "default"

# GPU tile configs, autotuned per (N, M, D, dtype, reduction, precision). The epilogue (clip,
# masks, exp, the positive scatter) is register-hungry: 64-row or 64-column tiles keep 32 scores
# per thread and do not spill; 128 x 128 and 256 x 128 tiles spill a few hundred bytes (ptxas,
# sm_90) but feed the tensor cores better and measured fastest on an H100 in bf16
# (benchmarks/results/profile_h100.txt: S1 0.190 ms vs 0.230 ms, S2 6.75 ms vs 8.99 ms).
# All fit shared memory (checked by the sm_90 compile test in tests/test_triton_nce_fwd.py).
_LARGE_TILES = 128 * 128
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_D": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    # D <= 128 in one chunk: the row block stays loaded and only trg tiles stream (ONE_CHUNK).
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_D": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 128, "BLOCK_D": 128}, num_warps=8, num_stages=2),
    # large tiles, 16-bit inputs only (see prune_configs)
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_D": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 256, "BLOCK_M": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
]
# AMDIM_KERNELS_FWD_CONFIGS=wide: 256-column tiles, one wgmma instruction per warpgroup and
# k-step (m64n256k16) instead of two, at the price of registers for the epilogue.
_WIDE_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
]


def prune_configs(configs, named_args, **kwargs):
    """fp32 inputs keep the small tiles: their dots (ieee on FMA units, tf32x3 as three MMAs) need
    far more registers, and exact fp32 drops BLOCK_D > 64, whose FMA-unit dot unrolls a 128-deep
    chunk into ~13 KB of register spills per thread (ptxas, sm_90)."""
    if named_args["src_ptr"].dtype != torch.float32:
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] < _LARGE_TILES]
    if kwargs["INPUT_PRECISION"] == "ieee":
        return [c for c in small if c.kwargs["BLOCK_D"] <= 64]
    return small


# The interpreter rejects autotuning over 2+ configs; small tiles keep it fast on small shapes.
_INTERPRET_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
CONFIGS = (_INTERPRET_CONFIGS if INTERPRET
           else _GPU_CONFIGS + _WIDE_CONFIGS if _CONFIGS_CHOICE == "wide" else _GPU_CONFIGS)

# Column splits are chosen to give about this many programs per SM: 2-4 waves, as the 8-warp
# configs use ~255 registers per thread (1 resident program per SM) and the 4-warp one 2, so
# that the tail of the last wave is short.
_PROGRAMS_PER_SM = 4
# Stand-in SM count for the interpreter, small so that the tests exercise several splits.
_INTERPRET_SMS = 4

# exp(s - tclip) stays a normal fp32 number for s >= -tclip as long as 2 * tclip < 87, so for
# clipped scores the logsumexp can use the fixed shift tclip instead of a running row max.
_MAX_FIXED_SHIFT_TCLIP = 40.0


@triton.autotune(configs=CONFIGS, key=["N", "M", "D", "NEG_LSE", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.heuristics({"ONE_CHUNK": lambda args: args["D"] <= args["BLOCK_D"]})
@triton.jit
def _nce_fwd_split_kernel(
    src_ptr, trg_ptr, pos_idx_ptr,            # (N, D), (M, D) row-major; (N,) int64
    pos_ptr,                                  # (N, L) fp32 out
    part_max_ptr, part_acc_ptr, part_sq_ptr,  # (N, S) fp32 out: per-split row partials
    neg_stat_ptr, row_sq_ptr,                 # (N,) fp32 out when FINALIZE
    N, M, D, L, cols_per_split, num_splits,
    scale, tclip, inv_tclip,
    CLIP: tl.constexpr,              # soft-clip the scores (tclip is not None)
    NEG_LSE: tl.constexpr,           # "logsumexp" (else "softplus_sum")
    FIXED_SHIFT: tl.constexpr,       # logsumexp shifted by tclip instead of a running max
    INPUT_PRECISION: tl.constexpr,   # "ieee" or "tf32x3" (only matters for fp32 inputs)
    UPCAST: tl.constexpr,            # interpreter: its bf16 tl.dot is wrong, so dot in fp32
    FINALIZE: tl.constexpr,          # one split: write neg_stat and the row sums, no partials
    TANH_RATIONAL: tl.constexpr,     # the clip's tanh as _tanh_rational (opt-in)
    ONE_CHUNK: tl.constexpr,         # D <= BLOCK_D (set by the heuristic from the config)
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # -1 on padded rows (and out-of-range pos_idx): never equal to a sample, so no positives.
    pidx = _positive_sample(pos_idx_ptr, rows, row_ok, M // L)
    # Range of positive samples in this row block: tiles outside it skip the positive scatter.
    p_lo = tl.min(tl.where(pidx >= 0, pidx, M))
    p_hi = tl.max(pidx)
    src_rows = src_ptr + rows.to(tl.int64)[:, None] * D
    if ONE_CHUNK:
        # Load the row block once: the column loop then holds a single dot, and the software
        # pipeline prefetches the next trg tile across column tiles instead of restarting per tile.
        x_all = _resident_block(src_rows, row_ok, D, UPCAST, BLOCK_D)
    else:
        x_all = None   # _score_tile loads the row block chunk by chunk

    m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    acc_i = tl.zeros((BLOCK_N,), tl.float32)
    sq_i = tl.zeros((BLOCK_N,), tl.float32)
    col_begin = pid_s * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, M)
    for start in range(col_begin, col_end, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < col_end
        trg_cols = trg_ptr + cols.to(tl.int64)[None, :] * D
        a = _score_tile(x_all, src_rows, row_ok, trg_cols, col_ok, D, INPUT_PRECISION, UPCAST,
                        ONE_CHUNK, BLOCK_N, BLOCK_M, BLOCK_D)
        a = a * scale
        # Padded rows and columns were loaded as zeros, so their a is exactly 0 here (NaN where an
        # Inf meets a padded zero: the sum of a^2 is non-finite then anyway, as it must be).
        sq_i += tl.sum(a * a, axis=1)
        s = _clip(a, tclip, inv_tclip, CLIP, TANH_RATIONAL)
        sample = cols // L
        is_pos = sample[None, :] == pidx[:, None]
        b_lo = start // L
        b_hi = (tl.minimum(start + BLOCK_M, col_end) - 1) // L
        if (b_lo <= p_hi) & (b_hi >= p_lo):
            # pos[i, l] of column m = pidx[i] * L + l lives at (i - pidx[i]) * L + m: a per-row base
            # plus the column, which keeps the address math 1-D (a 2-D index tile cost ~100
            # registers and spilled).
            row_base = (rows - pidx) * L + start
            tl.store(pos_ptr + row_base[:, None] + tl.arange(0, BLOCK_M)[None, :], s,
                     mask=is_pos & col_ok[None, :])
        neg = (~is_pos) & col_ok[None, :]
        m_i, acc_i = _negatives_update(s, neg, m_i, acc_i, tclip, NEG_LSE, FIXED_SHIFT)

    if FINALIZE:
        # The merge of a single split: acc * exp(m - m) (m finite) or 0 (no negatives seen).
        tl.store(row_sq_ptr + rows, sq_i, mask=row_ok)
        tl.store(neg_stat_ptr + rows, _negatives_final(m_i, acc_i, tclip, NEG_LSE, FIXED_SHIFT),
                 mask=row_ok)
    else:
        if NEG_LSE:
            if FIXED_SHIFT:
                m_i = tl.zeros((BLOCK_N,), tl.float32) + tclip
        out = rows * num_splits + pid_s
        tl.store(part_acc_ptr + out, acc_i, mask=row_ok)
        tl.store(part_sq_ptr + out, sq_i, mask=row_ok)
        if NEG_LSE:
            tl.store(part_max_ptr + out, m_i, mask=row_ok)


@triton.jit
def _nce_fwd_merge_kernel(
    part_max_ptr, part_acc_ptr, part_sq_ptr,  # (N, S) fp32
    neg_stat_ptr, row_sq_ptr,                 # (N,) fp32 out
    N, S,
    NEG_LSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    splits = tl.arange(0, BLOCK_S)
    mask = row_ok[:, None] & (splits < S)[None, :]
    offs = rows[:, None] * S + splits[None, :]
    acc = tl.load(part_acc_ptr + offs, mask=mask, other=0.0)
    tl.store(row_sq_ptr + rows, tl.sum(tl.load(part_sq_ptr + offs, mask=mask, other=0.0), axis=1),
             mask=row_ok)
    if NEG_LSE:
        mx = tl.load(part_max_ptr + offs, mask=mask, other=float("-inf"))
        m = tl.max(mx, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.sum(acc * tl.exp(mx - m_safe[:, None]), axis=1)
        # total == 0 (no negatives, B == 1) gives log(0) = -inf, the defined result.
        tl.store(neg_stat_ptr + rows, m_safe + tl.log(total), mask=row_ok)
    else:
        tl.store(neg_stat_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)


def split_columns(n: int, m: int, device: torch.device) -> tuple[int, int]:
    """(number of column splits, columns per split) for an N x M score matrix.

    Aims at _PROGRAMS_PER_SM programs per SM counting row blocks of the largest BLOCK_N, with
    every split a whole number of the narrowest tiles and no split empty. Splits as narrow as
    one 64-column tile double the programs of small problems (N = 128, M = 3200: 50 splits
    instead of 25); 128-wide configs then compute half-masked tiles, and the autotuner weighs that.
    """
    block_n = max(c.kwargs["BLOCK_N"] for c in CONFIGS)
    granule = min(c.kwargs["BLOCK_M"] for c in CONFIGS)
    sms = _INTERPRET_SMS if INTERPRET else sm_count(device.index or 0)
    wanted = triton.cdiv(_PROGRAMS_PER_SM * sms, triton.cdiv(n, block_n))
    splits = max(1, min(wanted, triton.cdiv(m, granule)))
    cols = triton.cdiv(triton.cdiv(m, splits), granule) * granule
    return triton.cdiv(m, cols), cols


@functools.lru_cache(maxsize=1024)
def _plan(n: int, m: int, device: torch.device) -> tuple[int, int, int, int]:
    """(splits, columns per split, merge BLOCK_S, merge BLOCK_R) of an N x M problem, computed
    once per shape: a training loop calls with the same few shapes, and the wrapper's Python
    work is on the critical path of small problems (benchmarks/NOTES.md)."""
    if _TANH_CHOICE not in ("exp", "rational"):
        raise ValueError(f"{TANH_ENV} must be 'exp' or 'rational', got {_TANH_CHOICE!r}")
    if _CONFIGS_CHOICE not in ("default", "wide"):
        raise ValueError(f"{CONFIGS_ENV} must be 'default' or 'wide', got {_CONFIGS_CHOICE!r}")
    splits, cols_per_split = split_columns(n, m, device)
    block_s = max(16, triton.next_power_of_2(splits))
    return splits, cols_per_split, block_s, max(1, 2048 // block_s)


def check_fwd_inputs(src, trg, pos_idx, neg_reduction, what: str) -> None:
    """What the CUDA forwards take (the op validated everything else)."""
    if src.dtype not in (torch.float16, torch.bfloat16, torch.float32) or trg.dtype != src.dtype:
        raise TypeError(f"{what} takes float16, bfloat16 or float32 src and trg of one dtype, got "
                        f"src {src.dtype} and trg {trg.dtype}")
    if neg_reduction not in ("logsumexp", "softplus_sum"):
        raise ValueError(f"neg_reduction must be 'logsumexp' or 'softplus_sum', got {neg_reduction!r}")
    if not (src.is_contiguous() and trg.is_contiguous() and pos_idx.is_contiguous()):
        raise ValueError(f"{what} needs contiguous src, trg and pos_idx")
    if pos_idx.dtype != torch.int64:
        raise TypeError(f"pos_idx must be int64, got {pos_idx.dtype}")


class SplitStatistics(NamedTuple):
    """What the split kernel leaves: pos (N, L); with one split the final neg_stat and row sums
    of a^2 (N,), else per-split partials (N, S) that a merge (the merge kernel, or the fused
    loss's finish kernel) reduces."""
    pos: torch.Tensor
    neg_stat: torch.Tensor
    row_sq: torch.Tensor
    part_max: torch.Tensor
    part_acc: torch.Tensor
    part_sq: torch.Tensor
    splits: int
    block_s: int
    block_r: int


def split_statistics(src: torch.Tensor, trg: torch.Tensor, pos_idx: torch.Tensor,
                     tclip: float | None, neg_reduction: str) -> SplitStatistics:
    """Launch the split kernel (one launch); neg_stat and row_sq are final only with one split."""
    check_fwd_inputs(src, trg, pos_idx, neg_reduction, "the Triton nce_fwd")
    check_device(src, "the Triton nce_fwd")
    n, d = src.shape
    b, l, _ = trg.shape
    m = b * l
    dev = src.device
    neg_lse = neg_reduction == "logsumexp"
    splits, cols_per_split, block_s, block_r = _plan(n, m, dev)

    f32 = torch.float32
    pos = torch.empty((n, l), dtype=f32, device=dev)
    neg_stat = torch.empty((n,), dtype=f32, device=dev)
    row_sq = torch.empty((n,), dtype=f32, device=dev)
    if splits == 1:
        part_max = part_acc = part_sq = row_sq   # unused: the split kernel finalizes
    else:
        part_acc = torch.empty((n, splits), dtype=f32, device=dev)
        part_sq = torch.empty_like(part_acc)
        part_max = torch.empty_like(part_acc) if neg_lse else part_acc  # unread without NEG_LSE

    with device_guard(src):
        _nce_fwd_split_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)](
            src, trg, pos_idx, pos, part_max, part_acc, part_sq, neg_stat, row_sq,
            n, m, d, l, cols_per_split, splits,
            1.0 / math.sqrt(d), 1.0 if tclip is None else float(tclip),
            1.0 if tclip is None else 1.0 / tclip,
            CLIP=tclip is not None, NEG_LSE=neg_lse,
            FIXED_SHIFT=neg_lse and tclip is not None and tclip <= _MAX_FIXED_SHIFT_TCLIP,
            INPUT_PRECISION=input_precision(src.dtype), UPCAST=INTERPRET,
            FINALIZE=splits == 1, TANH_RATIONAL=_TANH_CHOICE == "rational",
        )
    return SplitStatistics(pos, neg_stat, row_sq, part_max, part_acc, part_sq, splits, block_s,
                           block_r)


def nce_fwd_triton(src: torch.Tensor, trg: torch.Tensor, pos_idx: torch.Tensor,
                   tclip: float | None, neg_reduction: str):
    """(pos (N, L), neg_stat (N,), sumsq 0-dim), float32, exactly as docs/design.md's
    amdim_kernels::nce_fwd. A pos_idx outside
    [0, B) gives its row no positives (its entries of `pos` stay unwritten). float64 is not
    supported here.
    """
    st = split_statistics(src, trg, pos_idx, tclip, neg_reduction)
    if st.splits > 1:
        n = src.shape[0]
        with device_guard(src):
            _nce_fwd_merge_kernel[(triton.cdiv(n, st.block_r),)](
                st.part_max, st.part_acc, st.part_sq, st.neg_stat, st.row_sq, n, st.splits,
                NEG_LSE=neg_reduction == "logsumexp", BLOCK_R=st.block_r, BLOCK_S=st.block_s,
            )
    return st.pos, st.neg_stat, st.row_sq.sum()
