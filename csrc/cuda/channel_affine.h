// The per-channel elementwise pass shared by scale_shift_act and the training BatchNorm's
// apply: out = act((x - center[c]) * scale[c] + shift[c] (+ residual)) (csrc/cuda/scale_shift_act.cu).
#pragma once
#include <ATen/core/Tensor.h>

namespace resnet_fast::cuda {

// x, residual (undefined: none) and out: dense in one memory format (channels_last: NHWC,
// else NCHW-like), of one dtype; out may not alias x or residual. center (undefined: none),
// scale and shift: (C,) in x's math type (float for half/bfloat16/float, double for double),
// contiguous. Subtracting center before scaling keeps digits a large mean would cancel.
void channel_affine_act(const at::Tensor& x, const at::Tensor& center, const at::Tensor& scale,
                        const at::Tensor& shift, const at::Tensor& residual, const at::Tensor& out,
                        bool channels_last, bool relu);

}  // namespace resnet_fast::cuda
