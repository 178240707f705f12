// The CPU kernels for AVX2 CPUs: at::vec's 256-bit implementation. The target pragma (instead
// of per-file -mavx2 flags, which setuptools cannot give one file) must precede every
// include; the code here runs only after use_avx2() said the CPU supports it.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// The pragma enables the instructions but not the macros that headers (sleef.h, at::vec)
// test to declare their AVX2 code; define them for this file only.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
#else
// Not x86-64: alias the AVX2 entry points to the portable kernels (never chosen anyway).
#include "kernels.h"
namespace resnet_fast::cpu::AVX2 {
void add_relu_kernel(const at::Tensor& x, const at::Tensor& r, const at::Tensor& out) {
  DEFAULT::add_relu_kernel(x, r, out);
}
void scale_shift_act_kernel(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& residual, bool relu, bool channels_last,
                            const at::Tensor& out) {
  DEFAULT::scale_shift_act_kernel(x, scale, shift, residual, relu, channels_last, out);
}
}  // namespace resnet_fast::cpu::AVX2
#endif
