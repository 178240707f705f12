// The CPU kernels for AVX2 CPUs: at::vec's 256-bit implementation. setup.py compiles this file
// on its own with -mavx2 -mfma -mf16c ... -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 (as
// PyTorch compiles its capability kernels); the code runs only after use_avx2() said the CPU
// supports it.
#if defined(__AVX2__) && defined(CPU_CAPABILITY_AVX2)
#include "kernels_impl.h"
#else
// Built without the AVX2 flags (not x86-64): alias the AVX2 entry points to the portable
// kernels (never chosen anyway: use_avx2() is false there).
#include "kernels.h"
namespace resnet_fast::cpu::AVX2 {
void add_relu_kernel(const at::Tensor& x, const at::Tensor& r, const at::Tensor& out) {
  DEFAULT::add_relu_kernel(x, r, out);
}
void scale_shift_act_kernel(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& residual, bool relu, bool channels_last,
                            const at::Tensor& out, const at::Tensor& center) {
  DEFAULT::scale_shift_act_kernel(x, scale, shift, residual, relu, channels_last, out, center);
}
}  // namespace resnet_fast::cpu::AVX2
#endif
