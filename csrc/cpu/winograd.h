// Winograd F(m x m, 3 x 3) convolution on CPU, float32 arithmetic on float32 or bfloat16
// tensors, channels_last: the entry points of the kernels compiled once per instruction set
// (winograd_avx2.cpp, winograd_avx512.cpp; the body is winograd_impl.h) and picked at run
// time. winograd.cpp holds the ops that call them (checks, layout, allocation).
//
// m = 2 (4 x 4 input tiles, 16 products) or m = 4 (6 x 6 tiles, 36 products); stride 1,
// dilation 1, one group. The weight is transformed once (winograd_prepack) into
// U[e][k block][c][kKb] (e the tile element, kKb = two vector widths of output channels, C
// padded to a vector width, K to kKb, both with zeros), so its layout depends on the
// instruction set that made it: its last dimension says which (16: AVX2, 32: AVX-512).
#pragma once
#include <ATen/core/Tensor.h>

namespace resnet_fast::cpu {

#define RESNET_FAST_WINOGRAD_KERNELS(NS)                                                     \
  namespace NS {                                                                             \
  /* Output channels per block of the transformed weight (its last dimension). */            \
  int64_t winograd_k_block();                                                                \
  /* w: (K, C, 3, 3) float32 contiguous; out: (E, ceil(K / kKb), Cp, kKb) float32. */        \
  void winograd_weight_kernel(const at::Tensor& w, int64_t m, const at::Tensor& out);        \
  /* x: (N, C, H, W) channels_last float32 or bfloat16 (weight, bias, residual and out in   \
     its dtype; packed float32); out: (N, K, OH, OW) channels_last, written once; weight:    \
     (K, C, 3, 3) contiguous, packed made from it; bias: (K,); residual: undefined or like   \
     out. */                                                                                 \
  void winograd_conv_kernel(const at::Tensor& x, const at::Tensor& weight,                   \
                            const at::Tensor& packed, const at::Tensor& bias,                \
                            const at::Tensor& residual, bool relu, int64_t m, int64_t pad_h, \
                            int64_t pad_w, const at::Tensor& out);                           \
  /* x: (N, C, H, W) channels_last float32; packed: (ceil(K / kKb), C, kKb); out written     \
     once. */                                                                                \
  void conv1x1_kernel(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,  \
                      const at::Tensor& residual, bool relu, int64_t stride_h,               \
                      int64_t stride_w, const at::Tensor& out);                              \
  }
RESNET_FAST_WINOGRAD_KERNELS(AVX2)
RESNET_FAST_WINOGRAD_KERNELS(AVX512)
#undef RESNET_FAST_WINOGRAD_KERNELS

// The 1x1 GEMM in bfloat16 (gemm_bf16_avx512bf16.cpp), for CPUs with AVX512-BF16: x (N, C,
// H, W) channels_last bfloat16; packed: (ceil(K / 32), ceil(C / 2), 64), pairs of input
// channels side by side per output channel; bias (K,) and residual (undefined or like out)
// bfloat16; out written once.
namespace AVX512BF16 {
void conv1x1_bf16_kernel(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
                         const at::Tensor& residual, bool relu, int64_t stride_h,
                         int64_t stride_w, const at::Tensor& out);
}

// Whether the bfloat16 GEMM runs here: the AVX-512 kernels do (winograd_isa() == 512) and the
// CPU has AVX512-BF16.
bool gemm_bf16_supported();

// The instruction set the Winograd kernels run with here: 512 (AVX-512 F/BW/VL/DQ), 256
// (AVX2 + FMA) or 0 (neither: no Winograd). ATEN_CPU_CAPABILITY=avx2 or default lowers it, as
// it lowers PyTorch's own kernels.
int winograd_isa();

}  // namespace resnet_fast::cpu
