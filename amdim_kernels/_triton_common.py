"""What the Triton kernels share: the interpreter switch, the score tile (a = src . trg^T, or its
transpose), the elementwise math of the score epilogue (tanh and its derivative, softplus,
sigmoid), the fp32 dot precision and the device guard.

The math is written with tl.exp / tl.log / tl.where only: the interpreter (TRITON_INTERPRET=1, which
the tests use) has no libdevice and no tl.tanh. tanh is the same approximation as the C++ and CUDA
kernels' (csrc/common.h), so every backend clips a score the same way.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# Must match how triton.jit decides (it reads the variable when the kernels are decorated).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Below this |x| tanh is the odd polynomial (no cancellation near 0), above it it comes from
# e = exp(-2|x|); the same split and coefficients as csrc/common.h (Cephes tanhf, ~2 ulp).
TANH_POLY_LIMIT = 0.625


@triton.jit
def _tanh_poly(x):
    z = x * x
    return ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
             + 1.33314422036e-1) * z - 3.33332819422e-1) * z * x + x


@triton.jit
def _tanh(x):
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)               # in (0, 1]: no overflow for any x
    big = (1.0 - e) / (1.0 + e)
    return tl.where(ax < 0.625, _tanh_poly(x), tl.where(x < 0, -big, big))


@triton.jit
def _tanh_rational(x):
    """tanh(x) as a (13, 6) rational function of x clamped to +-7.905 (beyond it tanh rounds to
    +-1 in float; Eigen's float tanh): one division and no exp, so one special-function op where
    _tanh has two. Within 7 ulp (3.9e-7 relative) of tanh; tests/test_triton_nce_fwd.py measures it."""
    xc = tl.minimum(tl.maximum(x, -7.90531110763549805), 7.90531110763549805)
    x2 = xc * xc
    p = x2 * -2.76076847742355e-16 + 2.00018790482477e-13
    p = p * x2 - 8.60467152213735e-11
    p = p * x2 + 5.12229709037114e-08
    p = p * x2 + 1.48572235717979e-05
    p = p * x2 + 6.37261928875436e-04
    p = p * x2 + 4.89352455891786e-03
    q = x2 * 1.19825839466702e-06 + 1.18534705686654e-04
    q = q * x2 + 2.26843463243900e-03
    q = q * x2 + 4.89352518554385e-03
    return tl.where(tl.abs(x) < 0.0004, x, xc * p / q)


@triton.jit
def _tanh_dtanh(x):
    """(tanh(x), 1 - tanh(x)^2). For large |x| the derivative is 4e / (1 + e)^2 with
    e = exp(-2|x|), accurate down to fp32's smallest normals, where 1 - t^2 would round to 0 or
    stall at ~1e-7 (t rounds to 1 - 2^-24)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    r = 1.0 / (1.0 + e)
    big = (1.0 - e) * r
    small = _tanh_poly(x)
    is_small = ax < 0.625
    t = tl.where(is_small, small, tl.where(x < 0, -big, big))
    dt = tl.where(is_small, 1.0 - small * small, 4.0 * e * r * r)
    return t, dt


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)); log1p(z) = log(u) * z / (u - 1) with u = 1 + z is accurate
    # to a few ulp (Goldberg) where log(1 + z) alone would lose all of z's digits.
    z = tl.exp(-tl.abs(x))
    u = 1.0 + z
    log1p_z = tl.where(u == 1.0, z, tl.log(u) * z / (u - 1.0))
    return tl.maximum(x, 0.0) + log1p_z


@triton.jit
def _sigmoid(x):
    # from e = exp(-|x|) <= 1: no overflow for either sign (as csrc/common.h)
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _clip(a, tclip, inv_tclip, CLIP: tl.constexpr, TANH_RATIONAL: tl.constexpr):
    """The soft clip s = tclip * tanh(a / tclip), or s = a without it."""
    if CLIP:
        if TANH_RATIONAL:
            return tclip * _tanh_rational(a * inv_tclip)
        return tclip * _tanh(a * inv_tclip)
    return a


@triton.jit
def _negatives_update(s, neg, m_i, acc_i, tclip, NEG_LSE: tl.constexpr, FIXED_SHIFT: tl.constexpr):
    """Fold the negatives (mask `neg`) of a (rows, columns) tile of clipped scores s into the
    per-row statistic: a logsumexp as (running max m_i, sum of exp(s - m_i)), shifted by the fixed
    tclip when FIXED_SHIFT (m_i unused), or a sum of softplus(s) in acc_i."""
    if NEG_LSE:
        if FIXED_SHIFT:
            acc_i += tl.sum(tl.where(neg, tl.exp(s - tclip), 0.0), axis=1)
        else:
            m_new = tl.maximum(m_i, tl.max(tl.where(neg, s, float("-inf")), axis=1))
            # A row with no negative seen yet keeps m = -inf; shift by 0 so exp gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc_i = acc_i * tl.exp(m_i - m_safe) + tl.sum(
                tl.where(neg, tl.exp(s - m_safe[:, None]), 0.0), axis=1)
            m_i = m_new
    else:
        acc_i += tl.sum(tl.where(neg, _softplus(s), 0.0), axis=1)
    return m_i, acc_i


@triton.jit
def _negatives_final(m_i, acc_i, tclip, NEG_LSE: tl.constexpr, FIXED_SHIFT: tl.constexpr):
    """neg_stat from _negatives_update's statistic: m + log(acc) (acc == 0, B == 1, gives -inf,
    the defined result), or the softplus sum."""
    if NEG_LSE:
        if FIXED_SHIFT:
            return tclip + tl.log(acc_i)
        return tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(acc_i)
    return acc_i


@triton.jit
def _positive_sample(pos_idx_ptr, rows, row_ok, B):
    """pos_idx[rows] as int32, and -1 (no positives) on padded rows and wherever pos_idx lies
    outside [0, B): the int64 value is range-checked before it is narrowed, so 2**32 + 1 does not
    become the valid sample 1. Such a call's loss is NaN (docs/losses.md); the kernels must only
    stay in bounds, and the gradient gathers grad_pos at the positives."""
    p = tl.load(pos_idx_ptr + rows, mask=row_ok, other=-1)
    return tl.where((p >= 0) & (p < B), p, -1).to(tl.int32)


@triton.jit
def _resident_block(rows_ptr, ok, D, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (rows, BLOCK_D) block of a row-major operand of D <= BLOCK_D columns (rows_ptr
    (rows, 1) at the rows' starts, ok (rows,) masking them; padding loaded as zeros), loaded once
    before a kernel's loop as _score_tile's lhs_all (ONE_CHUNK), upcast under UPCAST."""
    ks = tl.arange(0, BLOCK_D)
    x = tl.load(rows_ptr + ks[None, :], mask=ok[:, None] & (ks < D)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _score_tile(lhs_all, lhs_rows, lhs_ok, rhs_rows, rhs_ok, D,
                INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ONE_CHUNK: tl.constexpr,
                BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The fp32 (BLOCK_L, BLOCK_R) tile lhs[rows] @ rhs[rows]^T of two row-major operands of D
    columns (unscaled): src x trg for a, or trg x src for a^T. lhs_rows (BLOCK_L, 1) and rhs_rows
    (1, BLOCK_R) point at the rows' starts, lhs_ok (BLOCK_L,) and rhs_ok (BLOCK_R,) mask them;
    padded rows and columns are loaded as zeros, so their entries of the tile are exactly 0.
    ONE_CHUNK (D <= BLOCK_D): lhs_all is the caller's (BLOCK_L, BLOCK_D) lhs block, loaded once
    outside its loop by _resident_block, and the tile is one dot; else (lhs_all unused) tl.dot
    accumulates over D in BLOCK_D chunks. UPCAST: the interpreter's bf16 tl.dot is wrong, so dot
    in fp32."""
    if ONE_CHUNK:
        ks = tl.arange(0, BLOCK_D)
        y = tl.load(rhs_rows + ks[:, None], mask=(ks < D)[:, None] & rhs_ok[None, :], other=0.0)
        if UPCAST:
            y = y.to(tl.float32)
        a = tl.dot(lhs_all, y, input_precision=INPUT_PRECISION)
    else:
        a = tl.zeros((BLOCK_L, BLOCK_R), tl.float32)
        for k0 in range(0, D, BLOCK_D):
            kc = k0 + tl.arange(0, BLOCK_D)
            k_ok = kc < D
            x = tl.load(lhs_rows + kc[None, :], mask=lhs_ok[:, None] & k_ok[None, :], other=0.0)
            y = tl.load(rhs_rows + kc[:, None], mask=k_ok[:, None] & rhs_ok[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            a = tl.dot(x, y, a, input_precision=INPUT_PRECISION)
    return a


def fp32_matmul_allows_tf32() -> bool:
    """Whether torch lets fp32 CUDA matmuls use TF32, whichever API set it. The per-backend
    setting (torch >= 2.9, `torch.backends.cuda.matmul.fp32_precision`, "none" inheriting from
    `torch.backends.fp32_precision`) is also what the legacy `set_float32_matmul_precision`
    writes; `get_float32_matmul_precision()` raises once the new API has been used."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(torch.backends, "fp32_precision"):   # torch < 2.9: only the legacy API
        return torch.get_float32_matmul_precision() != "highest"
    precision = matmul.fp32_precision
    if precision == "none":
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for `dtype` inputs: fp32 follows torch's fp32 matmul precision."""
    if dtype == torch.float32 and fp32_matmul_allows_tf32():
        # tf32x3, not tf32: one tf32 MMA truncates its fp32 inputs, and on an H100 that made the
        # negatives' logsumexp ~10x less accurate than cuBLAS's TF32 product (biased errors add up
        # over M terms); three MMAs on the split operands are accurate to ~fp32 and still run on
        # the tensor cores.
        return "tf32x3"
    return "ieee"


def product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False):
    """out = a @ b, or out += a @ b (cuBLAS on CUDA), accumulated in fp32 whatever the dtypes:
    out is fp32 or a's dtype. fp32 products follow torch's matmul precision (TF32 or not)."""
    if out.dtype == a.dtype:
        out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    elif a.is_cuda:   # 16-bit operands into fp32 (out_dtype: torch >= 2.10)
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:             # CPU tensors (the interpreter tests): the same fp32 accumulation
        prod = a.float() @ b.float()
        out.add_(prod) if accumulate else out.copy_(prod)


def device_guard(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def check_device(x: torch.Tensor, what: str) -> None:
    if not INTERPRET and x.device.type != "cuda":
        raise ValueError(f"{what} runs on CUDA tensors (or under TRITON_INTERPRET=1), got tensors "
                         f"on {x.device}")


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (cached: the query costs microseconds)."""
    return torch.cuda.get_device_properties(index).multi_processor_count
