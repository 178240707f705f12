"""BN -> (add ->) ReLU as one fused op on a plain ``nn.BatchNorm2d``.

The models use torchvision's own ``nn.BatchNorm2d`` modules (so module types, state_dicts,
FX leaf modules and ``convert_sync_batchnorm`` are torchvision's) and call :func:`bn_act`
where torchvision runs BN -> (add ->) ReLU in training.
"""

from typing import Optional

from torch import Tensor, nn

from .. import ops
from ._fused import no_hooks


def fusable_bn(bn: nn.Module) -> bool:
    """Whether ``bn`` is exactly ``nn.BatchNorm2d`` (not SyncBatchNorm, which must reduce its
    statistics across processes, nor a subclass, whose forward may differ) without hooks
    (which its fused replacement would skip)."""
    return type(bn) is nn.BatchNorm2d and no_hooks(bn)


def bn_act(bn: nn.BatchNorm2d, x: Tensor, residual: Optional[Tensor] = None, relu: bool = True,
           backend: Optional[str] = None) -> Tensor:
    """``relu(bn(x) (+ residual))`` in one fused op (training: batch statistics and the
    running-stat update exactly as ``nn.BatchNorm2d.forward`` does them)."""
    bn._check_input_dim(x)
    tracking = bn.training and bn.track_running_stats
    use_running = not bn.training or bn.track_running_stats
    return ops.batch_norm_act(
        x, bn.weight, bn.bias,
        bn.running_mean if use_running else None,
        bn.running_var if use_running else None,
        bn.training,  # batch_norm_act itself uses batch stats without running ones
        bn.momentum, bn.eps, residual, relu,
        bn.num_batches_tracked if tracking else None, backend=backend)
