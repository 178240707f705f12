// The CPU implementations of the resnet_fast ops: argument checks, layout, allocation, and
// the call into the kernels for this CPU's instruction set (kernels.h).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "../checks.h"
#include "buffer_pool.h"
#include "kernels.h"

namespace resnet_fast::cpu {

bool use_avx2() {
  static const bool ok = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    if (env != nullptr && (std::strcmp(env, "default") == 0 || std::strcmp(env, "DEFAULT") == 0))
      return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
#else
    return false;
#endif
  }();
  return ok;
}

namespace {

at::Tensor add_relu_cpu(const at::Tensor& x_in, const at::Tensor& residual_in) {
  check_floating(x_in, "add_relu");
  check_same_tensor_meta(x_in, residual_in, "add_relu", "residual");
  TORCH_CHECK(x_in.device().is_cpu(), "add_relu (cpu): expected CPU tensors, got ",
              x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = dense_in(x_in, fmt);
  const at::Tensor r = dense_in(residual_in, fmt);
  at::Tensor out = empty_output(x.sizes(), x.options(), fmt);
  if (out.numel() == 0) return out;
  add_relu(x, r, out);
  return out;
}

at::Tensor scale_shift_act_cpu(const at::Tensor& x_in, const at::Tensor& scale,
                               const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                               bool relu) {
  check_scale_shift_args(x_in, scale, shift, residual, "scale_shift_act");
  TORCH_CHECK(x_in.device().is_cpu(), "scale_shift_act (cpu): expected CPU tensors, got ",
              x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = dense_in(x_in, fmt);
  const at::Tensor r = residual.has_value() ? dense_in(*residual, fmt) : at::Tensor();
  at::Tensor out = empty_output(x.sizes(), x.options(), fmt);
  if (out.numel() == 0) return out;
  scale_shift_act(x, scale, shift, r, relu, fmt == at::MemoryFormat::ChannelsLast, out);
  return out;
}

// act(max_pool2d(x, kernel_size, stride, padding)) with dilation 1 and floor rounding (torch's
// defaults), written once, in x's layout; the kernel reads x channels_last.
at::Tensor max_pool_act_cpu(const at::Tensor& x_in, at::IntArrayRef kernel_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, bool relu) {
  const char* op = "max_pool_act";
  check_floating(x_in, op);
  TORCH_CHECK(x_in.device().is_cpu(), op, " (cpu): expected a CPU tensor, got ", x_in.device());
  TORCH_CHECK_VALUE(x_in.dim() == 4, op, ": expected x of shape (N, C, H, W), got ",
                    Shape{x_in.sizes()});
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
                    ": expected 2 values each for kernel_size, stride and padding, got ",
                    Shape{kernel_size}, ", ", Shape{stride}, ", ", Shape{padding});
  std::vector<int64_t> shape{x_in.size(0), x_in.size(1), 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t k = kernel_size[d], s = stride[d], p = padding[d], in = x_in.size(2 + d);
    TORCH_CHECK_VALUE(k > 0 && s > 0 && p >= 0 && 2 * p <= k, op, ": expected kernel_size > 0, "
                      "stride > 0 and 0 <= padding <= kernel_size / 2, got kernel_size ",
                      Shape{kernel_size}, ", stride ", Shape{stride}, ", padding ",
                      Shape{padding});
    TORCH_CHECK_VALUE(in + 2 * p >= k, op, ": expected an input at least the window (",
                      k - 2 * p, ") in each spatial dim after padding, got ",
                      Shape{x_in.sizes()});
    shape[2 + d] = (in + 2 * p - k) / s + 1;
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = dense_in(x_in, cl);
  at::Tensor out = empty_output(shape, x.options(), cl);
  if (out.numel() > 0) {
    max_pool_act(x, out, kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0],
                 padding[1], relu);
  }
  return dense_in(out, layout_of(x_in));
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CatchAll, m) {
  m.impl("cpu_buffer_cache_clear", &buffer_cache_clear);
  m.impl("cpu_buffer_cache_bytes", &buffer_cache_bytes);
}

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("add_relu", &add_relu_cpu);
  m.impl("scale_shift_act", &scale_shift_act_cpu);
  m.impl("max_pool_act", &max_pool_act_cpu);
}

}  // namespace resnet_fast::cpu
