// Argument checks shared by the CPU and CUDA kernels: the message says what was expected
// and what was got, so a user never has to read a stack of template frames.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace resnet_fast {

inline void check_same_tensor_meta(const at::Tensor& x, const at::Tensor& other,
                                   const char* op, const char* other_name) {
  TORCH_CHECK(x.sizes() == other.sizes(), op, ": expected ", other_name,
              " to have the same shape as x ", x.sizes(), ", got ", other.sizes(),
              " (no broadcasting)");
  TORCH_CHECK(x.scalar_type() == other.scalar_type(), op, ": expected ", other_name,
              " to have the same dtype as x (", x.scalar_type(), "), got ",
              other.scalar_type());
  TORCH_CHECK(x.device() == other.device(), op, ": expected ", other_name,
              " on the same device as x (", x.device(), "), got ", other.device());
}

inline void check_floating(const at::Tensor& x, const char* op) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              op, ": expected a float32, float64, float16 or bfloat16 tensor, got ", t);
}

// scale/shift: 1-D, one value per channel (dim 1 of x), in x's dtype or float32, on x's
// device. residual: exactly like x.
inline void check_scale_shift_args(const at::Tensor& x, const at::Tensor& scale,
                                   const at::Tensor& shift,
                                   const std::optional<at::Tensor>& residual, const char* op) {
  check_floating(x, op);
  TORCH_CHECK(x.dim() >= 2, op, ": expected x of shape (N, C, ...) with at least 2 dims, got ",
              x.sizes());
  const int64_t c = x.size(1);
  for (const auto* p : {&scale, &shift}) {
    const char* name = p == &scale ? "scale" : "shift";
    TORCH_CHECK(p->dim() == 1 && p->size(0) == c, op, ": expected ", name,
                " of shape (", c, ",) (one value per channel of x), got ", p->sizes());
    TORCH_CHECK(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat, op,
                ": expected ", name, " in x's dtype (", x.scalar_type(), ") or float32, got ",
                p->scalar_type());
    TORCH_CHECK(p->device() == x.device(), op, ": expected ", name,
                " on the same device as x (", x.device(), "), got ", p->device());
  }
  TORCH_CHECK(scale.scalar_type() == shift.scalar_type(), op,
              ": expected scale and shift of one dtype, got ", scale.scalar_type(), " and ",
              shift.scalar_type());
  if (residual.has_value()) check_same_tensor_meta(x, *residual, op, "residual");
}

// Output spatial size of a convolution along one dim, or a clear error.
inline int64_t conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil,
                             const char* dim) {
  const int64_t out = (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
  TORCH_CHECK(out > 0, "conv_bias_act: the ", dim, " of the output would be ", out,
              " (input ", in, ", kernel ", k, ", stride ", stride, ", padding ", pad,
              ", dilation ", dil, "); expected >= 1");
  return out;
}

// Checks every argument of conv_bias_act; returns the output shape (N, K, P, Q).
inline std::vector<int64_t> check_conv_args(const at::Tensor& x, const at::Tensor& w,
                                            const std::optional<at::Tensor>& bias,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation, int64_t groups,
                                            const std::optional<at::Tensor>& residual) {
  const char* op = "conv_bias_act";
  check_floating(x, op);
  TORCH_CHECK(x.dim() == 4, op, ": expected x of shape (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(w.dim() == 4, op, ": expected weight of shape (K, C/groups, R, S), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": expected weight in x's dtype (",
              x.scalar_type(), "), got ", w.scalar_type());
  TORCH_CHECK(w.device() == x.device(), op, ": expected weight on x's device (", x.device(),
              "), got ", w.device());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": expected 2 values each for stride, padding and dilation, got ", stride, ", ",
              padding, ", ", dilation);
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0, op,
                ": expected stride >= 1, dilation >= 1 and padding >= 0, got stride ", stride,
                ", padding ", padding, ", dilation ", dilation);
  }
  TORCH_CHECK(groups >= 1 && w.size(0) % groups == 0, op, ": expected groups >= 1 dividing the ",
              w.size(0), " output channels, got groups=", groups);
  TORCH_CHECK(x.size(1) == w.size(1) * groups, op, ": x has ", x.size(1),
              " channels but weight expects ", w.size(1) * groups, " (", w.size(1),
              " per group x groups=", groups, ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), op, ": expected bias of shape (",
                w.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": expected bias in x's dtype (",
                x.scalar_type(), "), got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": expected bias on x's device (", x.device(),
                "), got ", bias->device());
  }
  std::vector<int64_t> out{x.size(0), w.size(0),
                           conv_out_size(x.size(2), w.size(2), stride[0], padding[0], dilation[0], "height"),
                           conv_out_size(x.size(3), w.size(3), stride[1], padding[1], dilation[1], "width")};
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out), op,
                ": expected residual of the output's shape ", at::IntArrayRef(out), ", got ",
                residual->sizes(), " (no broadcasting)");
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), op,
                ": expected residual in x's dtype (", x.scalar_type(), "), got ",
                residual->scalar_type());
    TORCH_CHECK(residual->device() == x.device(), op, ": expected residual on x's device (",
                x.device(), "), got ", residual->device());
  }
  return out;
}

// The memory format a kernel writes: the one the caller's x is in. Elementwise kernels
// walk x, the residual and the output as flat arrays, which is valid when all three are
// dense with the same strides.
inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.dim() == 4 ? x.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

inline at::Tensor dense_in(const at::Tensor& t, at::MemoryFormat fmt) {
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

// batch_norm_act: a per-channel parameter (weight/bias), in x's dtype or float32.
inline void check_bn_param(const std::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  if (!p.has_value()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), "batch_norm_act: expected ", name,
              " of shape (", x.size(1), ",) (one value per channel of x), got ", p->sizes());
  TORCH_CHECK(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat,
              "batch_norm_act: expected ", name, " in x's dtype (", x.scalar_type(),
              ") or float32, got ", p->scalar_type());
  TORCH_CHECK(p->device() == x.device(), "batch_norm_act: expected ", name,
              " on x's device (", x.device(), "), got ", p->device());
}

// batch_norm_act in training: more than one value per channel.
inline void check_bn_batch(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "batch_norm_act: expected x of shape (N, C, ...), got ", x.sizes());
  const int64_t count = x.numel() / std::max<int64_t>(x.size(1), 1);
  // nn.BatchNorm2d refuses the same (one value per channel has no variance).
  TORCH_CHECK(count > 1 || x.size(1) == 0,
              "Expected more than 1 value per channel when training, got input size ", x.sizes());
}

// batch_norm_act forward: everything bn_act_fwd takes, on any device.
inline void check_bn_fwd_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual) {
  check_floating(x, "batch_norm_act");
  check_bn_batch(x);
  check_bn_param(weight, x, "weight");
  check_bn_param(bias, x, "bias");
  if (residual.has_value()) check_same_tensor_meta(x, *residual, "batch_norm_act", "residual");
}

// batch_norm_act backward: grad and the saved output exactly like x.
inline void check_bn_bwd_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                              const std::optional<at::Tensor>& weight) {
  check_floating(x, "batch_norm_act backward");
  check_same_tensor_meta(x, grad, "batch_norm_act backward", "grad");
  check_same_tensor_meta(x, out, "batch_norm_act backward", "out");
  check_bn_param(weight, x, "weight");
}

}  // namespace resnet_fast
