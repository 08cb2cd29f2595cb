// What the CPU NCE kernels share between nce.cpp (tiles, products, threads: one build for every
// CPU) and the score-tile epilogues (epilogue.h, compiled once per instruction set by
// epilogue_default.cpp, epilogue_avx2.cpp and epilogue_avx512.cpp). Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace amdim_kernels {

// A score tile is kRowBlock x kColBlock at most, row-major, in a per-thread buffer.
constexpr int64_t kRowBlock = 128;
constexpr int64_t kColBlock = 256;

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

// The epilogue of one score tile (rows r0 .. r0 + nr, columns c0 .. c0 + nc, leading dimension nc)
// for one instruction set.
template <typename T>
struct Epilogue {
  // Folds the tile of scores a into the rows' statistics: the positives s go to pos (N x L), the
  // sum of a^2 is added to *sumsq, and the negatives' running (max, sum of exp(s - max)) pair
  // (logsumexp) or their softplus sum (softplus_sum, in row_acc) is updated. The tile is
  // overwritten with s.
  // keep_scores: the tile keeps the scores a instead (nce_fwd_grad forms g from them later).
  void (*forward)(const Problem<T>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* tile,
                  T* pos, T* row_max, T* row_acc, double* sumsq, bool keep_scores);
  // Overwrites the tile of scores a with g = d(out)/d(a) / sqrt(D) (docs/design.md).
  void (*backward)(const Problem<T>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* tile,
                   const T* grad_pos, const T* grad_neg, T grad_sumsq, const T* neg_stat);
  // softplus_sum only (the JSD loss, whose gradient needs no row statistic): forward's statistics
  // and, in the same pass, the tile overwritten with g = d(loss + lgt_reg)/d(a) / sqrt(D) for
  // loss = pos_coef * sum softplus(-pos) + neg_coef * sum neg_stat, lgt_reg = grad_sumsq * sumsq.
  void (*softplus_grad)(const Problem<T>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                        T* tile, T* pos, T* row_acc, double* sumsq, T pos_coef, T neg_coef,
                        T grad_sumsq);
  const char* isa;  // the instruction set it was compiled for
};

// One pair of epilogues (float, double) per instruction set, in namespaces named as ATen's
// CPU_CAPABILITY.
// The AVX2 and AVX-512 ones exist where the compiler can target them from any flags (GCC on
// x86-64: #pragma GCC target), so that the portable ahead-of-time build has them too.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AMDIM_X86_EPILOGUES 1
#else
#define AMDIM_X86_EPILOGUES 0
#endif

#define AMDIM_STRINGIFY_(x) #x
#define AMDIM_STRINGIFY(x) AMDIM_STRINGIFY_(x)

#define AMDIM_DECLARE_EPILOGUES(ISA) \
  namespace ISA {                    \
  template <typename T>              \
  const Epilogue<T>& epilogue();     \
  }
AMDIM_DECLARE_EPILOGUES(DEFAULT)
#if AMDIM_X86_EPILOGUES
AMDIM_DECLARE_EPILOGUES(AVX2)
AMDIM_DECLARE_EPILOGUES(AVX512)
#endif
#undef AMDIM_DECLARE_EPILOGUES

}  // namespace amdim_kernels
