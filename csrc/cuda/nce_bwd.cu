// Kernel and launcher of the score-gradient pass of the CUDA nce_bwd (see nce_bwd.cuh).
// Memory-bound: per element it reads 4 bytes (the fp32 dot) and writes sizeof(T); the few
// row-indexed values (pos_idx, neg_stat, ...) are shared by a whole tile row and stay in cache.
#include "nce_bwd.cuh"

#include <algorithm>

namespace amdim_kernels {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) nce_bwd_tile_kernel(const NceBwdTile tile, T* g,
                                                                uint32_t n_vec) {
  const uint32_t stride = gridDim.x * kThreads;
  for (uint32_t v = blockIdx.x * kThreads + threadIdx.x; v < n_vec; v += stride) {
    nce_bwd_tile_vec(tile, g, v);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_nce_bwd_tile(const NceBwdTile& tile, T* g, cudaStream_t stream) {
  const int64_t n = tile.rows * tile.cols;
  if (tile.rows <= 0 || tile.cols <= 0 || tile.L <= 0 || n >= (int64_t{1} << 31) ||
      tile.col0 + tile.cols >= (int64_t{1} << 31) ||
      reinterpret_cast<uintptr_t>(tile.dots) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(g) % (sizeof(T) * kVec) != 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t n_vec = (n + kVec - 1) / kVec;
  // Grid-stride: a few waves of blocks are enough to saturate HBM; the cap keeps the grid legal.
  const int64_t blocks = std::min<int64_t>((n_vec + kThreads - 1) / kThreads, int64_t{1} << 16);
  nce_bwd_tile_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      tile, g, static_cast<uint32_t>(n_vec));
  return cudaGetLastError();
}

template cudaError_t launch_nce_bwd_tile<float>(const NceBwdTile&, float*, cudaStream_t);
template cudaError_t launch_nce_bwd_tile<__half>(const NceBwdTile&, __half*, cudaStream_t);
template cudaError_t launch_nce_bwd_tile<__nv_bfloat16>(const NceBwdTile&, __nv_bfloat16*,
                                                        cudaStream_t);

}  // namespace amdim_kernels
