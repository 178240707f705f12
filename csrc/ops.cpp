// Operator schemas of the resnet_fast library and the Python module entry point.
//
// The schemas of the C++ ops are defined here, once; their kernels register per dispatch key
// in csrc/cpu and csrc/cuda. Defined in Python instead: the composite batch_norm_act
// (resnet_fast/ops/batch_norm_act.py, on the same library as a FRAGMENT, ops/_common.py) and
// every *_triton variant (a torch.library.custom_op beside its op in resnet_fast/ops/). Fake
// (meta) kernels, autograd and autocast are registered from Python (resnet_fast/ops). Importing the module runs the static registrations; the ops are then
// reached through torch.ops.resnet_fast. Its one Python function is tensor_states (the
// models' per-forward check of their plans, csrc/tensor_states.cpp).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(resnet_fast, m) {
  // relu(x + residual), elementwise; x and residual have the same shape, dtype and device.
  m.def("add_relu(Tensor x, Tensor residual) -> Tensor");
  // act(x * scale[c] + shift[c] (+ residual)) for x of shape (N, C, ...); act = relu or none.
  m.def("scale_shift_act(Tensor x, Tensor scale, Tensor shift, Tensor? residual=None, "
        "bool relu=True) -> Tensor");
  // act(max_pool2d(x, kernel_size, stride, padding)) (dilation 1, floor rounding, no
  // indices): the stem's maxpool, with the stem's ReLU moved behind it (max and ReLU commute,
  // NaN included). CPU.
  m.def("max_pool_act(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, "
        "bool relu=False) -> Tensor");
  // act(conv2d(x, weight, stride, padding, dilation, groups) + bias[k] (+ residual)): a
  // convolution whose BatchNorm was folded into weight/bias, with the block's tail fused.
  m.def("conv_bias_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, Tensor? residual=None, bool relu=True) -> Tensor");
  // The weight prepared once for conv_bias_act_packed on CPU: oneDNN's blocked layout for
  // this geometry and input size (N, C, H, W); an mkldnn-layout tensor of the weight's shape.
  m.def("prepack_conv_weight(Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups, int[4] input_size) -> Tensor");
  // conv_bias_act with a weight from prepack_conv_weight (inference: no autograd).
  m.def("conv_bias_act_packed(Tensor x, Tensor packed_weight, Tensor? bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, Tensor? residual=None, bool relu=True) "
        "-> Tensor");
  // The weight (K, C, 3, 3) transformed once for conv_bias_act_winograd on CPU: tile 2 is
  // F(2x2,3x3), tile 4 F(4x4,3x3); a float32 tensor laid out for this CPU's vector width.
  m.def("winograd_prepack(Tensor weight, int tile) -> Tensor");
  // act(conv2d(x, weight, stride 1, padding) + bias (+ residual)) for a 3x3 weight, by
  // Winograd's algorithm on packed_weight = winograd_prepack(weight) (inference: no
  // autograd); float32 or bfloat16 on CPU (float32 arithmetic). weight itself is read only
  // for tiles of non-finite input.
  m.def("conv_bias_act_winograd(Tensor x, Tensor weight, Tensor packed_weight, Tensor bias, "
        "int[2] padding, Tensor? residual=None, bool relu=True) -> Tensor");
  // The same written over residual (dense channels_last, apart from x): for a caller that
  // owns the residual and reads it no more (the models' programs, a block's last conv).
  m.def("conv_bias_act_winograd_(Tensor x, Tensor weight, Tensor packed_weight, Tensor bias, "
        "int[2] padding, Tensor(a!) residual, bool relu=True) -> ()");
  // The gradient (K, C, 3, 3) of a stride-1 3x3 conv's weight (one group, dilation 1) from
  // its input x (N, C, H, W) and output gradient grad (N, K, P, Q), by Winograd's F(2x2,3x3)
  // on CPU, float32.
  m.def("conv3x3_weight_grad(Tensor x, Tensor grad, int[2] padding) -> Tensor");
  // The weight (K, C, 1, 1) laid out once for conv_bias_act_1x1 on CPU: float32 (ceil(K / kb),
  // C, kb), kb output channels side by side (two vector widths of this CPU); bfloat16
  // (ceil(K / 32), ceil(C / 2), 64), pairs of input channels side by side.
  m.def("conv1x1_prepack(Tensor weight) -> Tensor");
  // x (4-D) as a new dense channels_last tensor: on CPU, for NCHW-dense x, a blocked transpose
  // (torch's copy is up to 6x slower where H*W is a large power of two); else torch's copy.
  m.def("to_channels_last(Tensor x) -> Tensor");
  // act(conv2d(x, weight, stride) (+ bias) (+ residual)) for a 1x1 weight, as our own GEMM on
  // packed_weight = conv1x1_prepack(weight) (inference: no autograd); float32, and bfloat16
  // with AVX512-BF16, on CPU. No bias: the models' downsample convs (their bias moves into
  // the block's last conv).
  m.def("conv_bias_act_1x1(Tensor x, Tensor weight, Tensor packed_weight, Tensor? bias, "
        "int[2] stride, Tensor? residual=None, bool relu=True) -> Tensor");
  // The same written over residual, as conv_bias_act_winograd_.
  m.def("conv_bias_act_1x1_(Tensor x, Tensor weight, Tensor packed_weight, Tensor? bias, "
        "int[2] stride, Tensor(a!) residual, bool relu=True) -> ()");
  // Training BatchNorm (batch statistics) fused with (+ residual) and ReLU: returns
  // (out, mean, var) with the batch mean and biased variance per channel in float32 (float64
  // for float64 x). The running-stat update is left to the caller (resnet_fast.ops).
  m.def("bn_act_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, bool relu, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  // Its backward from the saved statistics and output (the ReLU mask): (dx, dweight, dbias,
  // dresidual); dresidual is the masked grad when residual_grad, else an empty tensor.
  m.def("bn_act_bwd(Tensor grad, Tensor x, Tensor out, Tensor? weight, Tensor mean, "
        "Tensor var, float eps, bool relu, bool residual_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // Whether oneDNN runs convolutions in dtype on this CPU (torch's CPUID tests): the one
  // answer that conv_bias_act's CPU kernels and Python (onednn_dtypes, optimize) share.
  m.def("onednn_dtype_supported(ScalarType dtype) -> bool");
  // The CPU output-buffer cache (csrc/cpu/buffer_pool.h): free it, or read its size in bytes.
  m.def("cpu_buffer_cache_clear() -> int");
  m.def("cpu_buffer_cache_bytes() -> int");
}

extern "C" {
PyObject* resnet_fast_tensor_states(PyObject* module, PyObject* arg);  // tensor_states.cpp

// A plain CPython module (no pybind11): the registrations above, plus one function the
// models call once per forward; skipping torch/extension.h keeps this file quick to compile.
PyMODINIT_FUNC PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"tensor_states", resnet_fast_tensor_states, METH_O,
       "tensor_states(tensors) -> bytes: (version, data pointer) of each tensor as int64 pairs"},
      {nullptr, nullptr, 0, nullptr},
  };
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "resnet_fast native kernels; use torch.ops.resnet_fast.*",
      -1,
      methods,
  };
  return PyModule_Create(&module_def);
}
}
