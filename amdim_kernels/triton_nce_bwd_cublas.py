"""Triton g + cuBLAS backward of amdim_kernels::nce_bwd (docs/design.md): the pip-only variant
without the fp32 round trip of the CUDA C++ kernel.

The N x M score gradient g is formed chunk by chunk, each chunk R x C within `G_BYTES`:
- `_nce_g_kernel`, grid (row tiles, column tiles) of the chunk: a = src[rows] @ trg_flat[cols]^T
  / sqrt(D) with tl.dot (fp32 accumulation), g formed in registers as in triton_nce_bwd.py and
  stored once in the input dtype (2 bytes per score for 16-bit inputs);
- cuBLAS then computes d src[rows] (+)= g @ trg_flat[cols] and d trg_flat[cols] (+)= g^T @ src[rows].
So per score: 2 bytes written and 4 read (the CUDA kernel moves ~14: fp32 dots written and read,
g written and read twice), and four products in all (the recompute and three of cuBLAS's), with no
D-out recompute (the Triton row/column backward recomputes the scores once per 64-256 columns of D).

Chunks take every row when R = N fits (then each d trg chunk is final, written once in the input
dtype) and as many columns as fit beside them, spread evenly. Extra memory: the g chunk (<= G_BYTES),
for 16-bit inputs with several column chunks an fp32 N x D accumulator for d src, with several row
chunks an fp32 C x D one for d trg, and for fp16 the fp32 C x D product of each chunk (below).

fp16 g: gradients of an N*L-term mean are ~1e-7, in fp16's subnormals, so g is stored times a power
of two p with p * max |g| <= 2^14, from a bound on |g| (max |grad|, the largest row norms of src and
trg) computed on the device: no host read. The fp16 products are formed in fp32 and divided by p.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_common import (INTERPRET, _positive_sample, _score_tile, device_guard,
                             input_precision, product_into)
from .triton_nce_bwd import _score_grad, kernel_inputs

# Scratch for one g chunk (bytes), as the CUDA kernel's score tile.
G_BYTES = 32 << 20
_COL_QUANTUM = 128   # chunks are cut at multiples of this many columns (GEMM efficiency)

# GPU tile configs, autotuned per chunk shape. The kernel holds a score tile and its epilogue, as
# the forward's split kernel does without the row reductions (tests/test_triton_nce_bwd_cublas.py
# holds every config to a spill budget on sm_90).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 128, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_D": 128}, num_warps=8, num_stages=2),
]
# fp32: ieee dots on the FMA units, tf32x3 as three MMAs: small tiles (as the other kernels).
_FP32_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_M": 64, "BLOCK_D": 32}, num_warps=4, num_stages=2),
]
_INTERPRET_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 16}, num_warps=4,
                                    num_stages=1)]
CONFIGS = _INTERPRET_CONFIGS if INTERPRET else _GPU_CONFIGS + _FP32_CONFIGS
# The g kernel's grid is (row tiles, column tiles) and CUDA caps a grid's y at 65535: a chunk has
# at most this many columns (N of a few rows against millions of targets would exceed it).
_MAX_COLS = 65535 * min(c.kwargs["BLOCK_M"] for c in _GPU_CONFIGS + _FP32_CONFIGS)


def prune_configs(configs, named_args, **kwargs):
    """fp32 inputs take the fp32 configs, 16-bit ones the others."""
    fp32 = named_args["src_ptr"].dtype == torch.float32
    return [c for c in configs if (c in _FP32_CONFIGS) == fp32] or configs


@triton.autotune(configs=CONFIGS, key=["R", "C", "D", "CLIP", "NEG_LSE", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _nce_g_kernel(
    src_ptr, trg_ptr, pos_idx_ptr,          # (N, D), (M, D); (N,) int64
    gp_ptr, gneg_ptr, gsq_ptr, nstat_ptr,   # (N, L), (N,), (1,), (N,) fp32
    p_ptr,                                  # (1,) fp32: fp16's power-of-two scale (HALF_G)
    g_ptr,                                  # (R, C) out, input dtype: the chunk of g
    N, M, D, L, row0, col0, R, C,
    scale, tclip, inv_tclip,
    CLIP: tl.constexpr, NEG_LSE: tl.constexpr, HALF_G: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One score tile per program, over D in BLOCK_D chunks (with nothing to reuse across tiles,
    # keeping a D <= BLOCK_D row block resident only cost registers: 200-330 bytes of spills).
    local_r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local_c = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row0 + local_r
    cols = col0 + local_c
    row_ok = (local_r < R) & (rows < N)
    col_ok = (local_c < C) & (cols < M)
    rows64 = rows.to(tl.int64)
    pidx = _positive_sample(pos_idx_ptr, rows, row_ok, M // L)
    gneg = tl.load(gneg_ptr + rows, mask=row_ok, other=0.0)
    nstat = tl.load(nstat_ptr + rows, mask=row_ok, other=0.0)
    gp_base = (rows64 - pidx) * L
    gsq2 = 2.0 * tl.load(gsq_ptr)
    src_rows = src_ptr + rows64[:, None] * D
    trg_cols = trg_ptr + cols.to(tl.int64)[None, :] * D
    a = _score_tile(None, src_rows, row_ok, trg_cols, col_ok, D, INPUT_PRECISION, UPCAST,
                    False, BLOCK_N, BLOCK_M, BLOCK_D)
    valid = row_ok[:, None] & col_ok[None, :]
    g = _score_grad(a * scale, cols[None, :], pidx[:, None], gneg[:, None], nstat[:, None],
                    gp_base[:, None], valid, gp_ptr, gsq2, scale, tclip, inv_tclip, L, CLIP, NEG_LSE)
    if HALF_G:
        g = g * tl.load(p_ptr)
    out = g_ptr + local_r.to(tl.int64)[:, None] * C + local_c[None, :]
    tl.store(out, g.to(g_ptr.dtype.element_ty), mask=(local_r < R)[:, None] & (local_c < C)[None, :])


def chunks(n: int, m: int, esize: int, budget: int | None = None) -> tuple[int, int]:
    """(rows R, columns C) of a g chunk: every row when R = N fits beside _COL_QUANTUM columns,
    then as many columns as fit (at most _MAX_COLS), multiples of _COL_QUANTUM; both spread
    evenly over the counts so found (no sliver of a last chunk, so at most two chunk shapes to
    autotune)."""
    elems = max((G_BYTES if budget is None else budget) // esize, _COL_QUANTUM)
    row_chunks = triton.cdiv(n, max(1, elems // _COL_QUANTUM))
    rows = triton.cdiv(n, row_chunks)
    max_cols = max(_COL_QUANTUM, min(elems // rows, _MAX_COLS) // _COL_QUANTUM * _COL_QUANTUM)
    col_chunks = triton.cdiv(m, max_cols)
    cols = min(m, triton.cdiv(triton.cdiv(m, col_chunks), _COL_QUANTUM) * _COL_QUANTUM)
    return rows, cols


def half_scale(gp, gn, gs, src, trg_flat, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, 1 / p), (1,) fp32 on the device: p = 2^k with p * (bound on max |g|) in [2^13, 2^14),
    from |d stat / d s| <= 1, |d s / d a| <= 1 and |a| <= max ||src_i|| max ||trg_m|| / sqrt(D)
    (the CUDA kernel's bound, without its host read). A norm above fp16's range makes the bound
    infinite, and then p = 1."""
    norm = lambda x: torch.linalg.vector_norm(x, dim=1).amax().float()   # noqa: E731
    max_a = norm(src) * norm(trg_flat) / math.sqrt(d)
    max_g = (torch.maximum(gp.abs().amax(), gn.abs().amax()) + 2 * gs.abs().reshape(()) * max_a) \
        / math.sqrt(d)
    k = (13.0 - torch.floor(torch.log2(max_g))).clamp(-100.0, 100.0)
    k = torch.where(torch.isfinite(max_g) & (max_g > 0), k, 0.0)
    return torch.exp2(k).reshape(1), torch.exp2(-k).reshape(1)


def nce_bwd_triton_cublas(grad_pos: torch.Tensor, grad_neg_stat: torch.Tensor,
                          grad_sumsq: torch.Tensor, src: torch.Tensor, trg: torch.Tensor,
                          pos_idx: torch.Tensor, neg_stat: torch.Tensor, tclip: float | None,
                          neg_reduction: str):
    """(grad_src, grad_trg) in the dtypes of src / trg, exactly as docs/design.md's
    amdim_kernels::nce_bwd. neg_stat is the forward's, so that exp(s - neg_stat) <= 1."""
    src, trg, pos_idx, gp, gn, gs, ns = kernel_inputs(grad_pos, grad_neg_stat, grad_sumsq, src, trg,
                                                      pos_idx, neg_stat, tclip, neg_reduction)
    f32 = torch.float32
    n, d = src.shape
    b, l, _ = trg.shape
    m = b * l
    dev, dtype = src.device, src.dtype
    trg_flat = trg.view(m, d)
    rows, cols = chunks(n, m, src.element_size())
    half = dtype == torch.float16
    p, inv_p = half_scale(gp, gn, gs, src, trg_flat, d) if half else (gs, None)   # gs: unread
    grad_src = torch.empty_like(src)
    grad_trg = torch.empty_like(trg)
    grad_trg_flat = grad_trg.view(m, d)
    several_cols, several_rows = cols < m, rows < n
    # fp32 accumulators where a 16-bit result is summed over chunks or scaled (fp16) before its store
    acc_src = (torch.empty((n, d), dtype=f32, device=dev)
               if dtype != f32 and (several_cols or half) else grad_src)
    acc_trg = (torch.empty((cols, d), dtype=f32, device=dev)
               if dtype != f32 and (several_rows or half) else None)
    g_buf = torch.empty(rows * cols, dtype=dtype, device=dev)
    clip = tclip is not None
    consts = dict(CLIP=clip, NEG_LSE=neg_reduction == "logsumexp", HALF_G=half,
                  INPUT_PRECISION=input_precision(dtype), UPCAST=INTERPRET)
    scalars = (1.0 / math.sqrt(d), float(tclip) if clip else 1.0, 1.0 / tclip if clip else 1.0)
    with device_guard(src):
        for c0 in range(0, m, cols):
            cw = min(cols, m - c0)
            trg_c = trg_flat[c0:c0 + cw]
            out_c = grad_trg_flat[c0:c0 + cw] if acc_trg is None else acc_trg[:cw]
            for r0 in range(0, n, rows):
                rh = min(rows, n - r0)
                g = g_buf[:rh * cw].view(rh, cw)
                _nce_g_kernel[lambda meta: (triton.cdiv(rh, meta["BLOCK_N"]),
                                            triton.cdiv(cw, meta["BLOCK_M"]))](
                    src, trg, pos_idx, gp, gn, gs, ns, p, g, n, m, d, l, r0, c0, rh, cw, *scalars,
                    **consts)
                product_into(acc_src[r0:r0 + rh], g, trg_c, accumulate=c0 > 0)
                product_into(out_c, g.t(), src[r0:r0 + rh], accumulate=r0 > 0)
            if acc_trg is not None:
                if half:
                    torch.mul(out_c, inv_p, out=grad_trg_flat[c0:c0 + cw])
                else:
                    grad_trg_flat[c0:c0 + cw].copy_(out_c)
        if acc_src is not grad_src:
            if half:
                torch.mul(acc_src, inv_p, out=grad_src)
            else:
                grad_src.copy_(acc_src)
    return grad_src, grad_trg
