// What the C++ (nce.cpp, mixture.cpp) and CUDA (cuda/) kernels share: the negatives' reduction
// and the elementwise math of the score epilogue. Torch-free, so that the .cu files compile with
// plain nvcc; csrc/torch_common.h adds the torch-facing argument parsing.
//
// One tanh approximation everywhere (the Triton kernels, amdim_kernels/_triton_common.py, use the
// same): the odd Cephes polynomial for |x| < 0.625, else (1 - e) / (1 + e) with e = exp(-2|x|).
// Its derivative 1 - tanh^2 is formed from e as well (4e / (1 + e)^2): from t, 1 - t^2 cannot fall
// below ~1.2e-7 in float (t rounds to 1 - 2^-24) nor 1.1e-16 in double, so saturated scores
// (|a| > ~9 tclip) would get a gradient through the clip 10^20 times too large.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>

#if defined(__CUDACC__)
#define AMDIM_HD __host__ __device__
#else
#define AMDIM_HD
#endif

namespace amdim_kernels {

// neg_stat of a row: the logsumexp (NCE, DV) or the softplus sum (JSD) of its negatives' scores.
enum class NegReduction : int32_t { kLogSumExp = 0, kSoftplusSum = 1 };

// false for an unknown name (the bindings report it; see torch_common.h)
inline bool parse_neg_reduction(std::string_view name, NegReduction* out) {
  if (name == "logsumexp") {
    *out = NegReduction::kLogSumExp;
    return true;
  }
  if (name == "softplus_sum") {
    *out = NegReduction::kSoftplusSum;
    return true;
  }
  return false;
}

// Below this |x| tanh is the polynomial: there (1 - e) / (1 + e) would cancel.
constexpr float kTanhPolyLimit = 0.625f;

AMDIM_HD inline float tanh_poly(float x) {  // Cephes tanhf, ~2 ulp for |x| < 0.625
  const float z = x * x;
  return ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
           1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
}

// tanh(x) in float; Exp is the float exp of the caller (vectorisable on the CPU, exp2f-based and
// fast-math-proof on CUDA). Branch-free: both sides are computed and selected, which GCC
// if-converts (and so vectorises) in the CPU loops.
template <typename Exp>
AMDIM_HD inline float tanh_f(float x, Exp exp_fn) {
  const float ax = fabsf(x);
  const float e = exp_fn(-2.0f * ax);  // in (0, 1]: no overflow for any x
  const float big = (1.0f - e) / (1.0f + e);
  return ax < kTanhPolyLimit ? tanh_poly(x) : (x < 0.0f ? -big : big);
}

// tanh(x) and 1 - tanh(x)^2, both accurate to a few ulp (the derivative down to float's
// smallest normals, |x| ~ 43).
template <typename Exp>
AMDIM_HD inline void tanh_dtanh_f(float x, Exp exp_fn, float* t, float* dt) {
  const float ax = fabsf(x);
  const float e = exp_fn(-2.0f * ax);
  const float r = 1.0f / (1.0f + e);
  const float big = (1.0f - e) * r;
  const float small = tanh_poly(x);
  const bool is_small = ax < kTanhPolyLimit;
  *t = is_small ? small : (x < 0.0f ? -big : big);
  *dt = is_small ? 1.0f - small * small : 4.0f * e * r * r;
}

// The float64 checking path: libm's tanh, and the derivative from e as above.
inline void tanh_dtanh_d(double x, double* t, double* dt) {
  const double ax = std::fabs(x);
  const double e = std::exp(-2.0 * ax);
  *t = std::tanh(x);
  *dt = ax < 0.625 ? 1.0 - *t * *t : 4.0 * e / ((1.0 + e) * (1.0 + e));
}

// sigmoid(x) from e = exp(-|x|) <= 1: no overflow for either sign.
template <typename T, typename Exp>
AMDIM_HD inline T sigmoid(T x, Exp exp_fn) {
  const T e = exp_fn(-(x < T(0) ? -x : x));
  return (x >= T(0) ? T(1) : e) / (T(1) + e);
}

// log(1 + e^x) without overflow; 0 for x = -inf (a row without negatives). CPU only.
template <typename T>
inline T softplus(T x) {
  return (x > T(0) ? x : T(0)) + std::log1p(std::exp(-std::fabs(x)));
}

struct StdExp {  // libm's exp, for the CPU paths that do not need the vectorisable one
  template <typename T>
  T operator()(T x) const { return std::exp(x); }
};

}  // namespace amdim_kernels
