// add_relu on CPU: out = relu(x + residual) in one pass, vectorized with at::vec and
// split across threads with at::parallel_for. NCHW and channels_last are both walked as
// flat arrays in the caller's layout (no conversion). Half and bfloat16 are computed in
// float and rounded once, which is what eager `torch.relu(x + r)` produces as well
// (rounding is monotonic and 0 is exact), so all dtypes match torch bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"

namespace resnet_fast {
namespace {

using at::vec::Vectorized;

// NaN-propagating relu, as torch.relu: a NaN stays NaN (std::max would turn it into 0).
template <typename T>
inline T relu_scalar(T v) {
  return (v > T(0) || std::isnan(v)) ? v : T(0);
}

template <typename scalar_t>
void add_relu_range(const scalar_t* x, const scalar_t* r, scalar_t* out, int64_t begin,
                    int64_t end) {
  using Vec = Vectorized<scalar_t>;
  const Vec zero(scalar_t(0));
  int64_t i = begin;
  // at::vec::maximum propagates NaN from either side (IEEE 754-2019 maximum).
  for (; i + Vec::size() <= end; i += Vec::size()) {
    const Vec v = Vec::loadu(x + i) + Vec::loadu(r + i);
    at::vec::maximum(v, zero).store(out + i);
  }
  for (; i < end; ++i) out[i] = relu_scalar(x[i] + r[i]);
}

template <typename scalar_t>
void add_relu_range_reduced(const scalar_t* x, const scalar_t* r, scalar_t* out,
                            int64_t begin, int64_t end) {
  using Vec = Vectorized<scalar_t>;
  using fVec = Vectorized<float>;
  const fVec zero(0.f);
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    auto [x0, x1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(x + i));
    auto [r0, r1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(r + i));
    at::vec::convert_from_float<scalar_t>(at::vec::maximum(x0 + r0, zero),
                                          at::vec::maximum(x1 + r1, zero))
        .store(out + i);
  }
  for (; i < end; ++i) {
    out[i] = scalar_t(relu_scalar(static_cast<float>(x[i]) + static_cast<float>(r[i])));
  }
}

at::Tensor add_relu_cpu(const at::Tensor& x_in, const at::Tensor& residual_in) {
  check_floating(x_in, "add_relu");
  check_same_tensor_meta(x_in, residual_in, "add_relu", "residual");
  TORCH_CHECK(x_in.device().is_cpu(), "add_relu (cpu): expected CPU tensors, got ",
              x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = dense_in(x_in, fmt);
  const at::Tensor r = dense_in(residual_in, fmt);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  const int64_t n = x.numel();
  if (n == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
        add_relu_range_reduced(xp, rp, op, begin, end);
      } else {
        add_relu_range(xp, rp, op, begin, end);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) { m.impl("add_relu", &add_relu_cpu); }

}  // namespace resnet_fast
