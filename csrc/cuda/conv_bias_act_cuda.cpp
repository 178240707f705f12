// conv_bias_act on CUDA: cuDNN's fused convolution + bias (+ add) + ReLU through ATen's entry
// points (at::cudnn_convolution_relu / at::cudnn_convolution_add_relu, which build and cache
// their cuDNN execution plans thread-safely per shape), with a fallback of ATen's convolution
// followed by our fused epilogue kernel (resnet_fast::scale_shift_act) where cuDNN has no fused
// engine for the configuration, cuDNN is disabled, x is float64 or empty, or no ReLU is asked
// for (without a residual either: ATen's convolution with the bias alone).
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/cudnn_convolution_add_relu.h>
#include <ATen/ops/cudnn_convolution_relu.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../checks.h"

namespace resnet_fast::cuda {
namespace {

at::Tensor epilogue(const at::Tensor& conv_out, const std::optional<at::Tensor>& bias,
                    const at::Tensor& residual, bool relu) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resnet_fast::scale_shift_act", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, bool)>();
  const auto c = conv_out.size(1);
  const at::Tensor ones = at::ones({c}, conv_out.options());
  const at::Tensor shift = bias.has_value() ? *bias : at::zeros({c}, conv_out.options());
  const std::optional<at::Tensor> res =
      residual.defined() ? std::optional<at::Tensor>(residual) : std::nullopt;
  // Straight to our CUDA kernel: we are already below autograd and autocast.
  return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CUDA), conv_out, ones, shift, res,
                       relu);
}

at::Tensor conv_bias_act_cuda(const at::Tensor& x_in, const at::Tensor& w,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              const std::optional<at::Tensor>& residual, bool relu) {
  check_conv_args(x_in, w, bias, stride, padding, dilation, groups, residual);
  TORCH_CHECK(x_in.is_cuda(), "conv_bias_act (cuda): expected CUDA tensors, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = dense_in(x_in, fmt);
  const at::Tensor r = residual.has_value() ? dense_in(*residual, fmt) : at::Tensor();

  const bool cudnn_fusable = relu && at::globalContext().userEnabledCuDNN() &&
                             x.scalar_type() != at::kDouble && x.numel() > 0;
  if (cudnn_fusable) {
    try {
      at::Tensor out = r.defined()
          ? at::cudnn_convolution_add_relu(x, w, r, at::Scalar(1.0), bias, stride, padding,
                                           dilation, groups)
          : at::cudnn_convolution_relu(x, w, bias, stride, padding, dilation, groups);
      return dense_in(out, fmt);
    } catch (const c10::Error& e) {
      TORCH_WARN_ONCE("conv_bias_act (cuda): cuDNN has no fused conv+bias(+add)+ReLU engine for a "
                      "layer (", e.what_without_backtrace(), "); using convolution + the "
                      "resnet_fast epilogue kernel for such layers");
    }
  }
  if (!r.defined() && !relu) {
    return dense_in(at::convolution(x, w, bias, stride, padding, dilation, false, {0, 0}, groups), fmt);
  }
  const at::Tensor conv = dense_in(
      at::convolution(x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, groups), fmt);
  return epilogue(conv, bias, r, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) { m.impl("conv_bias_act", &conv_bias_act_cuda); }

}  // namespace resnet_fast::cuda
