// to_channels_last on CPU: an NCHW-dense tensor copied to channels_last by a blocked transpose;
// also every CPU op's dense_in (checks.h) to channels_last.
//
// torch's copy walks the output in order and reads the input H*W elements apart: where H*W is
// a large power of two every read of a pixel's channels lands in one cache set, and the copy
// of an FPN level (256x128x128 float32) took 12.5-15 ms against 1.0 for a plain copy. Here
// each task moves a block of 16 channels over a run of pixels, tiles of 16 channels x 64
// pixels: the 16 input rows are read in order and each output pixel gets its 16 channels as
// one contiguous run, into a buffer from the cache (buffer_pool.h). AVX2 EPYC, 2 threads:
// that level 2.4 ms, 1024x32x32 0.7 vs 2.5, 16x3x224x224 images 0.9 vs 1.3; 16x256x56x56
// even (~26 ms, bandwidth). Any other input (not NCHW-dense) is copied by torch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"
#include "buffer_pool.h"

namespace resnet_fast::cpu {
namespace {

constexpr int64_t kTileC = 16, kTileP = 64, kRun = 4096;  // pixels per task

// out (N, HW, C) = in (N, C, HW) transposed per image; T an unsigned integer of the element's
// size (the bits are moved, whatever the dtype).
template <typename T>
void transpose(const T* in, T* out, int64_t N, int64_t C, int64_t HW) {
  const int64_t cblocks = (C + kTileC - 1) / kTileC, runs = (HW + kRun - 1) / kRun;
  at::parallel_for(0, N * cblocks * runs, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / (cblocks * runs), cb = t / runs % cblocks, run = t % runs;
      const int64_t c0 = cb * kTileC, cn = std::min(kTileC, C - c0);
      const T* src = in + (n * C + c0) * HW;
      T* dst = out + n * C * HW + c0;
      for (int64_t p0 = run * kRun, p1 = std::min(HW, p0 + kRun); p0 < p1; p0 += kTileP) {
        const int64_t pn = std::min(kTileP, p1 - p0);
        if (cn == kTileC) {  // a whole block: the channel loop unrolled
          for (int64_t p = p0; p < p0 + pn; ++p)
#pragma GCC unroll 16
            for (int64_t c = 0; c < kTileC; ++c) dst[p * C + c] = src[c * HW + p];
        } else {
          for (int64_t p = p0; p < p0 + pn; ++p)
            for (int64_t c = 0; c < cn; ++c) dst[p * C + c] = src[c * HW + p];
        }
      }
    }
  });
}

}  // namespace

at::Tensor to_channels_last(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.layout() == at::kStrided,
                    "to_channels_last: expected a 4-D strided tensor (N, C, H, W), got ",
                    x.dim(), "-D of layout ", x.layout());
  const auto cl = at::MemoryFormat::ChannelsLast;
  if (!x.is_contiguous() || x.is_contiguous(cl) || x.numel() == 0) return x.clone(cl);
  // From the buffer cache: a fresh output's page faults cost more than the transpose (in an
  // FPN train step the 256x128x128 copy took 12.6 ms on fresh pages, 2.4 on reused ones).
  at::Tensor out = empty_output(x.sizes(), x.options(), cl);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto run = [&](auto bits) {  // the element's bits moved, whatever the dtype
    using T = decltype(bits);
    transpose(static_cast<const T*>(x.const_data_ptr()), static_cast<T*>(out.mutable_data_ptr()),
              N, C, HW);
  };
  switch (x.element_size()) {
    case 1: run(uint8_t{}); break;
    case 2: run(uint16_t{}); break;
    case 4: run(uint32_t{}); break;
    case 8: run(uint64_t{}); break;
    default: out.copy_(x);  // complex128
  }
  return out;
}

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) { m.impl("to_channels_last", &to_channels_last); }

}  // namespace resnet_fast::cpu
