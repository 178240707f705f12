// The Winograd ops on CPU (winograd.h says what the kernels compute): winograd_prepack, the
// weight transformed once, and conv_bias_act_winograd, act(conv3x3(x, w) + bias (+ residual))
// for stride 1, dilation 1, one group, on float32 or bfloat16 tensors (float32 arithmetic and
// transformed weights either way). Checks, layout and allocation are here; the arithmetic is
// in winograd_impl.h, compiled per instruction set.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>

#include "../checks.h"
#include "buffer_pool.h"
#include "kernels.h"
#include "winograd.h"

namespace resnet_fast::cpu {

int winograd_isa() {
  static const int isa = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    if (!use_avx2()) return 0;  // no AVX2, or ATEN_CPU_CAPABILITY=default
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    if (env != nullptr && (std::strcmp(env, "avx2") == 0 || std::strcmp(env, "AVX2") == 0))
      return 256;
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 ? 512 : 256;
#else
    return 0;
#endif
  }();
  return isa;
}

bool gemm_bf16_supported() {
  static const bool ok = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    return winograd_isa() == 512 && __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
  }();
  return ok;
}

#if !(defined(__x86_64__) && defined(__GNUC__))
// Not x86-64: the kernel files compiled empty. winograd_isa() is 0 and gemm_bf16_supported()
// false, so these never run.
void AVX512BF16::conv1x1_bf16_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, bool, int64_t, int64_t,
                                     const at::Tensor&) {}
#define RESNET_FAST_NO_WINOGRAD(NS)                                                          \
  int64_t NS::winograd_k_block() { return 0; }                                               \
  void NS::winograd_weight_kernel(const at::Tensor&, int64_t, const at::Tensor&) {}          \
  void NS::winograd_conv_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&,     \
                                const at::Tensor&, const at::Tensor&, bool, int64_t, int64_t, \
                                int64_t, const at::Tensor&) {}                                \
  void NS::conv1x1_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&,           \
                          const at::Tensor&, bool, int64_t, int64_t, const at::Tensor&) {}
RESNET_FAST_NO_WINOGRAD(AVX2)
RESNET_FAST_NO_WINOGRAD(AVX512)
#undef RESNET_FAST_NO_WINOGRAD
#endif

namespace {

int64_t k_block() {
  return winograd_isa() == 512 ? AVX512::winograd_k_block() : AVX2::winograd_k_block();
}

void require_isa(const char* op) {
  TORCH_CHECK(winograd_isa() != 0, op,
              ": the Winograd kernels need a CPU with AVX2 and FMA (or AVX-512); this one has "
              "neither, or ATEN_CPU_CAPABILITY=default asks for none");
}

at::Tensor winograd_prepack_cpu(const at::Tensor& w, int64_t tile) {
  const char* op = "winograd_prepack";
  require_isa(op);
  TORCH_CHECK_VALUE(tile == 2 || tile == 4, op, ": expected tile 2 (F(2x2,3x3)) or 4 "
                    "(F(4x4,3x3)), got ", tile);
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && w.layout() == at::kStrided
                        && w.device().is_cpu(), op, ": expected a strided CPU weight of shape "
                    "(K, C, 3, 3), got ", Shape{w.sizes()}, " of layout ", w.layout(), " on ",
                    w.device());
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, op,
                   ": expected a float32 or bfloat16 weight, got ", DType{w.scalar_type()});
  const int64_t kb = k_block(), vl = kb / 2, K = w.size(0), C = w.size(1);
  // float32 either way: a bfloat16 weight widens exactly, and its transform is not rounded
  // back to bfloat16.
  // Every value, the zero padding included, is written by the kernel.
  at::Tensor out = at::empty({(tile + 2) * (tile + 2), (K + kb - 1) / kb, (C + vl - 1) / vl * vl,
                              kb}, w.options().dtype(at::kFloat));
  if (w.numel() == 0) return out.zero_();
  (winograd_isa() == 512 ? AVX512::winograd_weight_kernel : AVX2::winograd_weight_kernel)(
      w.to(at::kFloat).contiguous(), tile, out);
  return out;
}

// The output of an op of this file: a fresh channels_last tensor, or `into` (the in-place
// variants' residual: act(conv(x) + bias + into) is written over it) after checking it is one
// dense channels_last tensor (its shape and dtype are checked with the other arguments) that
// x, the dense input the kernel reads, does not overlap.
at::Tensor output_for(const at::Tensor& x, const std::vector<int64_t>& out_shape,
                      const at::Tensor& into, const char* op) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  if (!into.defined()) return empty_output(out_shape, x.options(), cl);
  TORCH_CHECK_VALUE(into.is_contiguous(cl), op, ": expected the residual (written in place) "
                    "dense in channels_last, got sizes ", Shape{into.sizes()}, " and strides ",
                    Shape{into.strides()});
  TORCH_CHECK_VALUE(at::get_overlap_status(into, x) == at::MemOverlapStatus::No, op,
                    ": expected the residual (written in place) apart from x, got two tensors "
                    "sharing memory");
  return into;
}

at::Tensor conv_bias_act_winograd_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                      const at::Tensor& packed, const at::Tensor& bias,
                                      at::IntArrayRef padding,
                                      const std::optional<at::Tensor>& residual, bool relu,
                                      const at::Tensor& into, const char* op) {
  require_isa(op);
  const auto out_shape = check_conv_args(x_in, weight, bias, {1, 1}, padding, {1, 1}, 1, residual,
                                         op);
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, op,
                   ": expected float32 or bfloat16 x, got ", DType{x_in.scalar_type()});
  TORCH_CHECK_VALUE(x_in.device().is_cpu() && weight.layout() == at::kStrided &&
                        weight.size(2) == 3 && weight.size(3) == 3,
                    op, ": expected CPU tensors and a strided 3x3 weight, got x on ",
                    x_in.device(), " and a weight ", Shape{weight.sizes()}, " of layout ",
                    weight.layout());
  const int64_t kb = k_block(), vl = kb / 2, C = weight.size(1), K = weight.size(0);
  const int64_t cp = (C + vl - 1) / vl * vl, kblocks = (K + kb - 1) / kb;
  TORCH_CHECK_VALUE(packed.dim() == 4 && (packed.size(0) == 16 || packed.size(0) == 36) &&
                        packed.size(1) == kblocks && packed.size(2) == cp && packed.size(3) == kb &&
                        packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                        packed.device().is_cpu(),
                    op, ": expected winograd_prepack(weight) on this CPU (float32 of shape (16 or "
                    "36, ", kblocks, ", ", cp, ", ", kb, ")), got ", DType{packed.scalar_type()},
                    " ", Shape{packed.sizes()});
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = dense_in(x_in, cl);
  at::Tensor out = output_for(x, out_shape, into, op);
  if (out.numel() > 0) {
    (winograd_isa() == 512 ? AVX512::winograd_conv_kernel : AVX2::winograd_conv_kernel)(
        x, weight.contiguous(), packed, bias.contiguous(),
        residual.has_value() ? dense_in(*residual, cl) : at::Tensor(), relu,
        packed.size(0) == 16 ? 2 : 4, padding[0], padding[1], out);
  }
  return out;
}

at::Tensor conv_bias_act_winograd_op(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& packed, const at::Tensor& bias,
                                     at::IntArrayRef padding,
                                     const std::optional<at::Tensor>& residual, bool relu) {
  const at::Tensor out = conv_bias_act_winograd_cpu(x, weight, packed, bias, padding, residual,
                                                    relu, at::Tensor(), "conv_bias_act_winograd");
  return dense_in(out, layout_of(x));
}

void conv_bias_act_winograd_inplace(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& packed, const at::Tensor& bias,
                                    at::IntArrayRef padding, const at::Tensor& residual,
                                    bool relu) {
  conv_bias_act_winograd_cpu(x, weight, packed, bias, padding, residual, relu, residual,
                             "conv_bias_act_winograd_");
}

// The dtypes of the 1x1 GEMM here: float32, and bfloat16 where the CPU has AVX512-BF16.
void require_gemm_dtype(at::ScalarType t, const char* what, const char* op) {
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16, op, ": expected a float32 or "
                   "bfloat16 ", what, ", got ", DType{t});
  TORCH_CHECK(t == at::kFloat || gemm_bf16_supported(), op, ": bfloat16 needs a CPU with "
              "AVX-512 and AVX512-BF16; this one has ", winograd_isa() == 512 ? "no AVX512-BF16"
              : "no AVX-512", " (or ATEN_CPU_CAPABILITY asks for less)");
}

// The packed weight's shape for a (K, C, 1, 1) weight of dtype t: float32 (ceil(K / kb), C,
// kb); bfloat16 (ceil(K / 32), ceil(C / 2), 64), pairs of input channels side by side.
std::vector<int64_t> packed_shape(int64_t K, int64_t C, at::ScalarType t) {
  if (t == at::kBFloat16) return {(K + 31) / 32, (C + 1) / 2, 64};
  const int64_t kb = k_block();
  return {(K + kb - 1) / kb, C, kb};
}

at::Tensor conv1x1_prepack_cpu(const at::Tensor& w) {
  const char* op = "conv1x1_prepack";
  require_isa(op);
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1 && w.layout() == at::kStrided
                        && w.device().is_cpu(), op, ": expected a strided CPU weight of shape "
                    "(K, C, 1, 1), got ", Shape{w.sizes()}, " of layout ", w.layout(), " on ",
                    w.device());
  require_gemm_dtype(w.scalar_type(), "weight", op);
  const int64_t K = w.size(0), C = w.size(1);
  const auto shape = packed_shape(K, C, w.scalar_type());
  if (w.scalar_type() == at::kBFloat16) {  // w[k][2q + t] at [k / 32][q][k % 32][t]
    return at::constant_pad_nd(w.reshape({K, C}), {0, 2 * shape[1] - C, 0, shape[0] * 32 - K})
        .view({shape[0], 32, shape[1], 2})
        .permute({0, 2, 1, 3})
        .reshape(shape);
  }
  return at::constant_pad_nd(w.reshape({K, C}), {0, 0, 0, shape[0] * shape[2] - K})
      .view({shape[0], shape[2], C})
      .permute({0, 2, 1})
      .contiguous();
}

at::Tensor conv_bias_act_1x1_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                 const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                                 at::IntArrayRef stride,
                                 const std::optional<at::Tensor>& residual, bool relu,
                                 const at::Tensor& into, const char* op) {
  require_isa(op);
  const auto out_shape = check_conv_args(x_in, weight, bias, stride, {0, 0}, {1, 1}, 1, residual,
                                         op);
  const at::ScalarType t = x_in.scalar_type();
  require_gemm_dtype(t, "x", op);
  TORCH_CHECK_VALUE(x_in.device().is_cpu() && weight.layout() == at::kStrided &&
                        weight.size(2) == 1 && weight.size(3) == 1,
                    op, ": expected CPU tensors and a strided 1x1 weight, got x on ",
                    x_in.device(), " and a weight ", Shape{weight.sizes()}, " of layout ",
                    weight.layout());
  const int64_t C = weight.size(1);
  const auto shape = packed_shape(weight.size(0), C, t);
  TORCH_CHECK_VALUE(packed.sizes() == at::IntArrayRef(shape) && packed.scalar_type() == t &&
                        packed.is_contiguous() && packed.device().is_cpu(),
                    op, ": expected conv1x1_prepack(weight) on this CPU (", DType{t},
                    " of shape ", Shape{shape}, "), got ", DType{packed.scalar_type()}, " ",
                    Shape{packed.sizes()});
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = dense_in(x_in, cl);
  at::Tensor out = output_for(x, out_shape, into, op);
  if (out.numel() == 0) return out;
  // No bias (a downsample conv): zeros, K values, to keep one epilogue.
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::zeros({weight.size(0)},
                                                                         x.options());
  if (C == 0) {  // no input channels: the epilogue on a sum of nothing
    at::Tensor v = b.view({1, -1, 1, 1}).expand(out_shape);
    if (residual.has_value()) v = v + *residual;
    out.copy_(relu ? at::relu(v) : v);
    return out;
  }
  (t == at::kBFloat16 ? AVX512BF16::conv1x1_bf16_kernel
                      : winograd_isa() == 512 ? AVX512::conv1x1_kernel : AVX2::conv1x1_kernel)(
      x, packed, b,
      residual.has_value() ? dense_in(*residual, cl) : at::Tensor(), relu, stride[0], stride[1],
      out);
  return out;
}

at::Tensor conv_bias_act_1x1_op(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, const std::optional<at::Tensor>& residual,
                                bool relu) {
  const at::Tensor out = conv_bias_act_1x1_cpu(x, weight, packed, bias, stride, residual, relu,
                                               at::Tensor(), "conv_bias_act_1x1");
  return dense_in(out, layout_of(x));
}

void conv_bias_act_1x1_inplace(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, const at::Tensor& residual, bool relu) {
  conv_bias_act_1x1_cpu(x, weight, packed, bias, stride, residual, relu, residual,
                        "conv_bias_act_1x1_");
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("winograd_prepack", &winograd_prepack_cpu);
  m.impl("conv_bias_act_winograd", &conv_bias_act_winograd_op);
  m.impl("conv_bias_act_winograd_", &conv_bias_act_winograd_inplace);
  m.impl("conv1x1_prepack", &conv1x1_prepack_cpu);
  m.impl("conv_bias_act_1x1", &conv_bias_act_1x1_op);
  m.impl("conv_bias_act_1x1_", &conv_bias_act_1x1_inplace);
}

}  // namespace resnet_fast::cpu
