// The CUDA C++ backward: op amdim_kernels::nce_bwd_cuda, with nce_bwd's schema (csrc/nce.cpp) and
// math (docs/design.md). It is an op of its own, built apart from the CPU extension and only where
// it is used (amdim_kernels/_extension.py): the CUDA kernel of nce_bwd (amdim_kernels/ops.py) calls
// it, or one of the Triton backwards, by the variant chosen for the problem.
//
// The N x M score matrix is walked in tiles of at most kTileBytes of scratch, columns outer and
// rows inner (one row tile whenever N is moderate, e.g. N = 4096 at D = 1024). Per tile:
//   1. dots  = src[r] @ trg_flat[c]^T          cuBLAS, fp32 output (fp32 accumulation)
//   2. g     = score gradient of dots           nce_bwd.cu, in the products' storage type
//   3. acc_src[r]   += g @ trg_flat[c]          cuBLAS, fp32 accumulator across column tiles
//      grad_trg[c] (+)= g^T @ src[r]            cuBLAS, written once when there is one row tile
// Extra memory: the tile scratch plus, for fp16/bf16, an fp32 N x D accumulator for d src and, with
// several row tiles, an fp32 tile-width x D accumulator for d trg. Nothing scales with N * M.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "../torch_common.h"
#include "nce_bwd.cuh"

// addmm(..., out_dtype=float) with an fp32 `self` accumulating bf16/fp16 products needs torch 2.10
// (pytorch#167931); 2.8/2.9 reject an fp32 self.
static_assert(TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10),
              "the CUDA nce_bwd needs torch >= 2.10");

namespace amdim_kernels {
namespace {

// Scratch per tile (fp32 dots, plus the g tile when it is not fp32: fp32 g overwrites the dots):
// 32 MiB by default; AMDIM_NCE_BWD_TILE_MIB overrides it for the tuning sweep of
// benchmarks/cuda_bwd_notes.md (tiles that stay in L2 against fewer passes over the accumulator).
int64_t tile_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("AMDIM_NCE_BWD_TILE_MIB");
    const int64_t mib = env == nullptr ? 32 : std::atoll(env);
    TORCH_CHECK(mib >= 1 && mib <= 4096, "AMDIM_NCE_BWD_TILE_MIB must be in [1, 4096], got '",
                env, "'");
    return mib << 20;
  }();
  return bytes;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tiles keep at least this many columns (GEMM efficiency) and are cut at multiples of it.
constexpr int64_t kColQuantum = 128;
// fp16 g is scaled so that its largest possible magnitude lands at 2^14 (fp16 max ~2^16): the
// gradients of an N*L-term mean are ~1/(N*L) and would otherwise sit in fp16's subnormals.
constexpr int kHalfTopExponent = 14;

// Power of two p with max|g_a / sqrt(D)| * p <= 2^kHalfTopExponent, from bounds that hold for any
// consistent neg_stat: |d neg_stat/d s| <= 1 (exp(s - lse) or sigmoid), |d s/d a| <= 1 and
// |a| <= max ||src_i|| * max ||trg_m|| / sqrt(D). One device-to-host copy of five scalars.
float half_g_scale(const at::Tensor& gp, const at::Tensor& gn, const at::Tensor& gs,
                   const at::Tensor& src, const at::Tensor& trg_flat, double inv_sqrt_d) {
  const int64_t rows_dim[] = {1};
  const auto max_row_norm = [&](const at::Tensor& x) {
    // Norms in fp16: the reduction accumulates in fp32 without an fp32 copy of x (M x D). A norm
    // above 65504 becomes inf, which only makes the bound infinite: the scale then falls back to 1.
    return at::linalg_vector_norm(x, 2, at::IntArrayRef(rows_dim), false).max().to(at::kFloat);
  };
  const at::Tensor bounds = at::stack({gp.abs().max(), gn.abs().max(), gs.abs().reshape({}),
                                       max_row_norm(src), max_row_norm(trg_flat)})
                                .cpu();
  const float* v = bounds.data_ptr<float>();
  const double max_a = double(v[3]) * v[4] * inv_sqrt_d;
  const double max_g = (std::max(v[0], v[1]) + 2.0 * v[2] * max_a) * inv_sqrt_d;
  if (!(max_g > 0.0) || !std::isfinite(max_g)) return 1.0f;  // zero gradients, or no usable bound
  const int e = std::clamp(kHalfTopExponent - 1 - std::ilogb(max_g), -100, 100);
  return std::ldexp(1.0f, e);
}

void check_cuda_inputs(const at::Tensor& grad_pos, const at::Tensor& grad_neg_stat,
                       const at::Tensor& grad_sumsq, const at::Tensor& src, const at::Tensor& trg,
                       const at::Tensor& pos_idx, const at::Tensor& neg_stat,
                       std::optional<double> tclip) {
  TORCH_CHECK(src.dim() == 2, "src must be 2-D (N, D), got ", src.sizes());
  TORCH_CHECK(trg.dim() == 3, "trg must be 3-D (B, L, D), got ", trg.sizes());
  TORCH_CHECK(src.size(1) == trg.size(2), "src and trg must share D, got ", src.sizes(), " and ",
              trg.sizes());
  TORCH_CHECK(src.numel() > 0 && trg.numel() > 0, "src and trg must be non-empty");
  TORCH_CHECK(src.scalar_type() == trg.scalar_type(), "src and trg must share a dtype");
  const auto dt = src.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "the CUDA nce_bwd takes float32, float16 or bfloat16 (float64 runs on the CPU), got ",
              dt);
  const int64_t n = src.size(0), l = trg.size(1), m = trg.size(0) * l;
  TORCH_CHECK(n < (int64_t{1} << 31) && m < (int64_t{1} << 31),
              "the CUDA nce_bwd needs N and B*L below 2^31, got N=", n, " and B*L=", m);
  TORCH_CHECK(pos_idx.scalar_type() == at::kLong && pos_idx.dim() == 1 && pos_idx.size(0) == n,
              "pos_idx must be int64 of shape (N,)");
  TORCH_CHECK(grad_pos.sizes() == at::IntArrayRef({n, l}), "grad_pos must be (N, L) = (", n, ", ",
              l, "), got ", grad_pos.sizes());
  TORCH_CHECK(grad_neg_stat.sizes() == at::IntArrayRef({n}) &&
                  neg_stat.sizes() == at::IntArrayRef({n}),
              "grad_neg_stat and neg_stat must be (N,)");
  TORCH_CHECK(grad_sumsq.numel() == 1, "grad_sumsq must be a scalar tensor");
  for (const at::Tensor* t : {&grad_pos, &grad_neg_stat, &grad_sumsq, &trg, &pos_idx, &neg_stat}) {
    TORCH_CHECK(t->device() == src.device(), "every nce_bwd tensor must be on ", src.device(),
                ", got one on ", t->device());
  }
  // Checked as the float the kernel gets: a tiny positive double must not round to "no clip".
  TORCH_CHECK(!tclip.has_value() ||
                  (static_cast<float>(*tclip) > 0.0f && std::isfinite(static_cast<float>(*tclip))),
              "tclip must be a positive finite float32 value or None, got ", tclip.value_or(0.0));
}

std::tuple<at::Tensor, at::Tensor> nce_bwd_cuda(const at::Tensor& grad_pos,
                                                const at::Tensor& grad_neg_stat,
                                                const at::Tensor& grad_sumsq,
                                                const at::Tensor& src_in, const at::Tensor& trg_in,
                                                const at::Tensor& pos_idx_in,
                                                const at::Tensor& neg_stat,
                                                std::optional<double> tclip,
                                                c10::string_view neg_reduction) {
  check_cuda_inputs(grad_pos, grad_neg_stat, grad_sumsq, src_in, trg_in, pos_idx_in, neg_stat,
                    tclip);
  const NegReduction reduction = neg_reduction_arg(neg_reduction);
  const c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = src_in.contiguous();
  const at::Tensor trg_flat = trg_in.contiguous().view({-1, trg_in.size(2)});
  const at::Tensor pos_idx = pos_idx_in.contiguous();
  const at::Tensor gp = grad_pos.to(at::kFloat).contiguous();
  const at::Tensor gn = grad_neg_stat.to(at::kFloat).contiguous();
  const at::Tensor gs = grad_sumsq.to(at::kFloat).reshape({1});
  const at::Tensor ns = neg_stat.to(at::kFloat).contiguous();

  const int64_t n = src.size(0), d = src.size(1), l = trg_in.size(1), m = trg_flat.size(0);
  const auto dt = src.scalar_type();
  const bool g_is_f32 = dt == at::kFloat;
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
  const float p2 = dt == at::kHalf ? half_g_scale(gp, gn, gs, src, trg_flat, inv_sqrt_d) : 1.0f;
  const double alpha = 1.0 / p2;  // undoes the fp16 power of two inside the products

  // Tile shape: as many rows as fit beside kColQuantum columns, then as many columns as fit; the
  // tile counts so found are then spread evenly (no sliver of a last tile).
  const int64_t tile_elems = tile_bytes() / (g_is_f32 ? 4 : 4 + 2);
  const int64_t row_tiles = ceil_div(n, std::max<int64_t>(1, tile_elems / kColQuantum));
  const int64_t rows = ceil_div(n, row_tiles);
  const int64_t max_cols = std::max(kColQuantum, tile_elems / rows / kColQuantum * kColQuantum);
  const int64_t cols = std::min(m, ceil_div(ceil_div(m, ceil_div(m, max_cols)), kColQuantum) *
                                       kColQuantum);
  const bool one_row_tile = row_tiles == 1;

  at::Tensor grad_src = at::empty_like(src);
  at::Tensor grad_trg = at::empty_like(trg_in, at::MemoryFormat::Contiguous);
  at::Tensor grad_trg_flat = grad_trg.view({m, d});
  const auto f32 = src.options().dtype(at::kFloat);
  at::Tensor acc_src = g_is_f32 ? grad_src : at::empty({n, d}, f32);
  at::Tensor acc_trg = (g_is_f32 || one_row_tile) ? at::Tensor() : at::empty({cols, d}, f32);
  at::Tensor dots_buf = at::empty({rows * cols}, f32);
  at::Tensor g_buf = g_is_f32 ? dots_buf : at::empty({rows * cols}, src.options());

  NceBwdTile tile{};
  tile.L = l;
  tile.pos_idx = pos_idx.data_ptr<int64_t>();
  tile.grad_pos = gp.data_ptr<float>();
  tile.grad_neg_stat = gn.data_ptr<float>();
  tile.neg_stat = ns.data_ptr<float>();
  tile.grad_sumsq = gs.data_ptr<float>();
  tile.inv_sqrt_d = static_cast<float>(inv_sqrt_d);
  tile.tclip = tclip.has_value() ? static_cast<float>(*tclip) : 0.0f;
  tile.reduction = reduction;
  tile.g_scale = static_cast<float>(inv_sqrt_d * p2);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  for (int64_t c0 = 0; c0 < m; c0 += cols) {
    const int64_t cw = std::min(cols, m - c0);
    const at::Tensor trg_c = trg_flat.narrow(0, c0, cw);
    at::Tensor grad_trg_c = grad_trg_flat.narrow(0, c0, cw);
    at::Tensor trg_out = acc_trg.defined() ? acc_trg.narrow(0, 0, cw) : grad_trg_c;
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t rh = std::min(rows, n - r0);
      const at::Tensor src_r = src.narrow(0, r0, rh);
      at::Tensor dots = dots_buf.narrow(0, 0, rh * cw).view({rh, cw});
      at::mm_out(dots, src_r, trg_c.t(), at::kFloat);

      at::Tensor g = g_buf.narrow(0, 0, rh * cw).view({rh, cw});
      tile.dots = dots.data_ptr<float>();
      tile.rows = rh;
      tile.cols = cw;
      tile.row0 = r0;
      tile.col0 = c0;
      cudaError_t err;
      switch (dt) {
        case at::kFloat:
          err = launch_nce_bwd_tile(tile, g.data_ptr<float>(), stream);
          break;
        case at::kHalf:
          err = launch_nce_bwd_tile(tile, reinterpret_cast<__half*>(g.data_ptr<at::Half>()), stream);
          break;
        default:
          err = launch_nce_bwd_tile(
              tile, reinterpret_cast<__nv_bfloat16*>(g.data_ptr<at::BFloat16>()), stream);
      }
      C10_CUDA_CHECK(err);

      at::Tensor acc_src_r = acc_src.narrow(0, r0, rh);
      at::addmm_out(acc_src_r, acc_src_r, g, trg_c, at::kFloat, c0 == 0 ? 0.0 : 1.0, alpha);
      at::addmm_out(trg_out, trg_out, g.t(), src_r, trg_out.scalar_type(), r0 == 0 ? 0.0 : 1.0,
                    alpha);
    }
    if (acc_trg.defined()) grad_trg_c.copy_(trg_out);
  }
  if (!g_is_f32) grad_src.copy_(acc_src);
  return {grad_src, grad_trg};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amdim_kernels, m) {
  m.def("nce_bwd_cuda(Tensor grad_pos, Tensor grad_neg_stat, Tensor grad_sumsq, Tensor src, "
        "Tensor trg, Tensor pos_idx, Tensor neg_stat, float? tclip, str neg_reduction) "
        "-> (Tensor grad_src, Tensor grad_trg)");
}

TORCH_LIBRARY_IMPL(amdim_kernels, CUDA, m) { m.impl("nce_bwd_cuda", &nce_bwd_cuda); }

}  // namespace amdim_kernels
