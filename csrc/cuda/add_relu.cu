// add_relu on CUDA: out = relu(x + residual) in one pass. Each thread moves 128 bits per
// load/store when all three pointers are 16-byte aligned (the usual case for a fresh
// allocation), else one element at a time. Indices are int64 so tensors past 2^31
// elements work; math is in float (opmath) for half/bfloat16, rounded once on store.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"
#include "elementwise_common.cuh"

namespace resnet_fast::cuda {
namespace {

template <typename scalar_t, int VEC>
__global__ void add_relu_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r,
                                scalar_t* __restrict__ out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_vec = n / VEC;
  for (int64_t i = tid; i < n_vec; i += stride) {
    const P a = reinterpret_cast<const P*>(x)[i];
    const P b = reinterpret_cast<const P*>(r)[i];
    P o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      o.v[k] = static_cast<scalar_t>(
          relu_nan(static_cast<acc_t>(a.v[k]) + static_cast<acc_t>(b.v[k])));
    }
    reinterpret_cast<P*>(out)[i] = o;
  }
  for (int64_t i = n_vec * VEC + tid; i < n; i += stride) {
    out[i] = static_cast<scalar_t>(relu_nan(static_cast<acc_t>(x[i]) + static_cast<acc_t>(r[i])));
  }
}

template <typename scalar_t, int VEC>
void launch(const scalar_t* x, const scalar_t* r, scalar_t* out, int64_t n) {
  add_relu_kernel<scalar_t, VEC><<<grid_for(n / VEC), kThreads, 0,
                                   at::cuda::getCurrentCUDAStream()>>>(x, r, out, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor add_relu_cuda(const at::Tensor& x_in, const at::Tensor& residual_in) {
  check_floating(x_in, "add_relu");
  check_same_tensor_meta(x_in, residual_in, "add_relu", "residual");
  TORCH_CHECK(x_in.is_cuda(), "add_relu (cuda): expected CUDA tensors, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = dense_in(x_in, fmt);
  const at::Tensor r = dense_in(residual_in, fmt);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  const int64_t n = x.numel();
  if (n == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (aligned16(xp) && aligned16(rp) && aligned16(op)) {
      launch<scalar_t, kVec>(xp, rp, op, n);
    } else {
      launch<scalar_t, 1>(xp, rp, op, n);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) { m.impl("add_relu", &add_relu_cuda); }

}  // namespace resnet_fast::cuda
