// Training BatchNorm fused with (+ residual) and ReLU on CUDA: bn_act_fwd and bn_act_bwd.
//
// The per-channel reductions are ATen's CUDA Welford kernels, the ones SyncBatchNorm uses
// (at::batch_norm_stats, at::batch_norm_backward_reduce). The forward applies with ATen's
// at::batch_norm_elemt, then joins the residual with our add_relu kernel (one pass instead of
// eager's add and ReLU; without a residual, ReLU in place). The backward computes the
// ReLU-masked grad once, returns it as d residual, and feeds it to ATen's reduction and
// element passes (at::batch_norm_backward_elemt).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"

namespace resnet_fast::cuda {
namespace {

// act(bn_elemt(x) (+ residual)): ATen's element pass ((x - mean) * invstd * w + b, x - mean
// first) and our add_relu kernel for the join, or ReLU in place.
at::Tensor apply(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                 const at::Tensor& invstd, double eps, const std::optional<at::Tensor>& residual,
                 bool relu) {
  at::Tensor out = at::batch_norm_elemt(x, weight, bias, mean, invstd, eps);
  if (residual.has_value() && relu) {
    static const auto add_relu = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("resnet_fast::add_relu", "")
                                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    return add_relu.redispatch(c10::DispatchKeySet(c10::DispatchKey::CUDA), out,
                               dense_in(*residual, layout_of(x)));
  }
  if (residual.has_value()) out.add_(*residual);
  if (relu) out.relu_();
  return out;
}

at::ScalarType stat_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, bool relu,
    double eps) {
  TORCH_CHECK(x_in.is_cuda(), "batch_norm_act (cuda): expected CUDA tensors, got ", x_in.device());
  check_bn_fwd_args(x_in, weight, bias, residual);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = dense_in(x_in, fmt);
  const auto st = stat_type(x);
  const int64_t c = x.size(1);
  if (x.numel() == 0) {
    return {at::empty_like(x, x.options().memory_format(fmt)),
            at::zeros({c}, x.options().dtype(st)), at::zeros({c}, x.options().dtype(st))};
  }
  // (mean, invstd) in float32 for reduced-precision x; the biased variance from invstd.
  auto [mean, invstd] = at::batch_norm_stats(x, eps);
  mean = mean.to(st);
  invstd = invstd.to(st);
  const at::Tensor var = (invstd.pow(-2) - eps).clamp_min(0);
  const at::Tensor out = apply(x, weight, bias, mean, invstd, eps, residual, relu);
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& out_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var,
    double eps, bool relu, bool residual_grad) {
  check_bn_bwd_args(grad_in, x_in, out_in, weight);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = layout_of(x_in);
  const at::Tensor x = dense_in(x_in, fmt);
  const at::Tensor grad = dense_in(grad_in, fmt);
  const int64_t c = x.size(1);
  const auto st = stat_type(x);
  // g' = grad where out > 0: a NaN output passes no gradient, as torch.relu's backward.
  const at::Tensor gm = relu ? at::where(dense_in(out_in, fmt) > 0, grad, at::zeros({}, grad.options()))
                             : grad.clone(at::MemoryFormat::Preserve);
  at::Tensor dres = residual_grad ? gm : at::empty({0}, x.options());
  if (x.numel() == 0) {
    return {at::empty_like(x, x.options().memory_format(fmt)),
            at::zeros({c}, x.options().dtype(st)), at::zeros({c}, x.options().dtype(st)), dres};
  }
  const at::Tensor mean_f = mean.to(st);
  const at::Tensor invstd = (var.to(st) + eps).rsqrt();
  const std::optional<at::Tensor> w =
      weight.has_value() ? std::optional<at::Tensor>(weight->to(st)) : std::nullopt;
  auto [sum_dy, sum_dy_xmu, dweight, dbias] =
      at::batch_norm_backward_reduce(gm, x, mean_f, invstd, w, true, true, true);
  const int64_t count = x.numel() / std::max<int64_t>(c, 1);
  const at::Tensor counts = at::full({1}, count, x.options().dtype(at::kInt));
  at::Tensor dx = at::batch_norm_backward_elemt(gm, x, mean_f, invstd, w, sum_dy, sum_dy_xmu, counts);
  // dweight/dbias as the CPU backend returns them, also without a weight.
  return {dx.contiguous(fmt), dweight.defined() ? dweight : (sum_dy_xmu * invstd),
          dbias.defined() ? dbias : sum_dy, dres};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("bn_act_fwd", &bn_act_fwd_cuda);
  m.impl("bn_act_bwd", &bn_act_bwd_cuda);
}

}  // namespace resnet_fast::cuda
