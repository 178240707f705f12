// Training BatchNorm fused with (+ residual) and ReLU on CUDA: bn_act_fwd and bn_act_bwd.
//
// Forward: the per-channel statistics are ATen's CUDA Welford reduction (at::batch_norm_stats,
// the one SyncBatchNorm uses), then ONE apply pass of ours, channel_affine_act:
// out = act((x - mean) * invstd * w + b (+ residual)), x - mean first so a large mean cannot
// cancel digits away.
// Backward: two passes of ours, with the ReLU mask (g' = grad where out > 0, as torch.relu's
// backward: a NaN output passes no gradient) applied inside both, never materialised:
//   1. per-channel partial sums of g' and g' * (x - mean) over slices of rows (float for
//      half/bfloat16/float, double for double), added up per channel in float64 (the
//      deterministic two-level reduction of the CPU and Triton kernels);
//   2. dx = a * g' + b * (x - mean) + k with per-channel a, b, k, and d residual = g' in the
//      same pass.
// x is viewed as rows (n, spatial) x channels: NHWC rows are contiguous runs of C channels,
// NCHW channels contiguous runs of H*W per image.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "channel_affine.h"
#include "elementwise_common.cuh"

namespace resnet_fast::cuda {
namespace {

constexpr int kLanes = 32;         // NHWC: channels per block (one warp-wide row of a tile)
constexpr int kRowsPerBlock = 8;   // NHWC: rows per block step; kLanes * kRowsPerBlock threads
constexpr int kMaxRowSlices = 512;  // the partial-sum arrays' first dimension, at most

template <typename acc_t>
__device__ __forceinline__ acc_t masked(acc_t g, acc_t o, bool relu) {
  return (!relu || o > acc_t(0)) ? g : acc_t(0);
}

// p1[slice, c] = sum g', p2[slice, c] = sum g' * (x - mean[c]) over the rows of one slice.
// NHWC: block (kLanes, kRowsPerBlock) covers kLanes channels (blockIdx.y) and a strided set
// of rows; NCHW: the block's kThreads threads walk rows of channel blockIdx.y.
template <typename scalar_t, bool kChannelsLast, typename index_t>
__global__ void masked_grad_sums_kernel(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ g,
                                        const scalar_t* __restrict__ o,
                                        const at::opmath_type<scalar_t>* __restrict__ mean,
                                        at::opmath_type<scalar_t>* __restrict__ p1,
                                        at::opmath_type<scalar_t>* __restrict__ p2, index_t rows,
                                        index_t hw, index_t channels, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t s1[kThreads];
  __shared__ acc_t s2[kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const index_t slices = gridDim.x;
  acc_t a1 = 0, a2 = 0;
  index_t c;
  if (kChannelsLast) {
    c = static_cast<index_t>(blockIdx.y) * kLanes + threadIdx.x;
    if (c < channels) {
      const acc_t m = mean[c];
      for (index_t row = static_cast<index_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
           row < rows; row += slices * kRowsPerBlock) {
        const index_t i = row * channels + c;
        const acc_t gi = masked<acc_t>(g[i], o[i], relu);
        a1 += gi;
        a2 += gi * (static_cast<acc_t>(x[i]) - m);
      }
    }
  } else {
    c = blockIdx.y;
    const acc_t m = mean[c];
    for (index_t row = static_cast<index_t>(blockIdx.x) * kThreads + tid; row < rows;
         row += slices * kThreads) {
      const index_t n = row / hw;
      const index_t i = (n * channels + c) * hw + (row - n * hw);
      const acc_t gi = masked<acc_t>(g[i], o[i], relu);
      a1 += gi;
      a2 += gi * (static_cast<acc_t>(x[i]) - m);
    }
  }
  s1[tid] = a1;
  s2[tid] = a2;
  __syncthreads();
  if (kChannelsLast) {
    // Sum over threadIdx.y: thread (lane, 0) holds its channel's slice total.
    if (threadIdx.y == 0 && c < channels) {
      for (int y = 1; y < kRowsPerBlock; ++y) {
        a1 += s1[y * kLanes + threadIdx.x];
        a2 += s2[y * kLanes + threadIdx.x];
      }
      p1[static_cast<int64_t>(blockIdx.x) * channels + c] = a1;
      p2[static_cast<int64_t>(blockIdx.x) * channels + c] = a2;
    }
  } else {
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (tid < half) {
        s1[tid] += s1[tid + half];
        s2[tid] += s2[tid + half];
      }
      __syncthreads();
    }
    if (tid == 0) {
      p1[static_cast<int64_t>(blockIdx.x) * channels + c] = s1[0];
      p2[static_cast<int64_t>(blockIdx.x) * channels + c] = s2[0];
    }
  }
}

// dx = a[c] * g' + b[c] * (x - mean[c]) + k[c]; dres = g' when dres is not null. Packs of VEC
// elements within one channel (NCHW) or VEC consecutive channels (NHWC), as channel_affine_act.
template <typename scalar_t, int VEC, typename index_t>
__global__ void masked_grad_elemt_kernel(const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ g,
                                         const scalar_t* __restrict__ o,
                                         const at::opmath_type<scalar_t>* __restrict__ mean,
                                         const at::opmath_type<scalar_t>* __restrict__ a,
                                         const at::opmath_type<scalar_t>* __restrict__ b,
                                         const at::opmath_type<scalar_t>* __restrict__ k,
                                         scalar_t* __restrict__ dx, scalar_t* __restrict__ dres,
                                         index_t n, index_t channels, index_t inner,
                                         bool channels_last, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n / VEC;
       i += stride) {
    const index_t e = i * VEC;
    const index_t c0 = channels_last ? e % channels : (e / inner) % channels;
    const P xv = reinterpret_cast<const P*>(x)[i];
    const P gv = reinterpret_cast<const P*>(g)[i];
    const P ov = reinterpret_cast<const P*>(o)[i];
    P dxv, drv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const index_t c = channels_last ? c0 + j : c0;
      const acc_t gi = masked<acc_t>(gv.v[j], ov.v[j], relu);
      dxv.v[j] = static_cast<scalar_t>(a[c] * gi + b[c] * (static_cast<acc_t>(xv.v[j]) - mean[c]) +
                                       k[c]);
      drv.v[j] = static_cast<scalar_t>(gi);
    }
    reinterpret_cast<P*>(dx)[i] = dxv;
    if (dres != nullptr) reinterpret_cast<P*>(dres)[i] = drv;
  }
  for (index_t i = n / VEC * VEC + static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    const index_t c = channels_last ? i % channels : (i / inner) % channels;
    const acc_t gi = masked<acc_t>(g[i], o[i], relu);
    dx[i] = static_cast<scalar_t>(a[c] * gi + b[c] * (static_cast<acc_t>(x[i]) - mean[c]) + k[c]);
    if (dres != nullptr) dres[i] = static_cast<scalar_t>(gi);
  }
}

bool fits_int32(const at::Tensor& x) {
  return x.numel() < std::numeric_limits<int32_t>::max();
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// (sum g', sum g' * (x - mean)) per channel, in float64.
std::tuple<at::Tensor, at::Tensor> masked_grad_sums(const at::Tensor& x, const at::Tensor& g,
                                                    const at::Tensor& o, const at::Tensor& mean,
                                                    bool channels_last, bool relu) {
  const int64_t c = x.size(1);
  const int64_t rows = x.numel() / c;
  const int64_t hw = rows / x.size(0);
  const int64_t channel_blocks = channels_last ? (c + kLanes - 1) / kLanes : c;
  const int64_t rows_per_step = channels_last ? kRowsPerBlock : kThreads;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Enough slices to fill the device about four times over; each slice at least a few steps.
  const int64_t slices = std::clamp<int64_t>(
      std::min<int64_t>((rows + 4 * rows_per_step - 1) / (4 * rows_per_step),
                        (int64_t(sms) * 4 + channel_blocks - 1) / channel_blocks),
      1, kMaxRowSlices);
  const at::Tensor p1 = at::empty({slices, c}, x.options().dtype(acc_type(x)));
  const at::Tensor p2 = at::empty_like(p1);
  const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(channel_blocks));
  const dim3 block = channels_last ? dim3(kLanes, kRowsPerBlock) : dim3(kThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_grad_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* op = o.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    acc_t* s1 = p1.mutable_data_ptr<acc_t>();
    acc_t* s2 = p2.mutable_data_ptr<acc_t>();
    const auto launch = [&](auto layout_tag, auto index) {
      using index_t = decltype(index);
      masked_grad_sums_kernel<scalar_t, decltype(layout_tag)::value, index_t>
          <<<grid, block, 0, stream>>>(xp, gp, op, mp, s1, s2, static_cast<index_t>(rows),
                                       static_cast<index_t>(hw), static_cast<index_t>(c), relu);
    };
    using Nhwc = std::true_type;
    using Nchw = std::false_type;
    if (fits_int32(x)) {
      channels_last ? launch(Nhwc{}, int32_t{}) : launch(Nchw{}, int32_t{});
    } else {
      channels_last ? launch(Nhwc{}, int64_t{}) : launch(Nchw{}, int64_t{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {p1.sum(0, false, at::kDouble), p2.sum(0, false, at::kDouble)};
}

// dx and (when dres is defined) d residual in one pass; a, b, k, mean in x's math type.
void masked_grad_elemt(const at::Tensor& x, const at::Tensor& g, const at::Tensor& o,
                       const at::Tensor& mean, const at::Tensor& a, const at::Tensor& b,
                       const at::Tensor& k, const at::Tensor& dx, const at::Tensor& dres,
                       bool channels_last, bool relu) {
  const int64_t n = x.numel();
  const int64_t channels = x.size(1);
  const int64_t inner = n / (x.size(0) * channels);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_grad_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* op = o.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* drp = dres.defined() ? dres.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t *mp = mean.const_data_ptr<acc_t>(), *ap = a.const_data_ptr<acc_t>(),
                *bp = b.const_data_ptr<acc_t>(), *kp = k.const_data_ptr<acc_t>();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool packs_fit = (channels_last ? channels % kVec == 0 : inner % kVec == 0) &&
                           aligned16(xp) && aligned16(gp) && aligned16(op) && aligned16(dxp) &&
                           aligned16(drp);
    const int vec = packs_fit ? kVec : 1;
    const unsigned blocks = grid_for(n / vec);
    const auto launch = [&](auto vec_tag, auto index) {
      constexpr int V = decltype(vec_tag)::value;
      using index_t = decltype(index);
      masked_grad_elemt_kernel<scalar_t, V, index_t><<<blocks, kThreads, 0, stream>>>(
          xp, gp, op, mp, ap, bp, kp, dxp, drp, static_cast<index_t>(n),
          static_cast<index_t>(channels), static_cast<index_t>(inner), channels_last, relu);
    };
    using Packed = std::integral_constant<int, kVec>;
    using Single = std::integral_constant<int, 1>;
    if (fits_int32(x)) {
      packs_fit ? launch(Packed{}, int32_t{}) : launch(Single{}, int32_t{});
    } else {
      packs_fit ? launch(Packed{}, int64_t{}) : launch(Single{}, int64_t{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, bool relu,
    double eps) {
  TORCH_CHECK(x_in.is_cuda(), "batch_norm_act (cuda): expected CUDA tensors, got ", x_in.device());
  check_bn_fwd_args(x_in, weight, bias, residual);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = dense_in(x_in, fmt);
  const auto st = acc_type(x);
  const int64_t c = x.size(1);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) {
    return {out, at::zeros({c}, x.options().dtype(st)), at::zeros({c}, x.options().dtype(st))};
  }
  // (mean, invstd) in float32 for reduced-precision x; the biased variance from invstd.
  auto [mean, invstd] = at::batch_norm_stats(x, eps);
  mean = mean.to(st).contiguous();
  invstd = invstd.to(st);
  const at::Tensor var = (invstd.pow(-2) - eps).clamp_min(0);
  const at::Tensor scale = (weight.has_value() ? invstd * weight->to(st) : invstd).contiguous();
  const at::Tensor shift = bias.has_value() ? bias->to(st).contiguous()
                                            : at::zeros({c}, x.options().dtype(st));
  const at::Tensor r = residual.has_value() ? dense_in(*residual, fmt) : at::Tensor();
  channel_affine_act(x, mean, scale, shift, r, out, fmt == at::MemoryFormat::ChannelsLast, relu);
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& out_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var,
    double eps, bool relu, bool residual_grad) {
  check_bn_bwd_args(grad_in, x_in, out_in, weight);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = layout_of(x_in);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = dense_in(x_in, fmt);
  const at::Tensor grad = dense_in(grad_in, fmt);
  const at::Tensor out = dense_in(out_in, fmt);
  const int64_t c = x.size(1);
  const auto st = acc_type(x);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor dres = residual_grad ? at::empty(x.sizes(), x.options().memory_format(fmt))
                                  : at::empty({0}, x.options());
  if (x.numel() == 0) {
    return {dx, at::zeros({c}, x.options().dtype(st)), at::zeros({c}, x.options().dtype(st)),
            dres};
  }
  const at::Tensor mean_acc = mean.to(st).contiguous();
  auto [sg, sgx] = masked_grad_sums(x, grad, out, mean_acc, channels_last, relu);
  // The per-channel coefficients in float64, as the Triton kernels' host code computes them.
  const double rows = static_cast<double>(x.numel() / c);
  const at::Tensor invstd = (var.to(at::kDouble) + eps).rsqrt();
  const at::Tensor a = weight.has_value() ? weight->to(at::kDouble) * invstd : invstd;
  const at::Tensor b = -a * invstd * invstd * sgx / rows;
  const at::Tensor k = -a * sg / rows;
  masked_grad_elemt(x, grad, out, mean_acc, a.to(st).contiguous(), b.to(st).contiguous(),
                    k.to(st).contiguous(), dx, residual_grad ? dres : at::Tensor(),
                    channels_last, relu);
  // dweight and dbias as the CPU backend returns them, also without a weight.
  return {dx, (sgx * invstd).to(st), sg.to(st), dres};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("bn_act_fwd", &bn_act_fwd_cuda);
  m.impl("bn_act_bwd", &bn_act_bwd_cuda);
}

}  // namespace resnet_fast::cuda
