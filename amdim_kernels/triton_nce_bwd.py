"""Triton backward of amdim_kernels::nce_bwd (docs/design.md): d src and d trg of the three
statistics without an N x M buffer, and without the CUDA toolkit.

Two kernels, each recomputing its score tiles in registers (Inf-CL style, no atomics):
- `_nce_bwd_src_kernel`, grid (row blocks, D-out chunks, column splits): for each BLOCK_M column
  tile of its split, a = src[rows] @ trg_flat[cols]^T / sqrt(D) over D in BLOCK_D chunks, the
  score gradient g formed in registers, then acc += g @ trg_flat[cols, dchunk];
- `_nce_bwd_trg_kernel`, grid (column blocks, D-out chunks): the same tiles, transposed
  (a^T = trg_flat[cols] @ src[rows]^T), for every row tile, acc += g^T @ src[rows, dchunk].
Each program owns its output block, so it is stored once, in the input dtype. The accumulator is
BLOCK x BLOCK_DO fp32 registers: for D > BLOCK_DO the grid has ceil(D / BLOCK_DO) D-out chunks and
each recomputes the score tiles (benchmarks/NOTES.md counts what that costs). Small N would leave
the row-parallel kernel with a handful of programs, so its columns are split in up to
`_MAX_SRC_SPLITS` shares whose partial d src (fp32, S x N x D, bounded by `_SPLIT_BYTES`) are summed.

g follows docs/design.md: with m = b*L + l,
    g_s = grad_pos[i, l] (b == pos_idx[i]), else grad_neg_stat[i] * (exp(s - neg_stat[i]) or
          sigmoid(s)),   g = (g_s * (1 - (s / tclip)^2) + 2 * grad_sumsq * a) / sqrt(D).
16-bit inputs feed g to the products in the input dtype, as the CUDA kernel does; fp16 g is scaled
by a power of two per row (d src) or column (d trg) first, undone on the fp32 product, because the
gradients of an N*L-term mean (~1e-7) lie in fp16's subnormals.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_common import (INTERPRET, _positive_sample, _resident_block, _score_tile, _sigmoid,
                             _tanh_dtanh, check_device, device_guard, input_precision, sm_count)

# GPU tile configs (autotuned per shape). The accumulator is the register-hungry part: 64 x 256
# fp32 over 8 warps is 64 registers per thread, beside the score tile and the operand tiles. The
# sm_90 compile test (tests/test_triton_nce_bwd.py) holds every config to a spill budget.
# UNMEASURED: none of these has run on a GPU yet (benchmarks/NOTES.md).
_SRC_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DO": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DO": 256}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DO": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 128, "BLOCK_D": 64, "BLOCK_DO": 128}, num_warps=8, num_stages=3),
]
# The d trg kernel's accumulator is BLOCK_M x BLOCK_DO; its transposed tiles need more registers
# (4 warps, or 128-wide blocks beside a 128-wide chunk, spilled 70-580 bytes per thread).
_TRG_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DO": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_DO": 256}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 32, "BLOCK_DO": 256}, num_warps=8, num_stages=3),
]
# fp32 inputs: the ieee dot runs on the FMA units and tf32x3 is three MMAs, both far hungrier for
# registers than a 16-bit MMA (64 x 64 x 64 tiles spilled 1.8-4.7 KB per thread): small tiles.
_FP32_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_M": 64, "BLOCK_D": 32, "BLOCK_DO": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 32, "BLOCK_D": 32, "BLOCK_DO": 64}, num_warps=4, num_stages=2),
]
# The interpreter rejects autotuning over 2+ configs; small tiles keep it fast on small shapes
# (BLOCK_DO 16 < D in the tests: several D-out chunks).
_INTERPRET_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 16, "BLOCK_DO": 16},
                                  num_warps=4, num_stages=1)
SRC_CONFIGS = [_INTERPRET_CONFIG] if INTERPRET else _SRC_CONFIGS + _FP32_CONFIGS
TRG_CONFIGS = [_INTERPRET_CONFIG] if INTERPRET else _TRG_CONFIGS + _FP32_CONFIGS

# d src column splits: about this many programs per SM, each split at least one column tile,
# and the fp32 partials at most _SPLIT_BYTES.
_PROGRAMS_PER_SM = 2
_MAX_SRC_SPLITS = 64
_SPLIT_BYTES = 32 << 20
_INTERPRET_SMS = 4   # stand-in SM count for the interpreter: small shapes still get several splits
_SUM_BLOCK = 1024    # elements per program of the sum of the d src partials


def prune_configs(configs, named_args, **kwargs):
    """fp32 inputs take the fp32 configs, 16-bit ones the others; then D-out chunks wider than D
    needs (they would only multiply zeros) go, keeping the narrowest when none fits."""
    fp32 = named_args["src_ptr"].dtype == torch.float32
    configs = [c for c in configs if (c in _FP32_CONFIGS) == fp32] or configs
    fit = [c for c in configs if c.kwargs["BLOCK_DO"] <= max(64, triton.next_power_of_2(named_args["D"]))]
    if fit:
        return fit
    narrowest = min(c.kwargs["BLOCK_DO"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_DO"] == narrowest]


def _one_chunk(args):
    return args["D"] <= args["BLOCK_D"]


@triton.jit
def _score_grad(a, cols, pidx, gneg, nstat, gp_base, valid, gp_ptr, gsq2, scale, tclip, inv_tclip,
                L, CLIP: tl.constexpr, NEG_LSE: tl.constexpr):
    """g = d<grads, stats>/d a / sqrt(D) for a tile of raw scores `a`, in either orientation: the
    row quantities (pidx, gneg, nstat, gp_base) and `cols` come broadcastable to a's shape."""
    if CLIP:
        t, dt = _tanh_dtanh(a * inv_tclip)
        s = tclip * t
    else:
        s = a
    is_pos = (cols // L) == pidx
    if NEG_LSE:
        # neg_stat >= s on a row with negatives; with B == 1 (neg_stat = -inf) only the
        # discarded lanes of the where below see exp(+inf)
        dstat = tl.exp(s - nstat)
    else:
        dstat = _sigmoid(s)
    # grad_pos[i, l] of column m = pidx[i] * L + l is at i * L + l = (i - pidx[i]) * L + m. The
    # gather is masked rather than skipped on tiles without positives: a branch around it cost
    # the fp32 and one-chunk variants hundreds to thousands of bytes of spills (ptxas, sm_90).
    gpos = tl.load(gp_ptr + gp_base + cols, mask=is_pos & valid, other=0.0)
    g_s = tl.where(is_pos, gpos, gneg * dstat)
    if CLIP:
        g_s = g_s * dt
    return tl.where(valid, (g_s + gsq2 * a) * scale, 0.0)


@triton.jit
def _half_scale(g, AXIS: tl.constexpr):
    """Factors p = 2^k along AXIS that put max |g| in [2^13, 2^14] (fp16 max ~2^16), as the CUDA
    kernel's per-call scale does, and 1 / p. All-zero lines get k = 100 (their g stays 0)."""
    gmax = tl.max(tl.abs(g), axis=AXIS)
    k = 14.0 - tl.ceil(tl.log2(tl.maximum(gmax, 1e-30)))
    k = tl.minimum(tl.maximum(k, -100.0), 100.0)
    return tl.exp2(k), tl.exp2(-k)


@triton.autotune(configs=SRC_CONFIGS, key=["N", "M", "D", "CLIP", "NEG_LSE", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.heuristics({"ONE_CHUNK": _one_chunk})
@triton.jit
def _nce_bwd_src_kernel(
    src_ptr, trg_ptr, pos_idx_ptr,          # (N, D), (M, D); (N,) int64
    gp_ptr, gneg_ptr, gsq_ptr, nstat_ptr,   # (N, L), (N,), (1,), (N,) fp32
    out_ptr,                                # (S, N, D): d src (S == 1, input dtype) or fp32 partials
    N, M, D, L, cols_per_split,
    scale, tclip, inv_tclip,
    CLIP: tl.constexpr, NEG_LSE: tl.constexpr,
    HALF_G: tl.constexpr,            # fp16 inputs: scale g per row before the fp16 product
    INPUT_PRECISION: tl.constexpr,   # "ieee" or "tf32x3" (only matters for fp32 inputs)
    UPCAST: tl.constexpr,            # interpreter: its bf16 tl.dot is wrong, so dot in fp32
    ONE_CHUNK: tl.constexpr,         # D <= BLOCK_D: the row block is loaded once
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    pidx = _positive_sample(pos_idx_ptr, rows, row_ok, M // L)   # -1: no positives in the row
    gneg = tl.load(gneg_ptr + rows, mask=row_ok, other=0.0)
    nstat = tl.load(nstat_ptr + rows, mask=row_ok, other=0.0)
    gp_base = (rows64 - pidx) * L
    gsq2 = 2.0 * tl.load(gsq_ptr)
    dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_ok = dout < D
    src_rows = src_ptr + rows64[:, None] * D
    if ONE_CHUNK:
        x_all = _resident_block(src_rows, row_ok, D, UPCAST, BLOCK_D)
    else:
        x_all = None   # _score_tile loads the row block chunk by chunk

    acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    col_begin = pid_s * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, M)
    for start in range(col_begin, col_end, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < col_end
        trg_cols = trg_ptr + cols.to(tl.int64)[None, :] * D
        a = _score_tile(x_all, src_rows, row_ok, trg_cols, col_ok, D, INPUT_PRECISION, UPCAST,
                        ONE_CHUNK, BLOCK_N, BLOCK_M, BLOCK_D)
        g = _score_grad(a * scale, cols[None, :], pidx[:, None], gneg[:, None], nstat[:, None],
                        gp_base[:, None], row_ok[:, None] & col_ok[None, :], gp_ptr, gsq2, scale,
                        tclip, inv_tclip, L, CLIP, NEG_LSE)
        yo = tl.load(trg_ptr + cols.to(tl.int64)[:, None] * D + dout[None, :],
                     mask=col_ok[:, None] & dout_ok[None, :], other=0.0)
        if HALF_G:
            p, inv_p = _half_scale(g, 1)
            g = g * p[:, None]
        g = g.to(yo.dtype)   # the product runs in the input dtype, as the CUDA kernel's
        if UPCAST:
            g = g.to(tl.float32)
            yo = yo.to(tl.float32)
        prod = tl.dot(g, yo, input_precision=INPUT_PRECISION)
        if HALF_G:
            prod = prod * inv_p[:, None]
        acc += prod
    out = out_ptr + pid_s.to(tl.int64) * N * D + rows64[:, None] * D + dout[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dout_ok[None, :])


@triton.autotune(configs=TRG_CONFIGS, key=["N", "M", "D", "CLIP", "NEG_LSE", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.heuristics({"ONE_CHUNK": _one_chunk})
@triton.jit
def _nce_bwd_trg_kernel(
    src_ptr, trg_ptr, pos_idx_ptr,
    gp_ptr, gneg_ptr, gsq_ptr, nstat_ptr,
    out_ptr,                                # (M, D) d trg_flat, input dtype
    N, M, D, L,
    scale, tclip, inv_tclip,
    CLIP: tl.constexpr, NEG_LSE: tl.constexpr, HALF_G: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    cols64 = cols.to(tl.int64)
    gsq2 = 2.0 * tl.load(gsq_ptr)
    dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_ok = dout < D
    trg_cols = trg_ptr + cols64[:, None] * D
    if ONE_CHUNK:
        y_all = _resident_block(trg_cols, col_ok, D, UPCAST, BLOCK_D)
    else:
        y_all = None   # _score_tile loads the column block chunk by chunk

    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        pidx = _positive_sample(pos_idx_ptr, rows, row_ok, M // L)
        gneg = tl.load(gneg_ptr + rows, mask=row_ok, other=0.0)
        nstat = tl.load(nstat_ptr + rows, mask=row_ok, other=0.0)
        gp_base = (rows64 - pidx) * L
        src_rows = src_ptr + rows64[None, :] * D
        # the score tile transposed, a^T (BLOCK_M x BLOCK_N): g^T then feeds the product as is
        at = _score_tile(y_all, trg_cols, col_ok, src_rows, row_ok, D, INPUT_PRECISION, UPCAST,
                         ONE_CHUNK, BLOCK_M, BLOCK_N, BLOCK_D)
        gt = _score_grad(at * scale, cols[:, None], pidx[None, :], gneg[None, :], nstat[None, :],
                         gp_base[None, :], col_ok[:, None] & row_ok[None, :], gp_ptr, gsq2, scale,
                         tclip, inv_tclip, L, CLIP, NEG_LSE)
        xo = tl.load(src_ptr + rows64[:, None] * D + dout[None, :],
                     mask=row_ok[:, None] & dout_ok[None, :], other=0.0)
        if HALF_G:
            p, inv_p = _half_scale(gt, 1)
            gt = gt * p[:, None]
        gt = gt.to(xo.dtype)
        if UPCAST:
            gt = gt.to(tl.float32)
            xo = xo.to(tl.float32)
        prod = tl.dot(gt, xo, input_precision=INPUT_PRECISION)
        if HALF_G:
            prod = prod * inv_p[:, None]
        acc += prod
    out = out_ptr + cols64[:, None] * D + dout[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & dout_ok[None, :])


@triton.jit
def _sum_splits_kernel(parts_ptr, out_ptr, S, NUMEL, BLOCK: tl.constexpr):
    """out = sum over s of parts[s] (S x NUMEL fp32), in out's dtype: one launch where
    parts.sum(0).to(dtype) took two."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, S):
        acc += tl.load(parts_ptr + s * NUMEL + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def src_splits(n: int, m: int, d: int, device: torch.device) -> tuple[int, int]:
    """(column splits S, columns per split) of the d src kernel: about _PROGRAMS_PER_SM programs
    per SM counted with the smallest row block and D-out chunk, every split a whole number of
    the widest column tiles and none empty, the fp32 partials within _SPLIT_BYTES."""
    block_n = min(c.kwargs["BLOCK_N"] for c in SRC_CONFIGS)
    block_do = min(c.kwargs["BLOCK_DO"] for c in SRC_CONFIGS)
    granule = max(c.kwargs["BLOCK_M"] for c in SRC_CONFIGS)
    sms = _INTERPRET_SMS if INTERPRET else sm_count(device.index or 0)
    programs = triton.cdiv(n, block_n) * triton.cdiv(d, block_do)
    wanted = triton.cdiv(_PROGRAMS_PER_SM * sms, programs)
    by_memory = max(1, _SPLIT_BYTES // (4 * n * d))
    splits = max(1, min(wanted, _MAX_SRC_SPLITS, by_memory, triton.cdiv(m, granule)))
    cols = triton.cdiv(triton.cdiv(m, splits), granule) * granule
    return triton.cdiv(m, cols), cols


_FLOAT32_TINY, _FLOAT32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max


def _check(grad_pos, grad_neg_stat, grad_sumsq, src, trg, pos_idx, neg_stat, tclip, neg_reduction):
    if src.dtype not in (torch.float16, torch.bfloat16, torch.float32) or trg.dtype != src.dtype:
        raise TypeError(f"the Triton nce_bwd takes float16, bfloat16 or float32 src and trg of one "
                        f"dtype (float64 runs on the CPU), got src {src.dtype} and trg {trg.dtype}")
    if neg_reduction not in ("logsumexp", "softplus_sum"):
        raise ValueError(f"neg_reduction must be 'logsumexp' or 'softplus_sum', got {neg_reduction!r}")
    if src.dim() != 2 or trg.dim() != 3 or src.shape[1] != trg.shape[2]:
        raise ValueError(f"src must be (N, D) and trg (B, L, D) with the same D, got "
                         f"{tuple(src.shape)} and {tuple(trg.shape)}")
    if src.numel() == 0 or trg.numel() == 0:
        raise ValueError("src and trg must be non-empty")
    n, l = src.shape[0], trg.shape[1]
    if pos_idx.dtype != torch.int64 or tuple(pos_idx.shape) != (n,):
        raise ValueError(f"pos_idx must be int64 of shape (N,) = ({n},), got {pos_idx.dtype} "
                         f"{tuple(pos_idx.shape)}")
    if tuple(grad_pos.shape) != (n, l):
        raise ValueError(f"grad_pos must be (N, L) = ({n}, {l}), got {tuple(grad_pos.shape)}")
    if tuple(grad_neg_stat.shape) != (n,) or tuple(neg_stat.shape) != (n,):
        raise ValueError(f"grad_neg_stat and neg_stat must be (N,) = ({n},), got "
                         f"{tuple(grad_neg_stat.shape)} and {tuple(neg_stat.shape)}")
    if grad_sumsq.numel() != 1:
        raise ValueError(f"grad_sumsq must hold one value, got shape {tuple(grad_sumsq.shape)}")
    for name, t in (("grad_pos", grad_pos), ("grad_neg_stat", grad_neg_stat),
                    ("grad_sumsq", grad_sumsq), ("trg", trg), ("pos_idx", pos_idx),
                    ("neg_stat", neg_stat)):
        if t.device != src.device:
            raise ValueError(f"every nce_bwd tensor must be on {src.device}, got {name} on {t.device}")
    # the kernel gets a float32: a tiny positive double must not round to 0, a huge one to inf
    if tclip is not None and not (_FLOAT32_TINY <= tclip <= _FLOAT32_MAX):
        raise ValueError(f"tclip must be a positive finite float32 value or None, got {tclip}")
    check_device(src, "the Triton nce_bwd")


def kernel_inputs(grad_pos, grad_neg_stat, grad_sumsq, src, trg, pos_idx, neg_stat, tclip,
                  neg_reduction):
    """nce_bwd's arguments checked and as the Triton backward kernels read them: src, trg,
    pos_idx contiguous; grad_pos, grad_neg_stat, neg_stat contiguous fp32; grad_sumsq (1,) fp32."""
    _check(grad_pos, grad_neg_stat, grad_sumsq, src, trg, pos_idx, neg_stat, tclip, neg_reduction)
    f32 = torch.float32
    return (src.contiguous(), trg.contiguous(), pos_idx.contiguous(),
            grad_pos.to(f32).contiguous(), grad_neg_stat.to(f32).contiguous(),
            grad_sumsq.to(f32).reshape(1), neg_stat.to(f32).contiguous())


def nce_bwd_triton(grad_pos: torch.Tensor, grad_neg_stat: torch.Tensor, grad_sumsq: torch.Tensor,
                   src: torch.Tensor, trg: torch.Tensor, pos_idx: torch.Tensor,
                   neg_stat: torch.Tensor, tclip: float | None, neg_reduction: str):
    """(grad_src, grad_trg) in the dtypes of src / trg, exactly as docs/design.md's
    amdim_kernels::nce_bwd. neg_stat is the forward's, so that exp(s - neg_stat) <= 1."""
    src, trg, pos_idx, gp, gn, gs, ns = kernel_inputs(grad_pos, grad_neg_stat, grad_sumsq, src, trg,
                                                      pos_idx, neg_stat, tclip, neg_reduction)
    f32 = torch.float32
    n, d = src.shape
    b, l, _ = trg.shape
    m = b * l
    dev = src.device
    splits, cols_per_split = src_splits(n, m, d, dev)
    grad_trg = torch.empty_like(trg)
    src_out = (torch.empty_like(src) if splits == 1
               else torch.empty((splits, n, d), dtype=f32, device=dev))
    clip = tclip is not None
    consts = dict(CLIP=clip, NEG_LSE=neg_reduction == "logsumexp", HALF_G=src.dtype == torch.float16,
                  INPUT_PRECISION=input_precision(src.dtype), UPCAST=INTERPRET)
    scalars = (1.0 / math.sqrt(d), float(tclip) if clip else 1.0, 1.0 / tclip if clip else 1.0)
    with device_guard(src):
        _nce_bwd_src_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),
                                          triton.cdiv(d, meta["BLOCK_DO"]), splits)](
            src, trg, pos_idx, gp, gn, gs, ns, src_out, n, m, d, l, cols_per_split, *scalars,
            **consts)
        _nce_bwd_trg_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),
                                          triton.cdiv(d, meta["BLOCK_DO"]))](
            src, trg, pos_idx, gp, gn, gs, ns, grad_trg, n, m, d, l, *scalars, **consts)
        if splits > 1:
            grad_src = torch.empty_like(src)
            _sum_splits_kernel[(triton.cdiv(n * d, _SUM_BLOCK),)](src_out, grad_src, splits, n * d,
                                                                  BLOCK=_SUM_BLOCK)
    return (src_out if splits == 1 else grad_src), grad_trg
