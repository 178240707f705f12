// Argument checks shared by the CPU and CUDA kernels: the message says what was expected
// and what was got, so a user never has to read a stack of template frames.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

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

// The memory format a kernel writes: the one the caller's x is in. Elementwise kernels
// walk x, the residual and the output as flat arrays, which is valid when all three are
// dense with the same strides.
inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.dim() == 4 ? x.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

inline at::Tensor dense_in(const at::Tensor& t, at::MemoryFormat fmt) {
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

}  // namespace resnet_fast
