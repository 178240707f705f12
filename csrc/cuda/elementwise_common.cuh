// Pieces shared by the elementwise CUDA kernels.
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace resnet_fast::cuda {

constexpr int kThreads = 256;

// N values moved as one 128-bit (or narrower) load/store.
template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

// NaN-propagating like torch.relu (fmaxf(v, 0) would return 0 for NaN).
template <typename acc_t>
__device__ __forceinline__ acc_t relu_nan(acc_t v) {
  return (v > acc_t(0) || v != v) ? v : acc_t(0);
}

inline bool aligned(const void* p, std::size_t bytes) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

inline bool aligned16(const void* p) { return aligned(p, 16); }

// Whether a grid-stride loop over `n` items, `stride` apart, may index in int32: its index
// reaches up to n + stride - 1 before the loop test, which must not wrap (signed overflow is
// undefined; near 2^31 elements it turned negative).
inline bool index_fits_int32(int64_t n, int64_t stride) {
  return n + stride <= std::numeric_limits<int32_t>::max();
}

// Blocks for a grid-stride loop over `work` items: enough to fill the device, no more.
inline unsigned grid_for(int64_t work) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = (std::max<int64_t>(work, 1) + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<int64_t>(blocks, int64_t(sms) * 32));
}

}  // namespace resnet_fast::cuda
