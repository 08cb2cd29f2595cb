// Fused AMDIM NCE statistics: the op schema (TORCH_LIBRARY) and its CPU kernels.
//
// nce_fwd reduces the N x M score matrix a = src @ trg_flat^T / sqrt(D) to (pos, neg_stat, sumsq)
// and nce_bwd turns their upstream gradients into d src and d trg (docs/design.md has the math).
// Both walk the score matrix in kRowBlock x kColBlock tiles that live in a per-thread buffer, so
// nothing of size N x M is ever allocated: a BLAS product makes a tile, the epilogue for this
// CPU's instruction set (epilogue.h, chosen once by epilogue<T>()) turns it into statistics or
// gradients. Work is split over columns, in equal ranges per thread: each thread owns its columns
// of d trg outright and keeps private per-row statistics (forward) or a private d src (backward),
// merged once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "nce_cpu.h"
#include "torch_common.h"

namespace amdim_kernels {
namespace {

// ---- the epilogue for this CPU ---------------------------------------------------------------
// Chosen once, from torch's own CPU capability (so ATEN_CPU_CAPABILITY=default|avx2|avx512 picks
// ours as it picks ATen's kernels).
template <typename T>
const Epilogue<T>& epilogue_for(const std::string& capability) {
#if AMDIM_X86_EPILOGUES
  if (capability == "AVX512") return AVX512::epilogue<T>();
  if (capability == "AVX2") return AVX2::epilogue<T>();
#endif
  return DEFAULT::epilogue<T>();
}

template <typename T>
const Epilogue<T>& epilogue() {
  static const Epilogue<T>& chosen = epilogue_for<T>(at::get_cpu_capability());
  return chosen;
}

std::string cpu_epilogue_isa() { return epilogue<float>().isa; }

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

// ---- score tiles and threads ------------------------------------------------------------------
// tile[r, c] = <src[r0 + r], trg[c0 + c]> / sqrt(D), row-major with leading dimension nc.
template <typename T>
void score_tile(const Problem<T>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* tile) {
  // column-major: tile^T (nc x nr) = trg_blk (nc x D) @ src_blk^T (D x nr)
  gemm(true, false, nc, nr, p.D, p.scale, p.trg + c0 * p.D, p.D, p.src + r0 * p.D, p.D, T(0), tile,
       nc);
}

// Runs body(t, c0, nc) for every column block: thread t of `threads` takes the blocks of the t-th
// of equal column ranges (multiples of 16 columns), so threads finish together and the results,
// merged in thread order, do not depend on the timing of the threads.
template <typename Body>
void for_each_column_block(int64_t M, int64_t threads, const Body& body) {
  const auto boundary = [&](int64_t t) { return t == threads ? M : (M * t / threads) / 16 * 16; };
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t c0 = boundary(t), c1 = boundary(t + 1); c0 < c1; c0 += kColBlock)
        body(t, c0, std::min(kColBlock, c1 - c0));
  });
}

// ---- forward ---------------------------------------------------------------------------------
// Per-thread, per-row running statistic of the negatives: (running max, sum of exp(s - max)) for
// logsumexp, (unused, sum of softplus(s)) for softplus_sum.
template <typename T>
struct RowStats {
  std::vector<T> max, acc;
  double sumsq = 0.0;
};

template <typename T>
void nce_forward(const Problem<T>& p, T* pos_out, T* neg_stat, T* sumsq_out) {
  const Epilogue<T>& ep = epilogue<T>();
  const int64_t threads = at::get_num_threads();
  std::vector<RowStats<T>> stats(threads);
  std::vector<std::vector<T>> tiles(threads);
  for_each_column_block(p.M, threads, [&](int64_t t, int64_t c0, int64_t nc) {
    RowStats<T>& st = stats[t];
    if (st.max.empty()) {
      st.max.assign(p.N, -std::numeric_limits<T>::infinity());
      st.acc.assign(p.N, T(0));
      tiles[t].resize(kRowBlock * kColBlock);
    }
    T* tile = tiles[t].data();
    for (int64_t r0 = 0; r0 < p.N; r0 += kRowBlock) {
      const int64_t nr = std::min(kRowBlock, p.N - r0);
      score_tile(p, r0, nr, c0, nc, tile);
      ep.forward(p, r0, nr, c0, nc, tile, pos_out, st.max.data(), st.acc.data(), &st.sumsq);
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
template <typename T>
void nce_backward(const Problem<T>& p, const T* grad_pos, const T* grad_neg, T grad_sumsq,
                  const T* neg_stat, T* grad_src, T* grad_trg) {
  const Epilogue<T>& ep = epilogue<T>();
  const int64_t threads = at::get_num_threads();
  // d src sums over every column: thread 0 accumulates into grad_src, every other thread that
  // gets work into its own copy (O((threads - 1) * N * D)).
  std::fill(grad_src, grad_src + p.N * p.D, T(0));
  std::vector<std::vector<T>> grad_src_parts(threads), tiles(threads);
  for_each_column_block(p.M, threads, [&](int64_t t, int64_t c0, int64_t nc) {
    if (tiles[t].empty()) {
      tiles[t].resize(kRowBlock * kColBlock);
      if (t > 0) grad_src_parts[t].assign(p.N * p.D, T(0));
    }
    T* gsrc = t == 0 ? grad_src : grad_src_parts[t].data();
    T* g = tiles[t].data();
    for (int64_t r0 = 0; r0 < p.N; r0 += kRowBlock) {
      const int64_t nr = std::min(kRowBlock, p.N - r0);
      score_tile(p, r0, nr, c0, nc, g);
      ep.backward(p, r0, nr, c0, nc, g, grad_pos, grad_neg, grad_sumsq, neg_stat);
      // gsrc[r0:r0+nr] += g (nr x nc) @ trg_blk (nc x D)   [column-major: D x nr]
      gemm(false, false, p.D, nr, nc, T(1), p.trg + c0 * p.D, p.D, g, nc, T(1), gsrc + r0 * p.D,
           p.D);
      // grad_trg[c0:c0+nc] (+)= g^T (nc x nr) @ src_blk (nr x D)   [column-major: D x nc]
      gemm(false, true, p.D, nc, nr, T(1), p.src + r0 * p.D, p.D, g, nc, r0 == 0 ? T(0) : T(1),
           grad_trg + c0 * p.D, p.D);
    }
  });
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
  // Which instruction set the CPU kernels' epilogues were compiled for: DEFAULT, AVX2 or AVX512.
  m.def("cpu_epilogue_isa() -> str", &cpu_epilogue_isa);
}

TORCH_LIBRARY_IMPL(amdim_kernels, CPU, m) {
  m.impl("nce_fwd", &nce_fwd_cpu);
  m.impl("nce_bwd", &nce_bwd_cpu);
}

}  // namespace amdim_kernels
