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
void relu_half_kernel(const at::Tensor& t) { DEFAULT::relu_half_kernel(t); }
void max_pool_act_kernel(const at::Tensor& x, const at::Tensor& out, int64_t kh, int64_t kw,
                         int64_t sh, int64_t sw, int64_t ph, int64_t pw, bool relu) {
  DEFAULT::max_pool_act_kernel(x, out, kh, kw, sh, sw, ph, pw, relu);
}
void scale_shift_act_kernel(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& residual, bool relu, bool channels_last,
                            const at::Tensor& out, const at::Tensor& center) {
  DEFAULT::scale_shift_act_kernel(x, scale, shift, residual, relu, channels_last, out, center);
}
void bn_sums_rows_f32(const float* x, const float* g, const float* o, int64_t rows, int64_t C,
                      const float* k, float* a1, float* a2, bool bwd, bool relu) {
  DEFAULT::bn_sums_rows_f32(x, g, o, rows, C, k, a1, a2, bwd, relu);
}
void bn_sums_plane_f32(const float* x, const float* g, const float* o, int64_t n, float k,
                       float* a1, float* a2, bool bwd, bool relu) {
  DEFAULT::bn_sums_plane_f32(x, g, o, n, k, a1, a2, bwd, relu);
}
void bn_bwd_elemt_f32(const float* x, const float* g, const float* o, float* dx, float* dr,
                      int64_t n, const float* m, const float* a, const float* b, const float* kk,
                      float m0, float a0, float b0, float k0, bool relu) {
  DEFAULT::bn_bwd_elemt_f32(x, g, o, dx, dr, n, m, a, b, kk, m0, a0, b0, k0, relu);
}
}  // namespace resnet_fast::cpu::AVX2
#endif
