// Throughput and accuracy of the CPU epilogues' float math (csrc/epilogue.h, AVX-512 build)
// against ATen's Sleef exp (what Vectorized<float>::exp() calls) and ATen's exp_u20. A benchmark,
// not a test; benchmarks/NOTES.md has its figures. Build and run from the repository root:
//
//   T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -O3 -std=c++20 -march=native -fno-trapping-math -Icsrc -I$T/include \
//       benchmarks/cpu_epilogue_micro.cpp -L$T/lib -ltorch_cpu -lc10 -Wl,-rpath,$T/lib \
//       -o /tmp/cpu_epilogue_micro && /tmp/cpu_epilogue_micro
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "epilogue.h"

#include <chrono>
#include <cstdio>
#include <vector>

using namespace amdim_kernels::AVX512;
using V = at::vec::Vectorized<float>;

float lane0(const V& v) {
  float lanes[V::size()];
  v.store(lanes);
  return lanes[0];
}

// ns per element of sum(f(x)) over x, 16 lanes at a time (a reduction, so nothing is optimised out)
template <typename F>
double ns_per_element(F f, const std::vector<float>& x) {
  float sink = 0;
  const int reps = 20000;
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) {
    V acc(0.0f);
    for (size_t i = 0; i < x.size(); i += V::size()) acc = acc + f(V::loadu(x.data() + i));
    sink += lane0(acc);
  }
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  if (sink == 1.2345f) std::printf(" ");
  return ns / (static_cast<double>(reps) * x.size());
}

// the largest error in ulp of f against the float64 function ref over [lo, hi)
template <typename F, typename G>
double max_ulp(F f, G ref, float lo, float hi, float step) {
  double worst = 0;
  for (float v = lo; v < hi; v += step) {
    const double want = ref(static_cast<double>(v));
    if (want == 0) continue;
    const double ulp = std::ldexp(1.0, std::ilogb(static_cast<float>(want)) - 23);
    worst = std::max(worst, std::fabs(lane0(f(V(v))) - want) / ulp);
  }
  return worst;
}

int main() {
  std::vector<float> x(4096);
  for (size_t i = 0; i < x.size(); ++i) x[i] = -20.0f + 40.0f * static_cast<float>((i * 0.61803) - static_cast<int>(i * 0.61803));
  const auto exp_ref = [](double v) { return std::exp(v); };
  std::printf("%-28s %10s %14s\n", "exp", "ns/elem", "max ulp");
  std::printf("%-28s %10.3f %14.2f\n", "vexp (Cephes, inline)", ns_per_element([](V v) { return vexp(v); }, x),
              max_ulp([](V v) { return vexp(v); }, exp_ref, -87, 88, 7.3e-4f));
  std::printf("%-28s %10.3f %14.2f\n", "Sleef_expf16_u10 (.exp())", ns_per_element([](V v) { return v.exp(); }, x),
              max_ulp([](V v) { return v.exp(); }, exp_ref, -87, 88, 7.3e-4f));
  std::printf("%-28s %10.3f %14.2f\n", "ATen exp_u20", ns_per_element([](V v) { return v.exp_u20(); }, x),
              max_ulp([](V v) { return v.exp_u20(); }, exp_ref, -87, 88, 7.3e-4f));

  std::printf("\n%-28s %10s %14s\n", "epilogue function", "ns/elem", "max ulp");
  const auto row = [&](const char* name, auto f, auto ref, float lo, float hi, float step) {
    std::printf("%-28s %10.3f %14.2f\n", name, ns_per_element(f, x), max_ulp(f, ref, lo, hi, step));
  };
  row("vlog1p_unit on [0, 1]", [](V v) { return vlog1p_unit(v.abs() * V(0.05f)); },
      [](double v) { return std::log1p(std::fabs(v) * 0.05); }, -20, 20, 3.1e-5f);
  row("vsoftplus", [](V v) { return vsoftplus<float>(v); },
      [](double v) { return std::log1p(std::exp(v)); }, -80, 80, 3.7e-4f);
  row("vsigmoid", [](V v) { return vsigmoid<float>(v); },
      [](double v) { return 1 / (1 + std::exp(-v)); }, -80, 80, 3.7e-4f);
  row("vtanh", [](V v) { return vtanh(v); }, [](double v) { return std::tanh(v); }, -20, 20, 3.7e-5f);
  row("1 - tanh^2 (vtanh_dtanh)", [](V v) { V t, dt; vtanh_dtanh(v, &t, &dt); return dt; },
      [](double v) { const double e = std::exp(-2 * std::fabs(v)); return 4 * e / ((1 + e) * (1 + e)); },
      -43, 43, 3.7e-5f);
}
