// The torch-facing side of common.h, shared by the CPU (nce.cpp) and CUDA (cuda/nce_cuda.cpp)
// bindings.
#pragma once

#include <c10/util/Exception.h>

#include <string>
#include <string_view>

#include "common.h"

namespace amdim_kernels {

template <typename StringView>
NegReduction neg_reduction_arg(const StringView& name) {
  const std::string_view view(name.data(), name.size());
  NegReduction reduction = NegReduction::kLogSumExp;
  TORCH_CHECK(parse_neg_reduction(view, &reduction),
              "neg_reduction must be 'logsumexp' or 'softplus_sum', got '", std::string(view), "'");
  return reduction;
}

}  // namespace amdim_kernels
