// Entry points of the CPU kernels, compiled once per instruction set (kernels_default.cpp,
// kernels_avx2.cpp) and picked at run time by use_avx2() (defined in ops_cpu.cpp): in the
// inline wrappers below, and in batch_norm_cpu.cpp for its float32 loops. Arguments are
// validated and dense in the same memory format, and `out` is allocated by the caller
// (ops_cpu.cpp, conv_bias_act.cpp, batch_norm_cpu.cpp); scale_shift_act's `out` may be `x`
// itself (conv_bias_act.cpp runs its epilogue in place).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>

namespace resnet_fast::cpu {

#define RESNET_FAST_CPU_KERNELS(NS)                                                          \
  namespace NS {                                                                             \
  void add_relu_kernel(const at::Tensor& x, const at::Tensor& r, const at::Tensor& out);   \
  /* relu over a dense bfloat16 or float16 tensor, in place, on the bits (NaN kept). */      \
  void relu_half_kernel(const at::Tensor& t);                                                \
  /* x, out channels_last (N, C, H, W) / (N, C, OH, OW); window kh x kw, stride, padding. */  \
  void max_pool_act_kernel(const at::Tensor& x, const at::Tensor& out, int64_t kh,          \
                           int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,      \
                           bool relu);                                                       \
  /* residual, center: undefined tensors when absent; v = (x - center) * scale + shift. */   \
  void scale_shift_act_kernel(const at::Tensor& x, const at::Tensor& scale,                \
                              const at::Tensor& shift, const at::Tensor& residual, bool relu, \
                              bool channels_last, const at::Tensor& out,                     \
                              const at::Tensor& center);                                     \
  /* Training BN's float32 inner loops (kernels_impl.h says what they compute). */           \
  void bn_sums_rows_f32(const float* x, const float* g, const float* o, int64_t rows,        \
                        int64_t C, const float* k, float* a1, float* a2, bool bwd, bool relu); \
  void bn_sums_plane_f32(const float* x, const float* g, const float* o, int64_t n, float k, \
                         float* a1, float* a2, bool bwd, bool relu);                          \
  void bn_bwd_elemt_f32(const float* x, const float* g, const float* o, float* dx, float* dr, \
                        int64_t n, const float* m, const float* a, const float* b,           \
                        const float* kk, float m0, float a0, float b0, float k0, bool relu); \
  }
RESNET_FAST_CPU_KERNELS(DEFAULT)
RESNET_FAST_CPU_KERNELS(AVX2)
#undef RESNET_FAST_CPU_KERNELS

// Whether the AVX2 build of the kernels runs here: the CPU has AVX2/FMA/F16C/BMI2 and
// ATEN_CPU_CAPABILITY (PyTorch's own override) does not ask for "default".
bool use_avx2();

// The entry points above, for this CPU's instruction set.
inline void add_relu(const at::Tensor& x, const at::Tensor& r, const at::Tensor& out) {
  use_avx2() ? AVX2::add_relu_kernel(x, r, out) : DEFAULT::add_relu_kernel(x, r, out);
}

// torch.relu in place (NaN stays NaN): bfloat16 and float16 on their bits (torch's own relu_
// converts each value to float32 and back: 0.31 ms for 16x64x56x56 bf16 against 0.11 ms for
// the same tensor in float32, twice the bytes, on a Zen 4), other dtypes by torch's relu_.
inline void relu_inplace(const at::Tensor& t) {
  if (t.scalar_type() != at::kBFloat16 && t.scalar_type() != at::kHalf) {
    t.relu_();
    return;
  }
  // A frame of its own for the profiler (benchmarks/profile_cpu.py books it as a ReLU pass);
  // free when no profiler listens.
  RECORD_FUNCTION("resnet_fast::relu_bits", c10::ArrayRef<const c10::IValue>{});
  use_avx2() ? AVX2::relu_half_kernel(t) : DEFAULT::relu_half_kernel(t);
}

inline void max_pool_act(const at::Tensor& x, const at::Tensor& out, int64_t kh, int64_t kw,
                         int64_t sh, int64_t sw, int64_t ph, int64_t pw, bool relu) {
  use_avx2() ? AVX2::max_pool_act_kernel(x, out, kh, kw, sh, sw, ph, pw, relu)
             : DEFAULT::max_pool_act_kernel(x, out, kh, kw, sh, sw, ph, pw, relu);
}

inline void scale_shift_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& residual, bool relu, bool channels_last,
                            const at::Tensor& out, const at::Tensor& center = at::Tensor()) {
  use_avx2()
      ? AVX2::scale_shift_act_kernel(x, scale, shift, residual, relu, channels_last, out, center)
      : DEFAULT::scale_shift_act_kernel(x, scale, shift, residual, relu, channels_last, out,
                                        center);
}

}  // namespace resnet_fast::cpu
