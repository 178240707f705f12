// Argument checks shared by the CPU and CUDA kernels: the message says what was expected
// and what was got, so a user never has to read a stack of template frames. They raise what
// the Python checks (resnet_fast/ops/_common.py and each op's file) raise: TypeError for a
// dtype, ValueError for a shape, size or device.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <ostream>
#include <optional>
#include <vector>

namespace resnet_fast {

// A shape as Python prints a tuple, "(2, 3)" or "(3,)", so a message reads the same from the
// C++ kernels and from the Python checks.
struct Shape {
  at::IntArrayRef sizes;
};

// A dtype as Python prints it, "torch.float32", for the same reason.
struct DType {
  at::ScalarType type;
};

inline std::ostream& operator<<(std::ostream& os, const DType& dtype) {
  switch (dtype.type) {
    case at::kFloat: return os << "torch.float32";
    case at::kDouble: return os << "torch.float64";
    case at::kHalf: return os << "torch.float16";
    case at::kBFloat16: return os << "torch.bfloat16";
    case at::kInt: return os << "torch.int32";
    case at::kLong: return os << "torch.int64";
    case at::kBool: return os << "torch.bool";
    default: return os << "torch." << dtype.type;
  }
}

inline std::ostream& operator<<(std::ostream& os, const Shape& shape) {
  os << '(';
  for (size_t i = 0; i < shape.sizes.size(); ++i) os << (i ? ", " : "") << shape.sizes[i];
  return os << (shape.sizes.size() == 1 ? ",)" : ")");
}

inline void check_same_tensor_meta(const at::Tensor& x, const at::Tensor& other,
                                   const char* op, const char* other_name) {
  TORCH_CHECK_VALUE(x.sizes() == other.sizes(), op, ": expected ", other_name,
              " to have the same shape as x ", Shape{x.sizes()}, ", got ", Shape{other.sizes()},
              " (no broadcasting)");
  TORCH_CHECK_TYPE(x.scalar_type() == other.scalar_type(), op, ": expected ", other_name,
              " to have the same dtype as x (", DType{x.scalar_type()}, "), got ",
              DType{other.scalar_type()});
  TORCH_CHECK_VALUE(x.device() == other.device(), op, ": expected ", other_name,
              " on the same device as x (", x.device(), "), got ", other.device());
}

inline void check_floating(const at::Tensor& x, const char* op) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              op, ": expected a float32, float64, float16 or bfloat16 tensor, got ", DType{t});
}

// scale/shift: 1-D, one value per channel (dim 1 of x), in x's dtype or float32, on x's
// device. residual: exactly like x.
inline void check_scale_shift_args(const at::Tensor& x, const at::Tensor& scale,
                                   const at::Tensor& shift,
                                   const std::optional<at::Tensor>& residual, const char* op) {
  check_floating(x, op);
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": expected x of shape (N, C, ...) with at least 2 dims, got ",
              Shape{x.sizes()});
  const int64_t c = x.size(1);
  for (const auto* p : {&scale, &shift}) {
    const char* name = p == &scale ? "scale" : "shift";
    TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == c, op, ": expected ", name,
                " of shape (", c, ",) (one value per channel of x), got ", Shape{p->sizes()});
    TORCH_CHECK_TYPE(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat, op,
                ": expected ", name, " in x's dtype (", DType{x.scalar_type()}, ") or float32, got ",
                DType{p->scalar_type()});
    TORCH_CHECK_VALUE(p->device() == x.device(), op, ": expected ", name,
                " on the same device as x (", x.device(), "), got ", p->device());
  }
  TORCH_CHECK_TYPE(scale.scalar_type() == shift.scalar_type(), op,
              ": expected scale and shift of one dtype, got ", DType{scale.scalar_type()}, " and ",
              DType{shift.scalar_type()});
  if (residual.has_value()) check_same_tensor_meta(x, *residual, op, "residual");
}

// Output spatial size of a convolution along one dim, or a clear error. The padded input must
// hold the dilated kernel: C++ division truncates toward zero, so testing `out > 0` alone
// would let a padded input one short of the kernel through (an empty input with a 7x7/2
// stem: (0 + 6 - 7) / 2 + 1 == 1) and the kernel would read nothing into its output.
inline int64_t conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil,
                             const char* dim) {
  const int64_t span = in + 2 * pad - dil * (k - 1) - 1;
  TORCH_CHECK_VALUE(span >= 0, "conv_bias_act: the ", dim, " of the output would be ",
              (span - stride + 1) / stride + 1,  // floor(span / stride) + 1 for span < 0
              " (input ", in, ", kernel ", k, ", stride ", stride, ", padding ", pad,
              ", dilation ", dil, "); expected >= 1");
  return span / stride + 1;
}

// Checks every argument of conv_bias_act; returns the output shape (N, K, P, Q).
inline std::vector<int64_t> check_conv_args(const at::Tensor& x, const at::Tensor& w,
                                            const std::optional<at::Tensor>& bias,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation, int64_t groups,
                                            const std::optional<at::Tensor>& residual,
                                            const char* op = "conv_bias_act") {
  check_floating(x, op);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": expected x of shape (N, C, H, W), got ", Shape{x.sizes()});
  TORCH_CHECK_VALUE(w.dim() == 4, op, ": expected weight of shape (K, C/groups, R, S), got ", Shape{w.sizes()});
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), op, ": expected weight in x's dtype (",
              DType{x.scalar_type()}, "), got ", DType{w.scalar_type()});
  TORCH_CHECK_VALUE(w.device() == x.device(), op, ": expected weight on x's device (", x.device(),
              "), got ", w.device());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": expected 2 values each for stride, padding and dilation, got ", stride, ", ",
              padding, ", ", dilation);
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0, op,
                ": expected stride >= 1, dilation >= 1 and padding >= 0, got stride ", stride,
                ", padding ", padding, ", dilation ", dilation);
  }
  TORCH_CHECK_VALUE(groups >= 1 && w.size(0) % groups == 0, op, ": expected groups >= 1 dividing the ",
              w.size(0), " output channels, got groups=", groups);
  TORCH_CHECK_VALUE(x.size(1) == w.size(1) * groups, op, ": x has ", x.size(1),
              " channels but weight expects ", w.size(1) * groups, " (", w.size(1),
              " per group x groups=", groups, ")");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w.size(0), op, ": expected bias of shape (",
                w.size(0), ",), got ", Shape{bias->sizes()});
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": expected bias in x's dtype (",
                DType{x.scalar_type()}, "), got ", DType{bias->scalar_type()});
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": expected bias on x's device (", x.device(),
                "), got ", bias->device());
  }
  std::vector<int64_t> out{x.size(0), w.size(0),
                           conv_out_size(x.size(2), w.size(2), stride[0], padding[0], dilation[0], "height"),
                           conv_out_size(x.size(3), w.size(3), stride[1], padding[1], dilation[1], "width")};
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(out), op,
                ": expected residual of the output's shape ", Shape{out}, ", got ",
                Shape{residual->sizes()}, " (no broadcasting)");
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), op,
                ": expected residual in x's dtype (", DType{x.scalar_type()}, "), got ",
                DType{residual->scalar_type()});
    TORCH_CHECK_VALUE(residual->device() == x.device(), op, ": expected residual on x's device (",
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

namespace cpu {
// x (4-D, NCHW-dense, on CPU) copied to channels_last by a blocked transpose (layout.cpp).
at::Tensor to_channels_last(const at::Tensor& x);
}  // namespace cpu

// t itself when already dense in fmt, else a copy that is: an NCHW CPU tensor made
// channels_last by cpu::to_channels_last (torch's copy of an FPN level: 12.5-15 ms, ours 2.4),
// anything else by torch.
inline at::Tensor dense_in(const at::Tensor& t, at::MemoryFormat fmt) {
  if (t.is_contiguous(fmt)) return t;
  if (fmt == at::MemoryFormat::ChannelsLast && t.is_cpu() && t.dim() == 4 && t.is_contiguous()) {
    return cpu::to_channels_last(t);
  }
  return t.contiguous(fmt);
}

// batch_norm_act: a per-channel parameter (weight/bias), in x's dtype or float32.
inline void check_bn_param(const std::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  if (!p.has_value()) return;
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == x.size(1), "batch_norm_act: expected ", name,
              " of shape (", x.size(1), ",) (one value per channel of x), got ", Shape{p->sizes()});
  TORCH_CHECK_TYPE(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat,
              "batch_norm_act: expected ", name, " in x's dtype (", DType{x.scalar_type()},
              ") or float32, got ", DType{p->scalar_type()});
  TORCH_CHECK_VALUE(p->device() == x.device(), "batch_norm_act: expected ", name,
              " on x's device (", x.device(), "), got ", p->device());
}

// batch_norm_act in training: more than one value per channel.
inline void check_bn_batch(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "batch_norm_act: expected x of shape (N, C, ...), got ", Shape{x.sizes()});
  const int64_t count = x.numel() / std::max<int64_t>(x.size(1), 1);
  // nn.BatchNorm2d refuses the same (one value per channel has no variance).
  TORCH_CHECK_VALUE(count > 1 || x.size(1) == 0,
              "Expected more than 1 value per channel when training, got input size torch.Size(",
              x.sizes(), ")");  // torch.Size([1, 4]), as nn.BatchNorm2d says
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
