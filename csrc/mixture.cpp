// Mixture-q epilogue of the fused mixture NCE loss (spec section 3): op schemas and CPU kernels.
//
// The k components' NCE statistics come from nce_fwd over the N*k component rows; what is left is
// O(N*k*L) work per call: per positive (i, l), nce_j = -softplus(Z_j - P_j), q = softmax_j(tau *
// nce_j), objective = sum_j q_j nce_j + alpha * H(q), loss = -mean over (i, l). mixture_bwd turns
// d loss into d pos and d neg_stat, which nce_fwd's autograd carries on to src and trg.
// docs/design.md has the gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"

namespace amdim_kernels {
namespace {

// One positive (i, l): the k values nce_j, the log-softmax log q_j of tau * nce_j, and q_j.
// pos points at P[i, 0, l] (components L apart), neg_stat at Z[i, 0].
template <typename T>
struct Position {
  std::vector<T> nce, log_q, q;
  explicit Position(int64_t k) : nce(k), log_q(k), q(k) {}

  // log q_j = tau * (nce_j - max nce) - log sum_m exp(tau * (nce_m - max nce)): shifting before
  // scaling by tau keeps the largest q's logit exactly 0 (no rounding of tau * nce, which FMA
  // contraction would otherwise leave in), so k = 1 gives q = 1 exactly.
  void compute(const T* pos, const T* neg_stat, int64_t k, int64_t L, T tau) {
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < k; ++j) {
      nce[j] = -softplus(neg_stat[j] - pos[j * L]);
      m = std::max(m, nce[j]);
    }
    T sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += std::exp(tau * (nce[j] - m));
    const T log_sum = std::log(sum);
    for (int64_t j = 0; j < k; ++j) {
      log_q[j] = tau * (nce[j] - m) - log_sum;
      q[j] = std::exp(log_q[j]);
    }
  }

  // sum_j q_j nce_j + alpha * H(q)
  T objective(T alpha) const {
    T value = 0, entropy = 0;
    for (size_t j = 0; j < q.size(); ++j) {
      value += q[j] * nce[j];
      entropy -= q[j] * log_q[j];  // log_q is finite, so q_j = 0 contributes 0
    }
    return value + alpha * entropy;
  }
};

void check_inputs(const at::Tensor& pos, const at::Tensor& neg_stat) {
  TORCH_CHECK(pos.dim() == 3, "pos must be 3-D (N, k, L), got ", pos.sizes());
  TORCH_CHECK(neg_stat.dim() == 2 && neg_stat.size(0) == pos.size(0) &&
                  neg_stat.size(1) == pos.size(1),
              "neg_stat must be (N, k) = (", pos.size(0), ", ", pos.size(1), "), got ",
              neg_stat.sizes());
  TORCH_CHECK(pos.scalar_type() == neg_stat.scalar_type(), "pos and neg_stat must share a dtype");
  TORCH_CHECK(pos.scalar_type() == at::kFloat || pos.scalar_type() == at::kDouble,
              "the CPU mixture epilogue takes float32 or float64, got ", pos.scalar_type());
  TORCH_CHECK(pos.size(1) >= 1, "the mixture needs k >= 1 components");
}

at::Tensor mixture_fwd_cpu(const at::Tensor& pos_in, const at::Tensor& neg_stat_in, double tau,
                           double alpha, bool detach_q) {
  (void)detach_q;  // changes the gradient only
  check_inputs(pos_in, neg_stat_in);
  const at::Tensor pos = pos_in.contiguous(), neg_stat = neg_stat_in.contiguous();
  const int64_t n = pos.size(0), k = pos.size(1), L = pos.size(2);
  at::Tensor loss = at::empty({}, pos.options());
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "mixture_fwd_cpu", [&] {
    const scalar_t* p = pos.data_ptr<scalar_t>();
    const scalar_t* z = neg_stat.data_ptr<scalar_t>();
    // Per-row sums, added in row order afterwards: the result does not depend on the threads.
    std::vector<double> row_objective(n);
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      Position<scalar_t> at_l(k);
      for (int64_t i = begin; i < end; ++i) {
        double acc = 0;
        for (int64_t l = 0; l < L; ++l) {
          at_l.compute(p + i * k * L + l, z + i * k, k, L, static_cast<scalar_t>(tau));
          acc += at_l.objective(static_cast<scalar_t>(alpha));
        }
        row_objective[i] = acc;
      }
    });
    double total = 0;
    for (double v : row_objective) total += v;
    loss.fill_(-total / static_cast<double>(n * L));
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> mixture_bwd_cpu(const at::Tensor& grad_loss,
                                                   const at::Tensor& pos_in,
                                                   const at::Tensor& neg_stat_in, double tau,
                                                   double alpha, bool detach_q) {
  check_inputs(pos_in, neg_stat_in);
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar tensor");
  const at::Tensor pos = pos_in.contiguous(), neg_stat = neg_stat_in.contiguous();
  const int64_t n = pos.size(0), k = pos.size(1), L = pos.size(2);
  at::Tensor grad_pos = at::empty_like(pos);
  at::Tensor grad_neg_stat = at::empty_like(neg_stat);
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "mixture_bwd_cpu", [&] {
    using T = scalar_t;
    const T* p = pos.data_ptr<T>();
    const T* z = neg_stat.data_ptr<T>();
    T* gp = grad_pos.data_ptr<T>();
    T* gz = grad_neg_stat.data_ptr<T>();
    // d loss / d objective[i, l]
    const T scale = static_cast<T>(-grad_loss.item<double>() / static_cast<double>(n * L));
    // d objective / d nce_j = q_j * (1 + tau * (1 - alpha * tau) * (nce_j - sum_m q_m nce_m)),
    // or q_j with q held constant; the two agree at alpha = 1 / tau, where q is optimal.
    const T through_q = detach_q ? T(0) : static_cast<T>(tau * (1.0 - alpha * tau));
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      Position<T> at_l(k);
      for (int64_t i = begin; i < end; ++i) {
        std::fill(gz + i * k, gz + (i + 1) * k, T(0));
        for (int64_t l = 0; l < L; ++l) {
          const T* pl = p + i * k * L + l;
          at_l.compute(pl, z + i * k, k, L, static_cast<T>(tau));
          T mean_nce = 0;
          for (int64_t j = 0; j < k; ++j) mean_nce += at_l.q[j] * at_l.nce[j];
          for (int64_t j = 0; j < k; ++j) {
            const T g_nce = scale * at_l.q[j] * (T(1) + through_q * (at_l.nce[j] - mean_nce));
            // nce_j = -softplus(Z_j - P_j): d/dP = sigmoid(Z_j - P_j) = -d/dZ
            const T g = g_nce * sigmoid(z[i * k + j] - pl[j * L], StdExp{});
            gp[i * k * L + j * L + l] = g;
            gz[i * k + j] -= g;
          }
        }
      }
    });
  });
  return {grad_pos, grad_neg_stat};
}

}  // namespace

// The namespace itself is declared once, by TORCH_LIBRARY in nce.cpp.
TORCH_LIBRARY_FRAGMENT(amdim_kernels, m) {
  m.def("mixture_fwd(Tensor pos, Tensor neg_stat, float tau, float alpha, bool detach_q)"
        " -> Tensor");
  m.def("mixture_bwd(Tensor grad_loss, Tensor pos, Tensor neg_stat, float tau, float alpha,"
        " bool detach_q) -> (Tensor grad_pos, Tensor grad_neg_stat)");
}

TORCH_LIBRARY_IMPL(amdim_kernels, CPU, m) {
  m.impl("mixture_fwd", &mixture_fwd_cpu);
  m.impl("mixture_bwd", &mixture_bwd_cpu);
}

}  // namespace amdim_kernels
