"""Public functional ops. Each is also ``torch.ops.resnet_fast.<name>`` when the native
extension is built (see ``resnet_fast.available_backends()``)."""

from . import max_pool_act  # noqa: F401  (the op's fake kernel and autograd)
from .add_relu import add_relu
from .batch_norm_act import batch_norm_act
from .cache import cpu_cache_bytes, empty_cpu_cache
from .conv_bias_act import conv_bias_act, fold_bn
from .scale_shift_act import scale_shift_act

__all__ = ["add_relu", "batch_norm_act", "scale_shift_act", "conv_bias_act", "fold_bn", "cpu_cache_bytes",
           "empty_cpu_cache"]
