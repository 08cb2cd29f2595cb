// The score-tile epilogues of the CPU NCE kernels (nce_cpu.h), written once with ATen's
// at::vec::Vectorized<T> and compiled once per instruction set: epilogue_default.cpp,
// epilogue_avx2.cpp and epilogue_avx512.cpp define CPU_CAPABILITY (as ATen's own kernels do) and
// include this file, which puts everything in namespace amdim_kernels::CPU_CAPABILITY, so that the
// copies never share a symbol. nce.cpp picks one at run time (epilogue<T>()).
//
// float: exp is the Cephes polynomial (~1 ulp, inline) rather than ATen's Sleef exp (~1 ulp, an
// out-of-line call): the clipped forward's epilogue takes 15% less time with it on AVX-512
// (benchmarks/NOTES.md, benchmarks/cpu_epilogue_micro.cpp). tanh and its derivative are
// common.h's (the formula of every backend); log1p for the JSD softplus is Cephes logf's
// polynomial. float64, the checking path, takes Sleef's (or libm's) exp, tanh and log1p.
//
// Every row of a tile is one vector loop over its columns; a vector that holds positive columns or
// runs past the row takes a lane mask (the positives of a row are one run of L columns).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.h"
#include "nce_cpu.h"

namespace amdim_kernels {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// ---- elementwise math -----------------------------------------------------------------------
inline Vec<float> vexp(const Vec<float>& x_in) {  // Cephes expf; exp(-inf) gives ~1e-38, not 0
  const Vec<float> x = at::vec::clamp(x_in, Vec<float>(-87.33654f), Vec<float>(88.72283f));
  const Vec<float> k = at::vec::fmadd(x, Vec<float>(1.44269504088896341f), Vec<float>(0.5f)).floor();
  Vec<float> r = at::vec::fnmadd(k, Vec<float>(0.693359375f), x);  // x - k ln 2, in two parts
  r = at::vec::fmadd(k, Vec<float>(2.12194440e-4f), r);
  Vec<float> p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, Vec<float>(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec<float>(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec<float>(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec<float>(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec<float>(5.0000001201e-1f));
  p = at::vec::fmadd(p * r, r, r) + Vec<float>(1.0f);
  const auto two_k = (at::vec::convert_to_int_of_same_size(k) + at::vec::Vectorized<int32_t>(127))
                     << at::vec::Vectorized<int32_t>(23);
  return p * at::vec::cast<float>(two_k);
}

inline Vec<double> vexp(const Vec<double>& x) { return x.exp(); }

// log(1 + u) for u in [0, 1], from Cephes logf: 1 + u = 2^e (1 + f) with f in [sqrt(1/2) - 1,
// sqrt(2) - 1], f formed from u without rounding 1 + u.
inline Vec<float> vlog1p_unit(const Vec<float>& u) {
  const Vec<float> one(1.0f), half(0.5f);
  const Vec<float> big = u > Vec<float>(0.41421356237f);  // 1 + u > sqrt(2): e = 1
  const Vec<float> f = Vec<float>::blendv(u, (u - one) * half, big);
  const Vec<float> e = big & one;                          // 1.0 where big, else 0.0
  const Vec<float> z = f * f;
  Vec<float> y(7.0376836292e-2f);
  y = at::vec::fmadd(y, f, Vec<float>(-1.1514610310e-1f));
  y = at::vec::fmadd(y, f, Vec<float>(1.1676998740e-1f));
  y = at::vec::fmadd(y, f, Vec<float>(-1.2420140846e-1f));
  y = at::vec::fmadd(y, f, Vec<float>(1.4249322787e-1f));
  y = at::vec::fmadd(y, f, Vec<float>(-1.6668057665e-1f));
  y = at::vec::fmadd(y, f, Vec<float>(2.0000714765e-1f));
  y = at::vec::fmadd(y, f, Vec<float>(-2.4999993993e-1f));
  y = at::vec::fmadd(y, f, Vec<float>(3.3333331174e-1f));
  y = y * f * z;
  y = at::vec::fmadd(e, Vec<float>(-2.12194440e-4f), y);
  y = at::vec::fnmadd(z, half, y);
  return at::vec::fmadd(e, Vec<float>(0.693359375f), f + y);
}

inline Vec<double> vlog1p_unit(const Vec<double>& u) { return u.log1p(); }

// log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow, 0 for x = -inf.
template <typename T>
inline Vec<T> vsoftplus(const Vec<T>& x) {
  return at::vec::maximum(x, Vec<T>(0)) + vlog1p_unit(vexp(Vec<T>(0) - x.abs()));
}

// sigmoid(x) from e = exp(-|x|) <= 1 (common.h's sigmoid).
template <typename T>
inline Vec<T> vsigmoid(const Vec<T>& x) {
  const Vec<T> e = vexp(Vec<T>(0) - x.abs());
  return Vec<T>::blendv(e, Vec<T>(1), x >= Vec<T>(0)) / (Vec<T>(1) + e);
}

inline Vec<float> negate_where(const Vec<float>& v, const Vec<float>& mask) {
  return Vec<float>::blendv(v, Vec<float>(0.0f) - v, mask);
}

// tanh (common.h's float formula; Sleef's / libm's in float64).
inline Vec<float> vtanh(const Vec<float>& x) {
  const Vec<float> ax = x.abs();
  const Vec<float> e = vexp(Vec<float>(-2.0f) * ax);
  const Vec<float> big = (Vec<float>(1.0f) - e) / (Vec<float>(1.0f) + e);
  return Vec<float>::blendv(negate_where(big, x < Vec<float>(0.0f)), tanh_poly(x),
                            ax < Vec<float>(kTanhPolyLimit));
}

inline Vec<double> vtanh(const Vec<double>& x) { return x.tanh(); }

// tanh and 1 - tanh^2, the latter from e = exp(-2|x|): accurate in relative terms on saturated
// scores (common.h's tanh_dtanh_f).
inline void vtanh_dtanh(const Vec<float>& x, Vec<float>* t, Vec<float>* dt) {
  const Vec<float> one(1.0f);
  const Vec<float> ax = x.abs();
  const Vec<float> e = vexp(Vec<float>(-2.0f) * ax);
  const Vec<float> r = one / (one + e);
  const Vec<float> big = (one - e) * r;
  const Vec<float> small = tanh_poly(x);
  const Vec<float> is_small = ax < Vec<float>(kTanhPolyLimit);
  *t = Vec<float>::blendv(negate_where(big, x < Vec<float>(0.0f)), small, is_small);
  *dt = Vec<float>::blendv(Vec<float>(4.0f) * e * r * r, at::vec::fnmadd(small, small, one), is_small);
}

inline void vtanh_dtanh(const Vec<double>& x, Vec<double>* t, Vec<double>* dt) {
  const Vec<double> one(1.0), ax = x.abs();
  const Vec<double> e = vexp(Vec<double>(-2.0) * ax);
  *t = x.tanh();
  *dt = Vec<double>::blendv(Vec<double>(4.0) * e / ((one + e) * (one + e)), one - *t * *t,
                            ax < Vec<double>(0.625));
}

// ---- the lanes of a tile row ------------------------------------------------------------------
// Columns [lo, hi) of a row of nc columns are its positives; everything else below nc is negative.
template <typename T>
struct RowLanes {
  int64_t lo, hi, nc;
  static constexpr int64_t W = Vec<T>::size();

  // The vector at column j is full and holds no positive: no mask needed.
  bool plain(int64_t j) const { return j + W <= nc && (j + W <= lo || j >= hi); }
  static Vec<T> bound(int64_t c) { return Vec<T>(static_cast<T>(c)); }  // exact: c <= kColBlock
  static Vec<T> columns(int64_t j) { return Vec<T>::arange(static_cast<T>(j), static_cast<T>(1)); }
  Vec<T> negatives(int64_t j) const {  // all-ones lanes where column j + lane is a negative
    const Vec<T> c = columns(j);
    return ((c < bound(lo)) | (c >= bound(hi))) & (c < bound(nc));
  }
  Vec<T> positives(int64_t j) const {
    const Vec<T> c = columns(j);
    return (c >= bound(lo)) & (c < bound(hi));
  }
  Vec<T> load(const T* row, int64_t j) const {
    return j + W <= nc ? Vec<T>::loadu(row + j) : Vec<T>::loadu(row + j, nc - j);  // zeros past nc
  }
  void store(const Vec<T>& v, T* row, int64_t j) const {
    v.store(row + j, static_cast<int>(std::min<int64_t>(W, nc - j)));
  }
};

template <typename T>
inline T sum_lanes(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](const auto& a, const auto& b) { return a + b; }, v);
}

template <typename T>
inline T max_lanes(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>(
      [](const auto& a, const auto& b) { return at::vec::maximum(a, b); }, v);
}

// ---- forward ----------------------------------------------------------------------------------
template <typename T>
void forward_tile(const Problem<T>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* tile,
                  T* pos, T* row_max, T* row_acc, double* sumsq, bool keep_scores) {
  constexpr int64_t W = Vec<T>::size();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const Vec<T> tclip(p.tclip), inv(T(1) / p.tclip), zero(0), lowest(neg_inf);
  const bool lse = p.reduction == NegReduction::kLogSumExp;
  alignas(64) T kept_row[kColBlock];  // a row's s, where the tile keeps a
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r0 + r;
    T* row = tile + r * nc;
    T* srow = p.clip && keep_scores ? kept_row : row;  // where s goes (s is a without the clip)
    RowLanes<T> lanes{0, 0, nc};
    p.positive_range(i, c0, nc, &lanes.lo, &lanes.hi);
    // One pass: sum of a^2, the clip, and the negatives' max or softplus sum.
    Vec<T> sq(0), acc(0), vmax(lowest);
    for (int64_t j = 0; j < nc; j += W) {
      const Vec<T> a = lanes.load(row, j);
      sq = at::vec::fmadd(a, a, sq);  // zeros past nc
      const Vec<T> s = p.clip ? tclip * vtanh(a * inv) : a;
      if (p.clip) lanes.store(s, srow, j);
      const bool plain = lanes.plain(j);
      if (lse) {
        vmax = at::vec::maximum(vmax, plain ? s : Vec<T>::blendv(lowest, s, lanes.negatives(j)));
      } else {
        const Vec<T> sp = vsoftplus(s);
        acc = acc + (plain ? sp : Vec<T>::blendv(zero, sp, lanes.negatives(j)));
      }
    }
    *sumsq += static_cast<double>(sum_lanes(sq));
    if (lanes.hi > lanes.lo)
      std::copy(srow + lanes.lo, srow + lanes.hi, pos + i * p.L + (c0 + lanes.lo - p.pos_idx[i] * p.L));
    if (!lse) {
      row_acc[i] += sum_lanes(acc);
      continue;
    }
    if (lanes.lo == 0 && lanes.hi == nc) continue;  // all positives: nothing to fold
    const T m = std::max(row_max[i], max_lanes(vmax));
    if (m > row_max[i]) {
      row_acc[i] *= std::exp(row_max[i] - m);  // exp(-inf) == 0 on the first block
      row_max[i] = m;
    }
    const Vec<T> shift(m);  // second pass: the negatives' sum of exp(s - m)
    for (int64_t j = 0; j < nc; j += W) {
      const Vec<T> e = vexp(lanes.load(srow, j) - shift);
      acc = acc + (lanes.plain(j) ? e : Vec<T>::blendv(zero, e, lanes.negatives(j)));
    }
    row_acc[i] += sum_lanes(acc);
  }
}

// ---- backward ---------------------------------------------------------------------------------
template <typename T>
void backward_tile(const Problem<T>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* tile,
                   const T* grad_pos, const T* grad_neg, T grad_sumsq, const T* neg_stat) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> tclip(p.tclip), inv(T(1) / p.tclip), two_gsq(2 * grad_sumsq), scale(p.scale);
  const bool lse = p.reduction == NegReduction::kLogSumExp;
  // A row's grad_pos, placed at its positive columns: read as vectors beside the scores.
  alignas(64) T staged[kColBlock + W];
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r0 + r;
    T* row = tile + r * nc;
    RowLanes<T> lanes{0, 0, nc};
    p.positive_range(i, c0, nc, &lanes.lo, &lanes.hi);
    if (lanes.hi > lanes.lo) {
      const T* gp = grad_pos + i * p.L + (c0 + lanes.lo - p.pos_idx[i] * p.L);
      std::copy(gp, gp + (lanes.hi - lanes.lo), staged + lanes.lo);
    }
    const Vec<T> gneg(grad_neg[i]), shift(neg_stat[i]);
    for (int64_t j = 0; j < nc; j += W) {
      const Vec<T> a = lanes.load(row, j);
      Vec<T> s = a, dt(1);
      if (p.clip) {
        Vec<T> t;
        vtanh_dtanh(a * inv, &t, &dt);
        s = tclip * t;
      }
      // d neg_stat / d s: exp(s - neg_stat) or sigmoid(s)
      Vec<T> gs = gneg * (lse ? vexp(s - shift) : vsigmoid(s));
      if (!(j + W <= lanes.lo || j >= lanes.hi))
        gs = Vec<T>::blendv(gs, Vec<T>::loadu(staged + j), lanes.positives(j));
      lanes.store(at::vec::fmadd(gs, dt, two_gsq * a) * scale, row, j);
    }
  }
}

// ---- the JSD loss's statistics and gradient in one pass -----------------------------------------
// softplus(s), sigmoid(s) and sigmoid(-s) share e = exp(-|s|): one exp per score beyond the clip's.
template <typename T>
void softplus_grad_tile(const Problem<T>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                        T* tile, T* pos, T* row_acc, double* sumsq, T pos_coef, T neg_coef,
                        T grad_sumsq) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> one(1), zero(0), tclip(p.tclip), inv(T(1) / p.tclip), two_gsq(2 * grad_sumsq),
      scale(p.scale), cpos(-pos_coef), cneg(neg_coef);
  alignas(64) T kept_row[kColBlock];  // a row's positives' s (the tile gets g)
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r0 + r;
    T* row = tile + r * nc;
    RowLanes<T> lanes{0, 0, nc};
    p.positive_range(i, c0, nc, &lanes.lo, &lanes.hi);
    Vec<T> sq(0), acc(0);
    for (int64_t j = 0; j < nc; j += W) {
      const Vec<T> a = lanes.load(row, j);
      sq = at::vec::fmadd(a, a, sq);  // zeros past nc
      Vec<T> s = a, dt(1);
      if (p.clip) {
        Vec<T> t;
        vtanh_dtanh(a * inv, &t, &dt);
        s = tclip * t;
      }
      const Vec<T> e = vexp(zero - s.abs()), r1 = one / (one + e);
      const Vec<T> nonneg = s >= zero;
      const Vec<T> softplus = at::vec::maximum(s, zero) + vlog1p_unit(e);
      // negatives: d neg_stat / d s = sigmoid(s); positives: d softplus(-s) / d s = -sigmoid(-s)
      Vec<T> gs = cneg * Vec<T>::blendv(e, one, nonneg) * r1;
      if (lanes.plain(j)) {
        acc = acc + softplus;
      } else {
        const Vec<T> neg = lanes.negatives(j);
        acc = acc + Vec<T>::blendv(zero, softplus, neg);
        if (!(j + W <= lanes.lo || j >= lanes.hi)) {
          lanes.store(s, kept_row, j);
          gs = Vec<T>::blendv(gs, cpos * Vec<T>::blendv(one, e, nonneg) * r1, lanes.positives(j));
        }
      }
      lanes.store(at::vec::fmadd(gs, dt, two_gsq * a) * scale, row, j);
    }
    *sumsq += static_cast<double>(sum_lanes(sq));
    row_acc[i] += sum_lanes(acc);
    if (lanes.hi > lanes.lo)
      std::copy(kept_row + lanes.lo, kept_row + lanes.hi,
                pos + i * p.L + (c0 + lanes.lo - p.pos_idx[i] * p.L));
  }
}

}  // namespace

template <>
const Epilogue<float>& epilogue<float>() {
  static const Epilogue<float> kernels{&forward_tile<float>, &backward_tile<float>,
                                       &softplus_grad_tile<float>, AMDIM_STRINGIFY(CPU_CAPABILITY)};
  return kernels;
}

template <>
const Epilogue<double>& epilogue<double>() {
  static const Epilogue<double> kernels{&forward_tile<double>, &backward_tile<double>,
                                        &softplus_grad_tile<double>,
                                        AMDIM_STRINGIFY(CPU_CAPABILITY)};
  return kernels;
}

}  // namespace CPU_CAPABILITY
}  // namespace amdim_kernels
