// Training BatchNorm fused with (+ residual) and ReLU on CUDA: bn_act_fwd and bn_act_bwd.
//
// Forward: the per-channel statistics are ATen's CUDA Welford reduction (at::batch_norm_stats,
// the one SyncBatchNorm uses), then ONE apply pass of ours, channel_affine_act:
// out = act((x - mean) * invstd * w + b (+ residual)), x - mean first so a large mean cannot
// cancel digits away.
// Backward: two passes of ours, with the ReLU mask (g' = grad, 0 where out <= 0, as torch.relu's
// backward: a NaN output passes its gradient) applied inside both, never materialised:
//   1. per-channel partial sums of g' and g' * (x - mean) over slices of rows (float for
//      half/bfloat16/float, double for double), added up per channel in float64 (the
//      deterministic two-level reduction of the CPU and Triton kernels);
//   2. dx = a * g' + b * (x - mean) + k with per-channel a, b, k, and d residual = g' in the
//      same pass.
// x is viewed as rows (n, spatial) x channels: NHWC rows are contiguous runs of C channels,
// NCHW channels contiguous runs of H*W per image.
// Both passes move x, grad and out in 128-bit packs where the layout allows it (NHWC: C % VEC
// == 0, NCHW: H*W % VEC == 0; 16-byte aligned), and index in int32 only where no loop index can
// pass 2^31 - 1.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/batch_norm_stats.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "channel_affine.h"
#include "elementwise_common.cuh"

namespace resnet_fast::cuda {
namespace {

constexpr int kLanes = 32;          // NHWC: threads across channels in a block, at most
constexpr int kMaxRowSlices = 512;  // the partial-sum arrays' first dimension, at most

template <typename acc_t>
__device__ __forceinline__ acc_t masked(acc_t g, acc_t o, bool relu) {
  return (relu && o <= acc_t(0)) ? acc_t(0) : g;
}

// a1[j] += g'_j and a2[j] += g'_j * (x_j - m[j]) over the VEC elements of pack i.
template <typename scalar_t, int VEC, typename acc_t, typename index_t>
__device__ __forceinline__ void add_pack(const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ g,
                                         const scalar_t* __restrict__ o, index_t i,
                                         const acc_t (&m)[VEC], bool relu, acc_t (&a1)[VEC],
                                         acc_t (&a2)[VEC]) {
  using P = Pack<scalar_t, VEC>;
  const P xv = reinterpret_cast<const P*>(x)[i];
  const P gv = reinterpret_cast<const P*>(g)[i];
  const P ov = reinterpret_cast<const P*>(o)[i];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const acc_t gi = masked<acc_t>(gv.v[j], ov.v[j], relu);
    a1[j] += gi;
    a2[j] += gi * (static_cast<acc_t>(xv.v[j]) - m[j]);
  }
}

// p1[slice, c] = sum g', p2[slice, c] = sum g' * (x - mean[c]) over the rows of one slice, x, g
// and o read in packs of VEC (128 bits where they fit, as channel_affine_act).
// NHWC: block (lanes, rows) covers lanes * VEC consecutive channels (blockIdx.y), each thread
// one pack of VEC channels per row, over a strided set of rows; NCHW: the block's kThreads
// threads walk channel blockIdx.y in packs of VEC elements of a row (H*W % VEC == 0).
template <typename scalar_t, int VEC, bool kChannelsLast, typename index_t>
__global__ void masked_grad_sums_kernel(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ g,
                                        const scalar_t* __restrict__ o,
                                        const at::opmath_type<scalar_t>* __restrict__ mean,
                                        at::opmath_type<scalar_t>* __restrict__ p1,
                                        at::opmath_type<scalar_t>* __restrict__ p2, index_t rows,
                                        index_t hw, index_t channels, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t s1[kThreads * VEC];
  __shared__ acc_t s2[kThreads * VEC];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const index_t slices = gridDim.x;
  acc_t a1[VEC] = {}, a2[VEC] = {};
  if (kChannelsLast) {
    const index_t c0 = (static_cast<index_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
    if (c0 < channels) {
      acc_t m[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) m[j] = mean[c0 + j];
      const index_t rows_per_block = blockDim.y;
      for (index_t row = static_cast<index_t>(blockIdx.x) * rows_per_block +
                         static_cast<index_t>(threadIdx.y);
           row < rows; row += slices * rows_per_block) {
        add_pack<scalar_t, VEC>(x, g, o, (row * channels + c0) / VEC, m, relu, a1, a2);
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s1[tid * VEC + j] = a1[j];
      s2[tid * VEC + j] = a2[j];
    }
    __syncthreads();
    // Sum over threadIdx.y: thread (lane, 0) holds its VEC channels' slice totals.
    if (threadIdx.y == 0 && c0 < channels) {
      for (unsigned y = 1; y < blockDim.y; ++y) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          a1[j] += s1[(y * blockDim.x + threadIdx.x) * VEC + j];
          a2[j] += s2[(y * blockDim.x + threadIdx.x) * VEC + j];
        }
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        p1[static_cast<int64_t>(blockIdx.x) * channels + c0 + j] = a1[j];
        p2[static_cast<int64_t>(blockIdx.x) * channels + c0 + j] = a2[j];
      }
    }
  } else {
    const index_t c = blockIdx.y;
    acc_t m[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) m[j] = mean[c];
    for (index_t pack = static_cast<index_t>(blockIdx.x) * kThreads + tid; pack < rows / VEC;
         pack += slices * kThreads) {
      const index_t row = pack * VEC;
      const index_t n = row / hw;
      add_pack<scalar_t, VEC>(x, g, o, ((n * channels + c) * hw + (row - n * hw)) / VEC, m,
                              relu, a1, a2);
    }
#pragma unroll
    for (int j = 1; j < VEC; ++j) {
      a1[0] += a1[j];
      a2[0] += a2[j];
    }
    s1[tid] = a1[0];
    s2[tid] = a2[0];
    __syncthreads();
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

// The per-channel values of one pack's VEC elements: NHWC packs hold VEC consecutive channels
// (one vector load; c0 % VEC == 0), NCHW packs lie within channel c0 (one load for all VEC).
template <int VEC, typename acc_t, typename index_t>
__device__ __forceinline__ Pack<acc_t, VEC> per_channel(const acc_t* __restrict__ p, index_t c0,
                                                        bool channels_last) {
  if (channels_last) return reinterpret_cast<const Pack<acc_t, VEC>*>(p + c0)[0];
  const acc_t v = p[c0];
  Pack<acc_t, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) out.v[j] = v;
  return out;
}

// dx = a[c] * g' + b[c] * (x - mean[c]) + k[c]; dres = g' when dres is not null. Packs of VEC
// elements within one channel (NCHW) or VEC consecutive channels (NHWC), as channel_affine_act;
// the four per-channel parameters are loaded once per pack. The launcher takes packs only where
// VEC divides the channels (NHWC) or H*W (NCHW), so no elements are left over.
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
    const auto mv = per_channel<VEC>(mean, c0, channels_last);
    const auto av = per_channel<VEC>(a, c0, channels_last);
    const auto bv = per_channel<VEC>(b, c0, channels_last);
    const auto kv = per_channel<VEC>(k, c0, channels_last);
    P dxv, drv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t gi = masked<acc_t>(gv.v[j], ov.v[j], relu);
      dxv.v[j] = static_cast<scalar_t>(av.v[j] * gi +
                                       bv.v[j] * (static_cast<acc_t>(xv.v[j]) - mv.v[j]) + kv.v[j]);
      drv.v[j] = static_cast<scalar_t>(gi);
    }
    reinterpret_cast<P*>(dx)[i] = dxv;
    if (dres != nullptr) reinterpret_cast<P*>(dres)[i] = drv;
  }
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
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor p1, p2;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_grad_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* op = o.const_data_ptr<scalar_t>();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool packs_fit = (channels_last ? c % kVec == 0 : hw % kVec == 0) && aligned16(xp) &&
                           aligned16(gp) && aligned16(op);
    const int64_t vec = packs_fit ? kVec : 1;
    // NHWC: as many lanes as the row has packs, up to kLanes, the rest of the block on rows.
    const int64_t lanes = std::min<int64_t>(kLanes, (c + vec - 1) / vec);
    const dim3 block = channels_last ? dim3(static_cast<unsigned>(lanes),
                                            static_cast<unsigned>(kThreads / lanes))
                                     : dim3(kThreads);
    const int64_t channel_blocks = channels_last ? (c + lanes * vec - 1) / (lanes * vec) : c;
    const int64_t rows_per_step = channels_last ? block.y : kThreads * vec;
    // Enough slices to fill the device about four times over; each slice at least a few steps.
    const int64_t slices = std::clamp<int64_t>(
        std::min<int64_t>((rows + 4 * rows_per_step - 1) / (4 * rows_per_step),
                          (int64_t(sms) * 4 + channel_blocks - 1) / channel_blocks),
        1, kMaxRowSlices);
    p1 = at::empty({slices, c}, x.options().dtype(acc_type(x)));
    p2 = at::empty_like(p1);
    const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(channel_blocks));
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    acc_t* s1 = p1.mutable_data_ptr<acc_t>();
    acc_t* s2 = p2.mutable_data_ptr<acc_t>();
    const auto launch = [&](auto vec_tag, auto layout_tag, auto index) {
      using index_t = decltype(index);
      masked_grad_sums_kernel<scalar_t, decltype(vec_tag)::value, decltype(layout_tag)::value,
                              index_t><<<grid, block, 0, stream>>>(
          xp, gp, op, mp, s1, s2, static_cast<index_t>(rows), static_cast<index_t>(hw),
          static_cast<index_t>(c), relu);
    };
    const auto with_index = [&](auto vec_tag, auto layout_tag) {
      // The row loop's index passes `rows` by at most one step of slices * rows_per_step.
      if (index_fits_int32(x.numel(), slices * rows_per_step * vec)) {
        launch(vec_tag, layout_tag, int32_t{});
      } else {
        launch(vec_tag, layout_tag, int64_t{});
      }
    };
    const auto with_layout = [&](auto vec_tag) {
      channels_last ? with_index(vec_tag, std::true_type{})
                    : with_index(vec_tag, std::false_type{});
    };
    packs_fit ? with_layout(std::integral_constant<int, kVec>{})
              : with_layout(std::integral_constant<int, 1>{});
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
    // NHWC packs read their VEC parameters of each kind as one vector.
    constexpr std::size_t kParamPack = sizeof(Pack<acc_t, kVec>);
    const bool params_fit = !channels_last || (aligned(mp, kParamPack) &&
                                               aligned(ap, kParamPack) &&
                                               aligned(bp, kParamPack) && aligned(kp, kParamPack));
    const bool packs_fit = (channels_last ? channels % kVec == 0 : inner % kVec == 0) &&
                           aligned16(xp) && aligned16(gp) && aligned16(op) && aligned16(dxp) &&
                           aligned16(drp) && params_fit;
    const int vec = packs_fit ? kVec : 1;
    const unsigned blocks = grid_for(n / vec);
    const auto launch = [&](auto vec_tag, auto index) {
      constexpr int V = decltype(vec_tag)::value;
      using index_t = decltype(index);
      masked_grad_elemt_kernel<scalar_t, V, index_t><<<blocks, kThreads, 0, stream>>>(
          xp, gp, op, mp, ap, bp, kp, dxp, drp, static_cast<index_t>(n),
          static_cast<index_t>(channels), static_cast<index_t>(inner), channels_last, relu);
    };
    const auto with_index = [&](auto vec_tag) {
      if (index_fits_int32(n, static_cast<int64_t>(blocks) * kThreads)) {
        launch(vec_tag, int32_t{});
      } else {
        launch(vec_tag, int64_t{});
      }
    };
    packs_fit ? with_index(std::integral_constant<int, kVec>{})
              : with_index(std::integral_constant<int, 1>{});
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
  const at::Tensor var = invstd.pow(-2).sub(eps).clamp_min(0);
  const at::Tensor scale = (weight.has_value() ? invstd.mul(weight->to(st)) : invstd).contiguous();
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
  const at::Tensor invstd = var.to(at::kDouble).add(eps).rsqrt();
  const at::Tensor a = weight.has_value() ? weight->to(at::kDouble).mul(invstd) : invstd;
  const at::Tensor b = a.neg().mul(invstd).mul(invstd).mul(sgx).div(rows);
  const at::Tensor k = a.neg().mul(sg).div(rows);
  masked_grad_elemt(x, grad, out, mean_acc, a.to(st).contiguous(), b.to(st).contiguous(),
                    k.to(st).contiguous(), dx, residual_grad ? dres : at::Tensor(),
                    channels_last, relu);
  // dweight and dbias as the CPU backend returns them, also without a weight.
  return {dx, sgx.mul(invstd).to(st), sg.to(st), dres};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("bn_act_fwd", &bn_act_fwd_cuda);
  m.impl("bn_act_bwd", &bn_act_bwd_cuda);
}

}  // namespace resnet_fast::cuda
