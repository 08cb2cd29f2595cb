// What the C++ (epilogue.h, nce.cpp, mixture.cpp) and CUDA (cuda/) kernels share: the negatives'
// reduction and the elementwise math of the score epilogue. Torch-free, so that the .cu files
// compile with plain nvcc; csrc/torch_common.h adds the torch-facing argument parsing.
//
// One float tanh approximation everywhere (the Triton kernels, amdim_kernels/_triton_common.py, use
// the same; float64 takes libm's or Sleef's tanh): the odd Cephes polynomial for |x| < 0.625, else
// (1 - e) / (1 + e) with e = exp(-2|x|). Its derivative 1 - tanh^2 is formed from e as well
// (4e / (1 + e)^2): from t, 1 - t^2 cannot fall below ~1.2e-7 in float (t rounds to 1 - 2^-24)
// nor 1.1e-16 in double, so saturated scores (|a| > ~9 tclip) would get a gradient through the
// clip 10^20 times too large.
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

// Cephes tanhf, ~2 ulp for |x| < 0.625. V is float, or a vector of floats (the CPU epilogues'
// at::vec::Vectorized<float>, csrc/epilogue.h).
template <typename V>
AMDIM_HD inline V tanh_poly(V x) {
  const V z = x * x;
  return ((((V(-5.70498872745e-3f) * z + V(2.06390887954e-2f)) * z - V(5.37397155531e-2f)) * z +
           V(1.33314422036e-1f)) * z - V(3.33332819422e-1f)) * z * x + x;
}

// tanh(x) and 1 - tanh(x)^2 in float, both accurate to a few ulp (the derivative down to float's
// smallest normals, |x| ~ 43). Exp is the float exp of the caller (exp2f-based and fast-math-proof
// on CUDA); the CPU epilogues (csrc/epilogue.h) compute the same with vectors.
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

// sigmoid(x) from e = exp(-|x|) <= 1: no overflow for either sign.
template <typename T, typename Exp>
AMDIM_HD inline T sigmoid(T x, Exp exp_fn) {
  const T e = exp_fn(-(x < T(0) ? -x : x));
  return (x >= T(0) ? T(1) : e) / (T(1) + e);
}

// log(1 + e^x) without overflow; 0 for x = -inf (a row without negatives). Scalar CPU code only.
template <typename T>
inline T softplus(T x) {
  return (x > T(0) ? x : T(0)) + std::log1p(std::exp(-std::fabs(x)));
}

struct StdExp {  // libm's exp, for the scalar CPU code (mixture.cpp)
  template <typename T>
  T operator()(T x) const { return std::exp(x); }
};

}  // namespace amdim_kernels
