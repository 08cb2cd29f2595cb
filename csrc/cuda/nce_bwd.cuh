// Torch-free part of the CUDA backward of amdim_kernels::nce_bwd (docs/design.md).
//
// The backward walks the N x M score matrix in tiles. For each tile the binding
// (nce_cuda.cpp) has cuBLAS write the raw dot products <src[i], trg_flat[m]> in fp32; the kernel
// declared here turns them into the score gradient g (already divided by sqrt(D)) in the storage
// type of the next two products (g @ trg_flat and g^T @ src). Nothing here knows about torch, so
// this compiles with plain nvcc on machines whose torch has no CUDA.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "../common.h"

namespace amdim_kernels {

// One tile: rows [row0, row0 + rows) of src against columns [col0, col0 + cols) of trg_flat,
// stored row-major and contiguous (ld == cols). Row-indexed arrays are indexed by global row.
struct NceBwdTile {
  const float* dots;            // rows x cols raw dot products <src[i], trg_flat[m]>
  int64_t rows, cols;
  int64_t row0, col0;
  int64_t L;                    // column m belongs to sample m / L, location m % L
  const int64_t* pos_idx;       // (N,)
  const float* grad_pos;        // (N, L), contiguous
  const float* grad_neg_stat;   // (N,)
  const float* neg_stat;        // (N,): the forward's per-row reduction over the negatives
  const float* grad_sumsq;      // one value, read on the device (no host sync)
  float inv_sqrt_d;             // a = dot / sqrt(D)
  float tclip;                  // <= 0: no clipping
  NegReduction reduction;
  float g_scale;                // g is stored as g_a * g_scale: 1/sqrt(D), times a power of two
                                // for fp16 (see nce_cuda.cpp); the products undo the power of two
};

// g[k] = g_scale * d<grads, (pos, neg_stat, sumsq)>/d a for every element k of the tile. g may alias
// tile.dots when T is float (each element is read before it is written, by the same thread).
template <typename T>
cudaError_t launch_nce_bwd_tile(const NceBwdTile& tile, T* g, cudaStream_t stream);

#ifdef __CUDACC__
// exp written out so that it keeps ~2 ulp under --use_fast_math (the extension is built with
// it): there expf becomes ex2.approx(x * log2e), whose rounded product costs |x| * 2^-24 of
// relative accuracy, and tanhf becomes tanh.approx (2^-11 relative, i.e. ~0.01 on a clipped score
// of 20, a 1% error in exp(s - neg_stat)), which is why tanh comes from common.h, over this exp.
// exp2f stays ~2 ulp in both modes.
__host__ __device__ inline float exp_accurate(float x) {
  const float t = x * 1.442695041f;                                   // x * log2(e), rounded
  const float err = fmaf(x, 1.442695041f, -t) + x * 1.925963033e-8f;  // + the lost low part
  return exp2f(t) * fmaf(err, 0.6931471806f, 1.0f);
}

struct ExpAccurate {
  __host__ __device__ float operator()(float x) const { return exp_accurate(x); }
};

// The per-element formula, __host__ __device__ so that the tests can run it on the CPU through a
// small host shim compiled with nvcc.
__host__ __device__ inline float nce_score_grad(const NceBwdTile& t, float dot, int64_t i,
                                                int64_t b, int64_t l) {
  const float a = dot * t.inv_sqrt_d;
  float s = a, ds_da = 1.0f;
  if (t.tclip > 0.0f) {
    float th;
    tanh_dtanh_f(a / t.tclip, ExpAccurate{}, &th, &ds_da);   // ds_da accurate when saturated
    s = t.tclip * th;
  }
  float g_s;
  if (b == t.pos_idx[i]) {
    g_s = t.grad_pos[i * t.L + l];
  } else if (t.reduction == NegReduction::kLogSumExp) {
    // A row with negatives has a finite neg_stat >= s; with B == 1 this branch is never taken,
    // so exp(-inf - -inf) is never formed.
    g_s = t.grad_neg_stat[i] * exp_accurate(s - t.neg_stat[i]);
  } else {
    g_s = t.grad_neg_stat[i] * sigmoid(s, ExpAccurate{});   // d softplus(s) / ds
  }
  return (g_s * ds_da + 2.0f * t.grad_sumsq[0] * a) * t.g_scale;
}

template <typename T> __host__ __device__ inline T to_storage(float x);
template <> __host__ __device__ inline float to_storage<float>(float x) { return x; }
template <> __host__ __device__ inline __half to_storage<__half>(float x) {
  return __float2half_rn(x);
}
template <> __host__ __device__ inline __nv_bfloat16 to_storage<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements [4v, 4v + 4) of the tile, in flat row-major order (a vector may straddle rows; only
// the flat base must be 16-byte aligned, so ragged tile widths need no special case). Index
// arithmetic is 32-bit: the launcher checks rows * cols < 2^31 and col0 + cols < 2^31.
constexpr int kVec = 4;

template <typename T>
__host__ __device__ inline void nce_bwd_tile_vec(const NceBwdTile& t, T* g, uint32_t v) {
  const uint32_t n = static_cast<uint32_t>(t.rows * t.cols);
  const uint32_t cols = static_cast<uint32_t>(t.cols), col0 = static_cast<uint32_t>(t.col0);
  const uint32_t L = static_cast<uint32_t>(t.L);
  const uint32_t e0 = v * kVec;
  const bool full = e0 + kVec <= n;
  float x[kVec];
  if (full) {
    const float4 q = *reinterpret_cast<const float4*>(t.dots + e0);
    x[0] = q.x; x[1] = q.y; x[2] = q.z; x[3] = q.w;
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) x[k] = e0 + k < n ? t.dots[e0 + k] : 0.0f;
  }
  // Two divisions per vector; the following elements step (row, b, l) forward.
  uint32_t r = e0 / cols, c = e0 - r * cols;
  uint32_t b = (col0 + c) / L, l = col0 + c - b * L;
  T y[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    y[k] = to_storage<T>(e0 + k < n ? nce_score_grad(t, x[k], t.row0 + r, b, l) : 0.0f);
    if (++l == L) { l = 0; ++b; }
    if (++c == cols) { c = 0; ++r; b = col0 / L; l = col0 - b * L; }
  }
  if (full) {
    // 16 bytes (float) or 8 bytes (half, bf16) per thread: g + e0 is aligned like dots + e0.
    struct alignas(sizeof(T) * kVec) Pack { T v[kVec]; } p;
#pragma unroll
    for (int k = 0; k < kVec; ++k) p.v[k] = y[k];
    *reinterpret_cast<Pack*>(g + e0) = p;
  } else {
    for (int k = 0; k < kVec && e0 + k < n; ++k) g[e0 + k] = y[k];
  }
}
#endif  // __CUDACC__

}  // namespace amdim_kernels
