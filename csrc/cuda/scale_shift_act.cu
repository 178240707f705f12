// scale_shift_act on CUDA: out = act(x * scale[c] + shift[c] (+ residual)), one pass, and the
// kernel under it, channel_affine_act (channel_affine.h), which the training BatchNorm's apply
// pass also runs with a per-channel center subtracted first. A thread handles packs of 128 bits (VEC elements) when the pointers are 16-byte aligned and
// a pack never straddles two channels (NCHW: H*W % VEC == 0; NHWC: C % VEC == 0); otherwise
// single elements. Channel of a pack: NCHW (i / HW) % C, NHWC i % C, in 32-bit arithmetic when
// the grid-stride loop's index cannot pass 2^31 - 1 (the common case) and 64-bit otherwise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "../checks.h"
#include "channel_affine.h"
#include "elementwise_common.cuh"

namespace resnet_fast::cuda {
namespace {

template <typename index_t>
__device__ __forceinline__ index_t channel_of(index_t elem, index_t channels, index_t inner,
                                              bool channels_last) {
  return channels_last ? elem % channels : (elem / inner) % channels;
}

template <typename scalar_t, int VEC, typename index_t>
__global__ void channel_affine_act_kernel(const scalar_t* __restrict__ x,
                                       const at::opmath_type<scalar_t>* __restrict__ center,
                                       const at::opmath_type<scalar_t>* __restrict__ scale,
                                       const at::opmath_type<scalar_t>* __restrict__ shift,
                                       const scalar_t* __restrict__ r, scalar_t* __restrict__ out,
                                       index_t n, index_t channels, index_t inner,
                                       bool channels_last, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  const index_t n_packs = n / VEC;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_packs;
       i += stride) {
    const index_t c0 = channel_of<index_t>(i * VEC, channels, inner, channels_last);
    const P a = reinterpret_cast<const P*>(x)[i];
    P b;
    if (r != nullptr) b = reinterpret_cast<const P*>(r)[i];
    P o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      // NHWC packs hold VEC consecutive channels; NCHW packs lie within one channel.
      const index_t c = channels_last ? c0 + k : c0;
      acc_t v = static_cast<acc_t>(a.v[k]);
      if (center != nullptr) v -= center[c];
      v = v * scale[c] + shift[c];
      if (r != nullptr) v += static_cast<acc_t>(b.v[k]);
      o.v[k] = static_cast<scalar_t>(relu ? relu_nan(v) : v);
    }
    reinterpret_cast<P*>(out)[i] = o;
  }
  for (index_t i = n_packs * VEC + static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    const index_t c = channel_of<index_t>(i, channels, inner, channels_last);
    acc_t v = static_cast<acc_t>(x[i]);
    if (center != nullptr) v -= center[c];
    v = v * scale[c] + shift[c];
    if (r != nullptr) v += static_cast<acc_t>(r[i]);
    out[i] = static_cast<scalar_t>(relu ? relu_nan(v) : v);
  }
}

template <typename scalar_t, int VEC>
void launch(const scalar_t* x, const at::opmath_type<scalar_t>* m, const at::opmath_type<scalar_t>* s,
            const at::opmath_type<scalar_t>* b, const scalar_t* r, scalar_t* out, int64_t n,
            int64_t channels, int64_t inner, bool channels_last, bool relu) {
  const unsigned blocks = grid_for(n / VEC);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (index_fits_int32(n, static_cast<int64_t>(blocks) * kThreads)) {
    channel_affine_act_kernel<scalar_t, VEC, int32_t><<<blocks, kThreads, 0, stream>>>(
        x, m, s, b, r, out, static_cast<int32_t>(n), static_cast<int32_t>(channels),
        static_cast<int32_t>(inner), channels_last, relu);
  } else {
    channel_affine_act_kernel<scalar_t, VEC, int64_t><<<blocks, kThreads, 0, stream>>>(
        x, m, s, b, r, out, n, channels, inner, channels_last, relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void channel_affine_act(const at::Tensor& x, const at::Tensor& center, const at::Tensor& scale,
                        const at::Tensor& shift, const at::Tensor& r, const at::Tensor& out,
                        bool channels_last, bool relu) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const int64_t channels = x.size(1);
  const int64_t inner = n / (x.size(0) * channels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_affine_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* mp = center.defined() ? center.const_data_ptr<acc_t>() : nullptr;
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* bp = shift.const_data_ptr<acc_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool packs_fit = channels_last ? channels % kVec == 0 : inner % kVec == 0;
    if (packs_fit && aligned16(xp) && aligned16(rp) && aligned16(op)) {
      launch<scalar_t, kVec>(xp, mp, sp, bp, rp, op, n, channels, inner, channels_last, relu);
    } else {
      launch<scalar_t, 1>(xp, mp, sp, bp, rp, op, n, channels, inner, channels_last, relu);
    }
  });
}

namespace {

at::Tensor scale_shift_act_cuda(const at::Tensor& x_in, const at::Tensor& scale,
                                const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                                bool relu) {
  check_scale_shift_args(x_in, scale, shift, residual, "scale_shift_act");
  TORCH_CHECK(x_in.is_cuda(), "scale_shift_act (cuda): expected CUDA tensors, got ",
              x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = dense_in(x_in, fmt);
  const at::Tensor r = residual.has_value() ? dense_in(*residual, fmt) : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  channel_affine_act(x, at::Tensor(), scale.to(acc).contiguous(), shift.to(acc).contiguous(), r,
                     out, fmt == at::MemoryFormat::ChannelsLast, relu);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) { m.impl("scale_shift_act", &scale_shift_act_cuda); }

}  // namespace resnet_fast::cuda
