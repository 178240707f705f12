// conv_bias_act on CPU: act(conv2d(x, w) + bias (+ residual)), and its prepacked-weight form.
//
// float32, and bfloat16 where oneDNN runs bf16 (onednn_dtype_supported below, asking torch's
// mkldnn::_is_mkldnn_bf16_supported: AVX-512 BW/VL/DQ or AVX-NE-CONVERT; native bf16
// arithmetic with AVX512-BF16/AMX): oneDNN
// through the pointwise convolution ops PyTorch ships, accumulating in float32 and rounding the
// output once, the residual read as a binary-add post-op (mkldnn::_convolution_pointwise.binary)
// or none (mkldnn::_convolution_pointwise). oneDNN's op allocates its output itself; one large
// enough for the buffer cache (buffer_pool.h) comes from the cache, the cache standing in for
// the CPU allocator for that one request (PooledAllocations), so no page is faulted in and
// nothing is written before the convolution writes it. (Before, the output came from the cache by
// filling a cached buffer with the residual or zeros and accumulating into it with a sum
// post-op, mkldnn::_convolution_pointwise_.binary; the fill cost ResNet-50 bf16 at batch 16
// 19.7 ms of 113 on an AMX Xeon, and without it the forward ran 1.11x faster, fp32 1.03x.)
// The ReLU is our own in-place pass, not oneDNN's post-op: that one maps NaN to 0, where
// torch.relu keeps it (as do leaky_relu(0) and hardtanh(0, inf); checked on torch 2.14).
//
// Both ops are pure functions of their inputs: nothing is cached here. A oneDNN-blocked weight
// pays at small batches (a reorder per call is what makes batch 1 lose); it is made once by
// prepack_conv_weight, held by the caller (the models' per-layer plans) and passed to
// conv_bias_act_packed, the way torch's own mkldnn/quantized ops separate prepack from compute.
//
// Other dtypes (float64, float16, bfloat16 where oneDNN has none): ATen's convolution, then
// our vectorized epilogue in place on its output (two passes, not three).
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "../checks.h"
#include "buffer_pool.h"
#include "kernels.h"

namespace resnet_fast::cpu {
namespace {

// The mkldnn ops are reached boxed through the dispatcher (their C++ declarations are not in
// torch's public headers); each handle is looked up once.
const c10::OperatorHandle& reorder_op() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_reorder_convolution_weight", "");
  return op;
}

const c10::OperatorHandle& conv_add_op() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary");
  return op;
}

const c10::OperatorHandle& conv_op() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  return op;
}

bool ask_torch(const char* test) {
  torch::jit::Stack stack;
  c10::Dispatcher::singleton().findSchemaOrThrow(test, "").callBoxed(stack);
  return stack.at(0).toBool();
}

// Whether oneDNN runs convolutions in `t` on this CPU: float32 wherever torch has oneDNN;
// bfloat16 and float16 where torch's own CPUID tests say so (mkldnn::_is_mkldnn_bf16_supported:
// AVX-512 BW/VL/DQ or AVX-NE-CONVERT; _is_mkldnn_fp16_supported: AVX512-FP16, AMX-FP16 or
// AVX-NE-CONVERT), each asked once. The one answer to the question: Python asks it through
// the op resnet_fast::onednn_dtype_supported (ops.conv_bias_act.onednn_dtype_supported, used
// by onednn_dtypes and optimize's warning).
bool onednn_dtype_supported(at::ScalarType t) {
  if (!at::hasMKLDNN()) return false;
  switch (t) {
    case at::kFloat:
      return true;
    case at::kBFloat16: {
      static const bool bf16 = ask_torch("mkldnn::_is_mkldnn_bf16_supported");
      return bf16;
    }
    case at::kHalf: {
      static const bool fp16 = ask_torch("mkldnn::_is_mkldnn_fp16_supported");
      return fp16;
    }
    default:
      return false;
  }
}

// The dtypes the oneDNN path (and prepack_conv_weight) takes on this CPU: float32, and
// bfloat16 where oneDNN runs it. float16 stays on ATen's convolution (which itself uses
// oneDNN where onednn_dtype_supported(kHalf)).
bool onednn_dtype(at::ScalarType t) {
  return (t == at::kFloat || t == at::kBFloat16) && onednn_dtype_supported(t);
}

// act(out + bias (+ residual)) written over `out` (dense in fmt): our scale_shift_act kernel
// with scale 1 (x * 1 + b is exactly x + b), reading and writing the same buffer.
void bias_act_inplace(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& residual,
                      bool relu, at::MemoryFormat fmt) {
  const at::Tensor shift = bias.defined() ? bias : at::zeros({out.size(1)}, out.options());
  scale_shift_act(out, at::ones({out.size(1)}, out.options()), shift, residual, relu,
                  fmt == at::MemoryFormat::ChannelsLast, out);
}

bool use_onednn(const at::Tensor& x) { return onednn_dtype(x.scalar_type()); }

// The oneDNN path (float32, or bfloat16 where oneDNN runs it); `w` is a dense weight or a
// prepacked (mkldnn-layout) one.
at::Tensor onednn_conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups, const at::Tensor& r, bool relu,
                       at::IntArrayRef out_shape, at::MemoryFormat fmt) {
  c10::impl::GenericList no_scalars(c10::OptionalType::create(c10::NumberType::get()));
  const c10::IValue b = bias.defined() ? c10::IValue(bias) : c10::IValue();
  // oneDNN's op allocates its output through the CPU allocator, before it computes: from our
  // buffer cache where the output is large enough for it (PooledAllocations).
  std::optional<PooledAllocations> from_cache;
  const size_t out_bytes = c10::multiply_integers(out_shape) * x.element_size();
  if (pooled(out_bytes)) from_cache.emplace(out_bytes);
  at::Tensor out;
  if (r.defined()) {
    torch::jit::Stack stack{x, r, w, b, padding.vec(), stride.vec(), dilation.vec(), groups,
                            std::string("add"), c10::IValue(), c10::IValue(), no_scalars,
                            c10::IValue()};
    conv_add_op().callBoxed(stack);
    out = dense_in(stack.at(0).toTensor(), fmt);
  } else {
    torch::jit::Stack stack{x, w, b, padding.vec(), stride.vec(), dilation.vec(), groups,
                            std::string("none"), no_scalars, c10::IValue()};
    conv_op().callBoxed(stack);
    out = dense_in(stack.at(0).toTensor(), fmt);
  }
  from_cache.reset();
  if (relu) relu_inplace(out);
  return out;
}

at::Tensor prepack(const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups, at::IntArrayRef input_size) {
  torch::jit::Stack stack{w.contiguous(), padding.vec(), stride.vec(), dilation.vec(), groups,
                          input_size.vec()};
  reorder_op().callBoxed(stack);
  return stack.at(0).toTensor();
}

struct Prepared {
  at::Tensor x, bias, residual;
  std::vector<int64_t> out_shape;
  at::MemoryFormat fmt;
};

// Checks (csrc/checks.h; the only validation on this path) and makes x, bias and the residual
// dense: oneDNN reads the bias as a plain array whatever its strides.
Prepared prepare(const at::Tensor& x_in, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                 int64_t groups, const std::optional<at::Tensor>& residual, const char* op) {
  auto out_shape = check_conv_args(x_in, w, bias, stride, padding, dilation, groups, residual);
  TORCH_CHECK(x_in.device().is_cpu(), op, " (cpu): expected CPU tensors, got ", x_in.device());
  const auto fmt = layout_of(x_in);
  return {dense_in(x_in, fmt), bias.has_value() ? bias->contiguous() : at::Tensor(),
          residual.has_value() ? dense_in(*residual, fmt) : at::Tensor(), std::move(out_shape),
          fmt};
}

at::Tensor conv_bias_act_cpu(const at::Tensor& x_in, const at::Tensor& w,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             const std::optional<at::Tensor>& residual, bool relu) {
  const Prepared p = prepare(x_in, w, bias, stride, padding, dilation, groups, residual,
                             "conv_bias_act");
  if (p.x.numel() == 0 || w.numel() == 0) {
    at::Tensor out = at::empty(p.out_shape, p.x.options().memory_format(p.fmt));
    if (out.numel() == 0) return out;
    // No input channels: the convolution sums nothing; the epilogue still applies.
    bias_act_inplace(out.zero_(), p.bias, p.residual, relu, p.fmt);
    return out;
  }
  if (use_onednn(p.x) && w.layout() == at::kStrided) {
    // Reordered for this input size, as conv_bias_act_packed's weight is: one algorithm,
    // so both give the same result (a plain weight lets oneDNN pick another one).
    return onednn_conv(p.x, prepack(w, stride, padding, dilation, groups, p.x.sizes()), p.bias,
                       stride, padding, dilation, groups, p.residual, relu, p.out_shape, p.fmt);
  }
  const at::Tensor out = dense_in(
      at::convolution(p.x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, groups),
      p.fmt);
  if (p.bias.defined() || p.residual.defined() || relu) {
    bias_act_inplace(out, p.bias, p.residual, relu, p.fmt);
  }
  return out;
}

// The weight in oneDNN's blocked layout for this geometry and input size: an mkldnn-layout
// tensor of the weight's logical shape, valid only as conv_bias_act_packed's weight.
at::Tensor prepack_conv_weight_cpu(const at::Tensor& w, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, at::IntArrayRef input_size) {
  TORCH_CHECK(at::hasMKLDNN(), "prepack_conv_weight: this PyTorch build has no oneDNN (mkldnn)");
  TORCH_CHECK_VALUE(w.device().is_cpu() && onednn_dtype(w.scalar_type()) && w.dim() == 4 &&
                        w.layout() == at::kStrided,
                    "prepack_conv_weight: expected a 4-D strided CPU weight (K, C/groups, R, S) "
                    "in float32", onednn_dtype_supported(at::kBFloat16) ? " or bfloat16" : " (oneDNN runs no bfloat16 on "
                    "this CPU: it needs AVX-512 or AVX-NE-CONVERT, and "
                    "torch.ops.mkldnn._is_mkldnn_bf16_supported() is False here)",
                    ", got ", DType{w.scalar_type()}, " ", Shape{w.sizes()}, " of layout ",
                    w.layout(), " on ", w.device());
  TORCH_CHECK_VALUE(input_size.size() == 4 && input_size[1] == w.size(1) * groups,
                    "prepack_conv_weight: expected input_size (N, C, H, W) with C = ",
                    w.size(1) * groups, ", got ", Shape{input_size});
  return prepack(w, stride, padding, dilation, groups, input_size);
}

at::Tensor conv_bias_act_packed_cpu(const at::Tensor& x_in, const at::Tensor& packed,
                                    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, const std::optional<at::Tensor>& residual,
                                    bool relu) {
  TORCH_CHECK_VALUE(packed.is_mkldnn() && onednn_dtype(packed.scalar_type()),
                    "conv_bias_act_packed: expected a weight from prepack_conv_weight (float32, or "
                    "bfloat16 where oneDNN runs it; mkldnn layout), got a ",
                    DType{packed.scalar_type()}, " tensor of layout ", packed.layout());
  const Prepared p = prepare(x_in, packed, bias, stride, padding, dilation, groups, residual,
                             "conv_bias_act_packed");
  if (p.x.numel() == 0) return at::empty(p.out_shape, p.x.options().memory_format(p.fmt));
  return onednn_conv(p.x, packed, p.bias, stride, padding, dilation, groups, p.residual, relu,
                     p.out_shape, p.fmt);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("conv_bias_act", &conv_bias_act_cpu);
  m.impl("prepack_conv_weight", &prepack_conv_weight_cpu);
  m.impl("conv_bias_act_packed", &conv_bias_act_packed_cpu);
}

// No tensor argument: the dispatcher reaches it by the CompositeExplicitAutograd kernel.
TORCH_LIBRARY_IMPL(resnet_fast, CompositeExplicitAutograd, m) {
  m.impl("onednn_dtype_supported", &onednn_dtype_supported);
}

// The packed weight has the mkldnn layout: its dispatch key is MkldnnCPU, x's is CPU.
TORCH_LIBRARY_IMPL(resnet_fast, MkldnnCPU, m) {
  m.impl("conv_bias_act_packed", &conv_bias_act_packed_cpu);
}

}  // namespace resnet_fast::cpu
