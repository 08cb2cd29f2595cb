// Fused AMDIM NCE statistics: the op schema (TORCH_LIBRARY) and its CPU kernels.
//
// nce_fwd reduces the N x M score matrix a = src @ trg_flat^T / sqrt(D) to (pos, neg_stat, sumsq)
// and nce_bwd turns their upstream gradients into d src and d trg (docs/design.md has the math).
// Both walk the score matrix in kRowBlock x kColBlock tiles that live in a per-thread buffer, so
// nothing of size N x M is ever allocated. Work is split over column blocks: each thread owns its
// columns of d trg outright and keeps private per-row statistics (forward) or a private d src
// (backward), merged once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "torch_common.h"

namespace amdim_kernels {
namespace {

// 128 x 256 fp32 tile = 128 KiB: fits L2 beside the trg block it is multiplied with.
constexpr int64_t kRowBlock = 128;
constexpr int64_t kColBlock = 256;

// ---- elementwise math ---------------------------------------------------------------------
// A branch-free float exp (Cephes polynomial, ~2 ulp) that GCC vectorises, under the shared
// tanh / sigmoid of common.h; libm's scalar calls would otherwise dominate the epilogue. fp64
// keeps libm: it is the checking path.
inline float fast_exp(float x) {
  x = x < -87.33654f ? -87.33654f : (x > 88.72283f ? 88.72283f : x);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline double fast_exp(double x) { return std::exp(x); }

struct FastExp {
  template <typename T>
  T operator()(T x) const { return fast_exp(x); }
};

inline float fast_tanh(float x) { return tanh_f(x, FastExp{}); }
inline double fast_tanh(double x) { return std::tanh(x); }

// tanh and 1 - tanh^2, the latter accurate in relative terms on saturated scores (common.h)
inline void fast_tanh_dtanh(float x, float* t, float* dt) { tanh_dtanh_f(x, FastExp{}, t, dt); }
inline void fast_tanh_dtanh(double x, double* t, double* dt) { tanh_dtanh_d(x, t, dt); }

// ---- BLAS ------------------------------------------------------------------------------------
// The Fortran BLAS that libtorch_cpu links and exports (MKL on x86 wheels). Called on raw tile
// pointers from inside at::parallel_for, where the BLAS runs single-threaded; ATen's tensor-level
// mm would add a dispatch and two tensor allocations per tile.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}

// Column-major C (m x n) = alpha * op(A) (m x k) @ op(B) (k x n) + beta * C.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  else
    dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

// ---- the problem and its score tiles ---------------------------------------------------------
template <typename T>
struct Problem {
  const T* src;            // N x D
  const T* trg;            // M x D, row m = b * L + l
  const int64_t* pos_idx;  // N
  int64_t N, M, L, D;
  T scale;                 // 1 / sqrt(D)
  bool clip;
  T tclip;
  NegReduction reduction;

  // The positive columns of row i, as a [lo, hi) range local to the column block at c0.
  void positive_range(int64_t i, int64_t c0, int64_t nc, int64_t* lo, int64_t* hi) const {
    const int64_t first = pos_idx[i] * L - c0;
    *lo = std::clamp<int64_t>(first, 0, nc);
    *hi = std::clamp<int64_t>(first + L, 0, nc);
  }
};

// tile[r, c] = <src[r0 + r], trg[c0 + c]> / sqrt(D), row-major with leading dimension nc.
template <typename T>
void score_tile(const Problem<T>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* tile) {
  // column-major: tile^T (nc x nr) = trg_blk (nc x D) @ src_blk^T (D x nr)
  gemm(true, false, nc, nr, p.D, p.scale, p.trg + c0 * p.D, p.D, p.src + r0 * p.D, p.D, T(0), tile,
       nc);
}

// ---- forward ---------------------------------------------------------------------------------
// Per-thread, per-row running statistic of the negatives: (running max, sum of exp(s - max)) for
// logsumexp, (unused, sum of softplus(s)) for softplus_sum.
template <typename T>
struct RowStats {
  std::vector<T> max, acc;
  double sumsq = 0.0;
  void init(int64_t n) {
    max.assign(n, -std::numeric_limits<T>::infinity());
    acc.assign(n, T(0));
  }
};

template <typename T>
inline T segment_max(const T* x, int64_t n, T m) {
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

template <typename T>
inline T segment_sumexp(const T* x, int64_t n, T shift) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += fast_exp(x[j] - shift);
  return acc;
}

template <typename T>
inline T segment_softplus(const T* x, int64_t n) {
  T acc = 0;
  for (int64_t j = 0; j < n; ++j) acc += softplus(x[j]);
  return acc;
}

// Fold one tile row (scores a, overwritten by s) into the row's statistics and positives.
template <typename T>
void forward_row(const Problem<T>& p, int64_t i, int64_t c0, int64_t nc, T* row, T* pos_out,
                 RowStats<T>& st) {
  T sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < nc; ++j) sq += row[j] * row[j];
  st.sumsq += static_cast<double>(sq);
  if (p.clip) {
    const T tclip = p.tclip, inv = T(1) / p.tclip;  // locals: no aliasing with row for the vectoriser
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) row[j] = tclip * fast_tanh(row[j] * inv);
  }
  int64_t lo, hi;
  p.positive_range(i, c0, nc, &lo, &hi);
  const int64_t l0 = c0 + lo - p.pos_idx[i] * p.L;
  for (int64_t j = lo; j < hi; ++j) pos_out[i * p.L + l0 + (j - lo)] = row[j];

  if (p.reduction == NegReduction::kSoftplusSum) {
    st.acc[i] += segment_softplus(row, lo) + segment_softplus(row + hi, nc - hi);
    return;
  }
  if (lo == 0 && hi == nc) return;  // all positives: nothing to fold
  const T m = segment_max(row + hi, nc - hi, segment_max(row, lo, st.max[i]));
  if (m > st.max[i]) {
    st.acc[i] *= fast_exp(st.max[i] - m);  // exp(-inf) == 0 on the first block
    st.max[i] = m;
  }
  st.acc[i] += segment_sumexp(row, lo, m) + segment_sumexp(row + hi, nc - hi, m);
}

template <typename T>
void nce_forward(const Problem<T>& p, T* pos_out, T* neg_stat, T* sumsq_out) {
  const int64_t n_col_blocks = (p.M + kColBlock - 1) / kColBlock;
  std::vector<RowStats<T>> stats(at::get_num_threads());
  at::parallel_for(0, n_col_blocks, 1, [&](int64_t begin, int64_t end) {
    RowStats<T>& st = stats[at::get_thread_num()];
    st.init(p.N);
    std::vector<T> tile(kRowBlock * kColBlock);
    for (int64_t cb = begin; cb < end; ++cb) {
      const int64_t c0 = cb * kColBlock, nc = std::min(kColBlock, p.M - c0);
      for (int64_t r0 = 0; r0 < p.N; r0 += kRowBlock) {
        const int64_t nr = std::min(kRowBlock, p.N - r0);
        score_tile(p, r0, nr, c0, nc, tile.data());
        for (int64_t r = 0; r < nr; ++r)
          forward_row(p, r0 + r, c0, nc, tile.data() + r * nc, pos_out, st);
      }
    }
  });
  // Merge the per-thread statistics (threads that got no work have empty vectors).
  double sumsq = 0.0;
  for (const auto& st : stats) sumsq += st.sumsq;
  *sumsq_out = static_cast<T>(sumsq);
  for (int64_t i = 0; i < p.N; ++i) {
    if (p.reduction == NegReduction::kSoftplusSum) {
      T acc = 0;
      for (const auto& st : stats)
        if (!st.acc.empty()) acc += st.acc[i];
      neg_stat[i] = acc;
      continue;
    }
    T m = -std::numeric_limits<T>::infinity();
    for (const auto& st : stats)
      if (!st.max.empty()) m = std::max(m, st.max[i]);
    T acc = 0;
    if (m != -std::numeric_limits<T>::infinity())
      for (const auto& st : stats)
        if (!st.max.empty() && st.max[i] != -std::numeric_limits<T>::infinity())
          acc += st.acc[i] * std::exp(st.max[i] - m);
    neg_stat[i] = m + std::log(acc);  // -inf when the row has no negatives (B == 1)
  }
}

// ---- backward --------------------------------------------------------------------------------
// Overwrite a tile row of scores a with g = d(out)/d(a) / sqrt(D) (docs/design.md).
template <typename T>
void backward_row(const Problem<T>& p, int64_t i, int64_t c0, int64_t nc, T* row,
                  const T* grad_pos, T grad_neg, T grad_sumsq, T neg_stat) {
  int64_t lo, hi;
  p.positive_range(i, c0, nc, &lo, &hi);
  // Locals, and one loop per (clip, reduction) case: branch-free bodies that GCC vectorises.
  const T tclip = p.tclip, inv = T(1) / p.tclip, two_gsq = 2 * grad_sumsq, scale = p.scale;
  const auto dstat = [&](T s) {
    return p.reduction == NegReduction::kLogSumExp ? fast_exp(s - neg_stat)
                                                   : sigmoid(s, FastExp{});
  };
  auto negatives = [&](int64_t j0, int64_t j1) {
    if (p.clip) {
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        const T a = row[j];
        T t, dt;
        fast_tanh_dtanh(a * inv, &t, &dt);
        row[j] = (grad_neg * dstat(tclip * t) * dt + two_gsq * a) * scale;
      }
    } else {
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        const T a = row[j];
        row[j] = (grad_neg * dstat(a) + two_gsq * a) * scale;
      }
    }
  };
  negatives(0, lo);
  negatives(hi, nc);
  const T* gp = grad_pos + i * p.L + (c0 + lo - p.pos_idx[i] * p.L);
  for (int64_t j = lo; j < hi; ++j) {
    const T a = row[j];
    T t = 0, dt = 1;
    if (p.clip) fast_tanh_dtanh(a * inv, &t, &dt);
    row[j] = (gp[j - lo] * dt + two_gsq * a) * scale;
  }
}

template <typename T>
void nce_backward(const Problem<T>& p, const T* grad_pos, const T* grad_neg, T grad_sumsq,
                  const T* neg_stat, T* grad_src, T* grad_trg) {
  const int64_t n_col_blocks = (p.M + kColBlock - 1) / kColBlock;
  // d src sums over every column: each thread accumulates its own copy (O(threads * N * D)).
  std::vector<std::vector<T>> grad_src_parts(at::get_num_threads());
  at::parallel_for(0, n_col_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T>& gsrc = grad_src_parts[at::get_thread_num()];
    gsrc.assign(p.N * p.D, T(0));
    std::vector<T> tile(kRowBlock * kColBlock);
    for (int64_t cb = begin; cb < end; ++cb) {
      const int64_t c0 = cb * kColBlock, nc = std::min(kColBlock, p.M - c0);
      for (int64_t r0 = 0; r0 < p.N; r0 += kRowBlock) {
        const int64_t nr = std::min(kRowBlock, p.N - r0);
        T* g = tile.data();
        score_tile(p, r0, nr, c0, nc, g);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = r0 + r;
          backward_row(p, i, c0, nc, g + r * nc, grad_pos, grad_neg[i], grad_sumsq, neg_stat[i]);
        }
        // gsrc[r0:r0+nr] += g (nr x nc) @ trg_blk (nc x D)   [column-major: D x nr]
        gemm(false, false, p.D, nr, nc, T(1), p.trg + c0 * p.D, p.D, g, nc, T(1),
             gsrc.data() + r0 * p.D, p.D);
        // grad_trg[c0:c0+nc] (+)= g^T (nc x nr) @ src_blk (nr x D)   [column-major: D x nc]
        gemm(false, true, p.D, nc, nr, T(1), p.src + r0 * p.D, p.D, g, nc, r0 == 0 ? T(0) : T(1),
             grad_trg + c0 * p.D, p.D);
      }
    }
  });
  std::fill(grad_src, grad_src + p.N * p.D, T(0));
  for (const auto& part : grad_src_parts) {
    if (part.empty()) continue;
    at::parallel_for(0, p.N * p.D, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) grad_src[k] += part[k];
    });
  }
}

// ---- torch bindings --------------------------------------------------------------------------
void check_inputs(const at::Tensor& src, const at::Tensor& trg, const at::Tensor& pos_idx) {
  TORCH_CHECK(src.dim() == 2, "src must be 2-D (N, D), got ", src.sizes());
  TORCH_CHECK(trg.dim() == 3, "trg must be 3-D (B, L, D), got ", trg.sizes());
  TORCH_CHECK(src.size(1) == trg.size(2), "src and trg must share D, got ", src.sizes(), " and ",
              trg.sizes());
  TORCH_CHECK(src.scalar_type() == trg.scalar_type(), "src and trg must share a dtype");
  TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == at::kDouble,
              "the CPU kernels take float32 or float64 (fused_nce_loss upcasts fp16/bf16), got ",
              src.scalar_type());
  TORCH_CHECK(pos_idx.scalar_type() == at::kLong && pos_idx.dim() == 1 &&
                  pos_idx.size(0) == src.size(0),
              "pos_idx must be int64 of shape (N,)");
}

template <typename T>
Problem<T> make_problem(const at::Tensor& src, const at::Tensor& trg, const at::Tensor& pos_idx,
                        std::optional<double> tclip, c10::string_view neg_reduction) {
  Problem<T> p;
  p.src = src.data_ptr<T>();
  p.trg = trg.data_ptr<T>();
  p.pos_idx = pos_idx.data_ptr<int64_t>();
  p.N = src.size(0);
  p.L = trg.size(1);
  p.M = trg.size(0) * p.L;
  p.D = src.size(1);
  p.scale = T(1) / std::sqrt(static_cast<T>(p.D));
  p.clip = tclip.has_value();
  p.tclip = static_cast<T>(tclip.value_or(1.0));
  p.reduction = neg_reduction_arg(neg_reduction);
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nce_fwd_cpu(const at::Tensor& src_in,
                                                           const at::Tensor& trg_in,
                                                           const at::Tensor& pos_idx_in,
                                                           std::optional<double> tclip,
                                                           c10::string_view neg_reduction) {
  check_inputs(src_in, trg_in, pos_idx_in);
  const at::Tensor src = src_in.contiguous(), trg = trg_in.contiguous();
  const at::Tensor pos_idx = pos_idx_in.contiguous();
  const int64_t n = src.size(0), l = trg.size(1);
  at::Tensor pos = at::empty({n, l}, src.options());
  at::Tensor neg_stat = at::empty({n}, src.options());
  at::Tensor sumsq = at::empty({}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "nce_fwd_cpu", [&] {
    const auto p = make_problem<scalar_t>(src, trg, pos_idx, tclip, neg_reduction);
    nce_forward(p, pos.data_ptr<scalar_t>(), neg_stat.data_ptr<scalar_t>(),
                sumsq.data_ptr<scalar_t>());
  });
  return {pos, neg_stat, sumsq};
}

std::tuple<at::Tensor, at::Tensor> nce_bwd_cpu(const at::Tensor& grad_pos,
                                               const at::Tensor& grad_neg_stat,
                                               const at::Tensor& grad_sumsq,
                                               const at::Tensor& src_in, const at::Tensor& trg_in,
                                               const at::Tensor& pos_idx_in,
                                               const at::Tensor& neg_stat,
                                               std::optional<double> tclip,
                                               c10::string_view neg_reduction) {
  check_inputs(src_in, trg_in, pos_idx_in);
  const at::Tensor src = src_in.contiguous(), trg = trg_in.contiguous();
  const at::Tensor pos_idx = pos_idx_in.contiguous();
  const int64_t n = src.size(0), l = trg.size(1);
  TORCH_CHECK(grad_pos.sizes() == at::IntArrayRef({n, l}), "grad_pos must be (N, L)");
  TORCH_CHECK(grad_neg_stat.sizes() == at::IntArrayRef({n}) &&
                  neg_stat.sizes() == at::IntArrayRef({n}),
              "grad_neg_stat and neg_stat must be (N,)");
  TORCH_CHECK(grad_sumsq.numel() == 1, "grad_sumsq must be a scalar tensor");
  const auto opts = src.options();
  const at::Tensor gp = grad_pos.to(opts).contiguous();
  const at::Tensor gn = grad_neg_stat.to(opts).contiguous();
  const at::Tensor ns = neg_stat.to(opts).contiguous();
  at::Tensor grad_src = at::empty_like(src);
  at::Tensor grad_trg = at::empty_like(trg);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "nce_bwd_cpu", [&] {
    const auto p = make_problem<scalar_t>(src, trg, pos_idx, tclip, neg_reduction);
    nce_backward(p, gp.data_ptr<scalar_t>(), gn.data_ptr<scalar_t>(),
                 static_cast<scalar_t>(grad_sumsq.item<double>()), ns.data_ptr<scalar_t>(),
                 grad_src.data_ptr<scalar_t>(), grad_trg.data_ptr<scalar_t>());
  });
  return {grad_src, grad_trg};
}

}  // namespace

TORCH_LIBRARY(amdim_kernels, m) {
  m.def("nce_fwd(Tensor src, Tensor trg, Tensor pos_idx, float? tclip, str neg_reduction)"
        " -> (Tensor pos, Tensor neg_stat, Tensor sumsq)");
  m.def("nce_bwd(Tensor grad_pos, Tensor grad_neg_stat, Tensor grad_sumsq, Tensor src,"
        " Tensor trg, Tensor pos_idx, Tensor neg_stat, float? tclip, str neg_reduction)"
        " -> (Tensor grad_src, Tensor grad_trg)");
}

TORCH_LIBRARY_IMPL(amdim_kernels, CPU, m) {
  m.impl("nce_fwd", &nce_fwd_cpu);
  m.impl("nce_bwd", &nce_bwd_cpu);
}

}  // namespace amdim_kernels
