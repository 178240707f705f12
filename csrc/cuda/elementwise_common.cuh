// Pieces shared by the elementwise CUDA kernels.
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

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

inline bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// Blocks for a grid-stride loop over `work` items: enough to fill the device, no more.
inline unsigned grid_for(int64_t work) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = (std::max<int64_t>(work, 1) + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<int64_t>(blocks, int64_t(sms) * 32));
}

}  // namespace resnet_fast::cuda
