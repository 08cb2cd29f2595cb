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
#include <memory>
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

// Thread t of `threads` owns the t-th of equal column ranges (multiples of 16 columns), so threads
// finish together and the results, merged in thread order, do not depend on their timing.
int64_t column_boundary(int64_t M, int64_t threads, int64_t t) {
  return t == threads ? M : (M * t / threads) / 16 * 16;
}

// Runs body(t, c0, nc) for every column block of every thread's range.
template <typename Body>
void for_each_column_block(int64_t M, int64_t threads, const Body& body) {
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t c0 = column_boundary(M, threads, t), c1 = column_boundary(M, threads, t + 1);
           c0 < c1; c0 += kColBlock)
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

// The statistics of row i, merged over the threads in thread order (threads that got no work
// have empty vectors).
template <typename T>
T merged_neg_stat(const Problem<T>& p, const std::vector<RowStats<T>>& stats, int64_t i) {
  if (p.reduction == NegReduction::kSoftplusSum) {
    T acc = 0;
    for (const auto& st : stats)
      if (!st.acc.empty()) acc += st.acc[i];
    return acc;
  }
  T m = -std::numeric_limits<T>::infinity();
  for (const auto& st : stats)
    if (!st.max.empty()) m = std::max(m, st.max[i]);
  T acc = 0;
  if (m != -std::numeric_limits<T>::infinity())
    for (const auto& st : stats)
      if (!st.max.empty() && st.max[i] != -std::numeric_limits<T>::infinity())
        acc += st.acc[i] * std::exp(st.max[i] - m);
  return m + std::log(acc);  // -inf when the row has no negatives (B == 1)
}

template <typename T>
T merged_sumsq(const std::vector<RowStats<T>>& stats) {
  double sumsq = 0.0;
  for (const auto& st : stats) sumsq += st.sumsq;
  return static_cast<T>(sumsq);
}

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
      ep.forward(p, r0, nr, c0, nc, tile, pos_out, st.max.data(), st.acc.data(), &st.sumsq,
                 false);
    }
  });
  *sumsq_out = merged_sumsq(stats);
  for (int64_t i = 0; i < p.N; ++i) neg_stat[i] = merged_neg_stat(p, stats, i);
}

// ---- backward --------------------------------------------------------------------------------
// The gradient products of a tile g of rows r0 .. r0 + nr and columns c0 .. c0 + nc:
// gsrc_rows (nr x D, row r0's) (+)= g @ trg_blk, gtrg_cols (nc x D, column c0's) (+)= g^T @ src_blk
// (beta 0 overwrites, 1 adds).
template <typename T>
void gradient_products(const Problem<T>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                       const T* g, T* gsrc_rows, T gsrc_beta, T* gtrg_cols, T gtrg_beta) {
  // column-major: D x nr = trg_blk^T (D x nc) @ g^T (nc x nr)
  gemm(false, false, p.D, nr, nc, T(1), p.trg + c0 * p.D, p.D, g, nc, gsrc_beta, gsrc_rows, p.D);
  // column-major: D x nc = src_blk^T (D x nr) @ g (nr x nc)
  gemm(false, true, p.D, nc, nr, T(1), p.src + r0 * p.D, p.D, g, nc, gtrg_beta, gtrg_cols, p.D);
}

// d src sums over every column: thread 0 accumulates into grad_src, every other thread that gets
// work into its own copy (O((threads - 1) * N * D)), added in thread order at the end.
template <typename T>
struct GradSrcParts {
  T* grad_src;
  int64_t size;
  std::vector<std::vector<T>> parts;

  GradSrcParts(T* out, int64_t n, int64_t threads) : grad_src(out), size(n), parts(threads) {
    std::fill(out, out + n, T(0));
  }
  T* of(int64_t t) {  // called once per column block, from thread t only
    if (t == 0) return grad_src;
    if (parts[t].empty()) parts[t].assign(size, T(0));
    return parts[t].data();
  }
  void merge() {
    for (const auto& part : parts) {
      if (part.empty()) continue;
      at::parallel_for(0, size, 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) grad_src[k] += part[k];
      });
    }
  }
};

template <typename T>
void nce_backward(const Problem<T>& p, const T* grad_pos, const T* grad_neg, T grad_sumsq,
                  const T* neg_stat, T* grad_src, T* grad_trg) {
  const Epilogue<T>& ep = epilogue<T>();
  const int64_t threads = at::get_num_threads();
  GradSrcParts<T> gsrc(grad_src, p.N * p.D, threads);
  std::vector<std::vector<T>> tiles(threads);
  for_each_column_block(p.M, threads, [&](int64_t t, int64_t c0, int64_t nc) {
    if (tiles[t].empty()) tiles[t].resize(kRowBlock * kColBlock);
    T* g = tiles[t].data();
    T* gs = gsrc.of(t);
    for (int64_t r0 = 0; r0 < p.N; r0 += kRowBlock) {
      const int64_t nr = std::min(kRowBlock, p.N - r0);
      score_tile(p, r0, nr, c0, nc, g);
      ep.backward(p, r0, nr, c0, nc, g, grad_pos, grad_neg, grad_sumsq, neg_stat);
      gradient_products(p, r0, nr, c0, nc, g, gs + r0 * p.D, T(1), grad_trg + c0 * p.D,
                        r0 == 0 ? T(0) : T(1));
    }
  });
  gsrc.merge();
}

// ---- forward with the gradient (nce_fwd_grad) ------------------------------------------------
// When a backward will follow, the forward forms d(loss + lgt_reg)/d(src, trg) from the score
// tiles it makes anyway: three products in all where nce_fwd + nce_bwd make four (docs/design.md).
//
// The loss's gradient with respect to pos and neg_stat (estimator_loss of amdim_kernels/nce.py),
// times the upstream gradient gl:
//   nce: grad_pos[i, l] = -w[i, l], grad_neg_stat[i] = sum_l w[i, l],
//        w[i, l] = gl * pos_coef * sigmoid(neg_stat[i] - pos[i, l]);
//   jsd: grad_pos[i, l] = -gl * pos_coef * sigmoid(-pos[i, l]), grad_neg_stat[i] = gl * neg_coef;
// with pos_coef = 1 / (N L), neg_coef = 1 / (N (B - 1) L) (1 when B == 1); and lgt_reg's
// gradient with respect to sumsq is sumsq_coef = reg_weight / (N M).
template <typename T>
struct LossGrad {
  bool nce;  // else jsd
  T pos_coef, neg_coef, sumsq_coef;

  LossGrad(bool is_nce, int64_t N, int64_t B, int64_t L, double reg_weight) : nce(is_nce) {
    const double nl = double(N) * L;
    pos_coef = static_cast<T>(1.0 / nl);
    neg_coef = static_cast<T>(1.0 / std::max(nl * (B - 1), 1.0));
    sumsq_coef = static_cast<T>(reg_weight / (nl * B));
  }

  // grad_pos and grad_neg_stat of rows r0 .. r1 - 1.
  void rows(const Problem<T>& p, int64_t r0, int64_t r1, const T* pos, const T* neg_stat, T gl,
            T* grad_pos, T* grad_neg) const {
    const T c = gl * pos_coef;
    for (int64_t i = r0; i < r1; ++i) {
      T w_sum = 0;
      for (int64_t k = i * p.L; k < (i + 1) * p.L; ++k) {
        const T w = c * sigmoid(nce ? neg_stat[i] - pos[k] : -pos[k], StdExp());
        grad_pos[k] = -w;
        w_sum += w;
      }
      grad_neg[i] = nce ? w_sum : gl * neg_coef;
    }
  }
};

// JSD: no row statistic, so each tile's g is known with the tile (the backward's loop order).
template <typename T>
void softplus_forward_grad(const Problem<T>& p, const LossGrad<T>& lg, T* pos_out, T* neg_stat,
                           T* sumsq_out, T* grad_src, T* grad_trg) {
  const Epilogue<T>& ep = epilogue<T>();
  const int64_t threads = at::get_num_threads();
  std::vector<RowStats<T>> stats(threads);
  std::vector<std::vector<T>> tiles(threads);
  GradSrcParts<T> gsrc(grad_src, p.N * p.D, threads);
  for_each_column_block(p.M, threads, [&](int64_t t, int64_t c0, int64_t nc) {
    RowStats<T>& st = stats[t];
    if (tiles[t].empty()) {
      tiles[t].resize(kRowBlock * kColBlock);
      st.acc.assign(p.N, T(0));
    }
    T* g = tiles[t].data();
    T* gs = gsrc.of(t);
    for (int64_t r0 = 0; r0 < p.N; r0 += kRowBlock) {
      const int64_t nr = std::min(kRowBlock, p.N - r0);
      score_tile(p, r0, nr, c0, nc, g);
      ep.softplus_grad(p, r0, nr, c0, nc, g, pos_out, st.acc.data(), &st.sumsq, lg.pos_coef,
                       lg.neg_coef, lg.sumsq_coef);
      gradient_products(p, r0, nr, c0, nc, g, gs + r0 * p.D, T(1), grad_trg + c0 * p.D,
                        r0 == 0 ? T(0) : T(1));
    }
  });
  gsrc.merge();
  *sumsq_out = merged_sumsq(stats);
  for (int64_t i = 0; i < p.N; ++i) neg_stat[i] = merged_neg_stat(p, stats, i);
}

// NCE: g needs each row's final logsumexp. Rows are taken `rows` at a time across all M columns,
// each thread making the score tiles of its columns and keeping them (rows x M floats in all);
// once the block's statistics are merged, each thread turns its kept tiles into g and runs both
// products: its columns of d trg are its own, its part of the block's d src (rows x D) is added
// to the others' in thread order.
template <typename T>
void logsumexp_forward_grad(const Problem<T>& p, const LossGrad<T>& lg, int64_t rows, T* pos_out,
                            T* neg_stat, T* sumsq_out, T* grad_src, T* grad_trg) {
  const Epilogue<T>& ep = epilogue<T>();
  const int64_t threads = at::get_num_threads();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<RowStats<T>> stats(threads);
  std::vector<std::unique_ptr<T[]>> kept(threads);
  std::vector<std::vector<T>> gsrc_part(threads, std::vector<T>(rows * p.D, T(0)));
  for (int64_t t = 0; t < threads; ++t) {
    stats[t].max.assign(p.N, neg_inf);
    stats[t].acc.assign(p.N, T(0));
    const int64_t cols = column_boundary(p.M, threads, t + 1) - column_boundary(p.M, threads, t);
    kept[t].reset(new T[(cols + kColBlock - 1) / kColBlock * rows * kColBlock]);
  }
  const auto kept_tile = [&](int64_t t, int64_t c0) {
    return kept[t].get() + (c0 - column_boundary(p.M, threads, t)) / kColBlock * rows * kColBlock;
  };
  std::vector<T> grad_pos(p.N * p.L), grad_neg(p.N);
  for (int64_t r0 = 0; r0 < p.N; r0 += rows) {
    const int64_t nr = std::min(rows, p.N - r0);
    for_each_column_block(p.M, threads, [&](int64_t t, int64_t c0, int64_t nc) {
      RowStats<T>& st = stats[t];
      T* tile = kept_tile(t, c0);
      score_tile(p, r0, nr, c0, nc, tile);
      ep.forward(p, r0, nr, c0, nc, tile, pos_out, st.max.data(), st.acc.data(), &st.sumsq, true);
    });
    for (int64_t i = r0; i < r0 + nr; ++i) neg_stat[i] = merged_neg_stat(p, stats, i);
    lg.rows(p, r0, r0 + nr, pos_out, neg_stat, T(1), grad_pos.data(), grad_neg.data());
    for_each_column_block(p.M, threads, [&](int64_t t, int64_t c0, int64_t nc) {
      T* g = kept_tile(t, c0);
      ep.backward(p, r0, nr, c0, nc, g, grad_pos.data(), grad_neg.data(), lg.sumsq_coef, neg_stat);
      const bool first = c0 == column_boundary(p.M, threads, t);
      gradient_products(p, r0, nr, c0, nc, g, gsrc_part[t].data(), first ? T(0) : T(1),
                        grad_trg + c0 * p.D, r0 == 0 ? T(0) : T(1));
    });
    T* out = grad_src + r0 * p.D;  // a thread without columns left its part 0
    std::fill(out, out + nr * p.D, T(0));
    for (const auto& part : gsrc_part)
      for (int64_t k = 0; k < nr * p.D; ++k) out[k] += part[k];
  }
  *sumsq_out = merged_sumsq(stats);
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
  at::Tensor pos = at::zeros({n, l}, src.options());  // rows without positives read 0s, not garbage
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

// Rows per block of logsumexp_forward_grad: 128 (the tile height, at which the products run at
// full rate; measured in benchmarks/NOTES.md), fewer where 128 rows x M would keep more than
// kKeptBytes, and never fewer than 16 (16 rows x M floats are at most 16 / D of d trg's bytes).
constexpr int64_t kKeptBytes = int64_t(32) << 20;

int64_t kept_rows(int64_t M, int64_t element_size) {
  const int64_t padded = (M + kColBlock - 1) / kColBlock * kColBlock;
  return std::clamp<int64_t>(kKeptBytes / (padded * element_size) / 16 * 16, 16, kRowBlock);
}

bool is_nce_estimator(c10::string_view name) {
  const std::string estimator(name.data(), name.size());
  TORCH_CHECK(estimator == "nce" || estimator == "jsd",
              "estimator must be 'nce' or 'jsd' (the DV loss needs a statistic of all rows: "
              "nce_fwd and nce_bwd), got '", estimator, "'");
  return estimator == "nce";
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nce_fwd_grad_cpu(
    const at::Tensor& src_in, const at::Tensor& trg_in, const at::Tensor& pos_idx_in,
    std::optional<double> tclip, double reg_weight, c10::string_view estimator) {
  check_inputs(src_in, trg_in, pos_idx_in);
  const bool nce = is_nce_estimator(estimator);
  const at::Tensor src = src_in.contiguous(), trg = trg_in.contiguous();
  const at::Tensor pos_idx = pos_idx_in.contiguous();
  const int64_t n = src.size(0), b = trg.size(0), l = trg.size(1);
  at::Tensor pos = at::zeros({n, l}, src.options());  // rows without positives read 0s, not garbage
  at::Tensor neg_stat = at::empty({n}, src.options());
  at::Tensor sumsq = at::empty({}, src.options());
  at::Tensor grad_src = at::empty_like(src);
  at::Tensor grad_trg = at::empty_like(trg);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "nce_fwd_grad_cpu", [&] {
    const auto p = make_problem<scalar_t>(src, trg, pos_idx, tclip,
                                          nce ? "logsumexp" : "softplus_sum");
    const LossGrad<scalar_t> lg(nce, n, b, l, reg_weight);
    scalar_t* out[] = {pos.data_ptr<scalar_t>(), neg_stat.data_ptr<scalar_t>(),
                       sumsq.data_ptr<scalar_t>(), grad_src.data_ptr<scalar_t>(),
                       grad_trg.data_ptr<scalar_t>()};
    if (nce)
      logsumexp_forward_grad(p, lg, kept_rows(p.M, src.element_size()), out[0], out[1], out[2],
                             out[3], out[4]);
    else
      softplus_forward_grad(p, lg, out[0], out[1], out[2], out[3], out[4]);
  });
  return {pos, neg_stat, sumsq, grad_src, grad_trg};
}

// The gradient of grad_loss * loss + grad_reg * lgt_reg from nce_fwd_grad's outputs: its
// gradient (that of loss + lgt_reg) times grad_loss where that is the same (grad_reg ==
// grad_loss, or no regulariser); otherwise formed anew as nce_bwd forms it (three products: the
// forward could not know the weights).
std::tuple<at::Tensor, at::Tensor> nce_fwd_grad_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& grad_reg, const at::Tensor& grad_src,
    const at::Tensor& grad_trg, const at::Tensor& src_in, const at::Tensor& trg_in,
    const at::Tensor& pos_idx_in, const at::Tensor& pos_in, const at::Tensor& neg_stat_in,
    std::optional<double> tclip, double reg_weight, c10::string_view estimator) {
  check_inputs(src_in, trg_in, pos_idx_in);
  const bool nce = is_nce_estimator(estimator);
  const int64_t n = src_in.size(0), b = trg_in.size(0), l = trg_in.size(1);
  TORCH_CHECK(grad_loss.numel() == 1 && grad_reg.numel() == 1,
              "grad_loss and grad_reg must be scalar tensors");
  TORCH_CHECK(grad_src.sizes() == src_in.sizes() && grad_trg.sizes() == trg_in.sizes(),
              "grad_src and grad_trg must have the shapes of src and trg");
  TORCH_CHECK(pos_in.sizes() == at::IntArrayRef({n, l}) && neg_stat_in.sizes() == at::IntArrayRef({n}),
              "pos must be (N, L) and neg_stat (N,)");
  const double gl = grad_loss.item<double>(), gr = grad_reg.item<double>();
  if (reg_weight == 0.0 || gr == gl) return {grad_src * gl, grad_trg * gl};
  const at::Tensor src = src_in.contiguous(), trg = trg_in.contiguous();
  const at::Tensor pos_idx = pos_idx_in.contiguous();
  const at::Tensor pos = pos_in.to(src.options()).contiguous();
  const at::Tensor neg_stat = neg_stat_in.to(src.options()).contiguous();
  at::Tensor out_src = at::empty_like(src), out_trg = at::empty_like(trg);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "nce_fwd_grad_backward_cpu", [&] {
    const auto p = make_problem<scalar_t>(src, trg, pos_idx, tclip,
                                          nce ? "logsumexp" : "softplus_sum");
    const LossGrad<scalar_t> lg(nce, n, b, l, reg_weight);
    std::vector<scalar_t> gp(n * l), gn(n);
    lg.rows(p, 0, n, pos.data_ptr<scalar_t>(), neg_stat.data_ptr<scalar_t>(),
            static_cast<scalar_t>(gl), gp.data(), gn.data());
    nce_backward(p, gp.data(), gn.data(), static_cast<scalar_t>(gr) * lg.sumsq_coef,
                 neg_stat.data_ptr<scalar_t>(), out_src.data_ptr<scalar_t>(),
                 out_trg.data_ptr<scalar_t>());
  });
  return {out_src, out_trg};
}

}  // namespace

TORCH_LIBRARY(amdim_kernels, m) {
  m.def("nce_fwd(Tensor src, Tensor trg, Tensor pos_idx, float? tclip, str neg_reduction)"
        " -> (Tensor pos, Tensor neg_stat, Tensor sumsq)");
  m.def("nce_bwd(Tensor grad_pos, Tensor grad_neg_stat, Tensor grad_sumsq, Tensor src,"
        " Tensor trg, Tensor pos_idx, Tensor neg_stat, float? tclip, str neg_reduction)"
        " -> (Tensor grad_src, Tensor grad_trg)");
  m.def("nce_fwd_grad(Tensor src, Tensor trg, Tensor pos_idx, float? tclip, float reg_weight,"
        " str estimator) -> (Tensor pos, Tensor neg_stat, Tensor sumsq, Tensor grad_src,"
        " Tensor grad_trg)");
  m.def("nce_fwd_grad_backward(Tensor grad_loss, Tensor grad_reg, Tensor grad_src,"
        " Tensor grad_trg, Tensor src, Tensor trg, Tensor pos_idx, Tensor pos, Tensor neg_stat,"
        " float? tclip, float reg_weight, str estimator) -> (Tensor grad_src, Tensor grad_trg)");
  // Which instruction set the CPU kernels' epilogues were compiled for: DEFAULT, AVX2 or AVX512.
  m.def("cpu_epilogue_isa() -> str", &cpu_epilogue_isa);
}

TORCH_LIBRARY_IMPL(amdim_kernels, CPU, m) {
  m.impl("nce_fwd", &nce_fwd_cpu);
  m.impl("nce_bwd", &nce_bwd_cpu);
  m.impl("nce_fwd_grad", &nce_fwd_grad_cpu);
  m.impl("nce_fwd_grad_backward", &nce_fwd_grad_backward_cpu);
}

}  // namespace amdim_kernels
