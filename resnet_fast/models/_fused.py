"""The fused eval path shared by every block and stem: conv -> BN (-> add) -> ReLU as one
``conv_bias_act`` call on BN-folded weights.

Folded weights are cached per conv and can never be stale: the cache key holds the version
counter, storage address, dtype and device of every tensor the fold reads (conv weight/bias,
BN weight/bias/running stats) and the BN's eps, so ``load_state_dict``, an optimizer step,
any in-place change and ``.to()`` force a refold. BatchNorm's kernel updates the running
stats in train mode without bumping their version counters (measured), but every such update
also increments ``num_batches_tracked`` in place, whose version is in the key too.
When gradients are wanted (frozen-BN fine-tuning in eval mode) the fold is recomputed on every
call so that it stays differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from .norm import BatchNormAct2d


def foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether conv -> bn can run as one fused conv in eval mode."""
    return (isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple)  # not "same"/"valid" strings
            and type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm, BatchNormAct2d) and not bn.training
            and bn.track_running_stats and bn.running_mean is not None)


def _tensors(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm):
    return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)


def _key(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> tuple:
    parts = [bn.eps, conv.weight.dtype, conv.weight.device]
    for t in (*_tensors(conv, bn), bn.num_batches_tracked):
        parts.append(None if t is None else (t._version, t.data_ptr()))
    return tuple(parts)


class FusedEvalMixin:
    """Gives a module ``_conv_bn(x, conv, bn, residual, relu)`` with a fold cache of its own
    (a plain attribute: not a parameter or buffer, so state_dicts are unchanged)."""

    backend: Optional[str]

    def _folded(self, conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in _tensors(conv, bn))):
            # Compiled: the fold is part of the graph (inductor's freezing constant-folds it);
            # with gradients: it must stay differentiable. Neither may use the cache.
            return ops.fold_bn(conv, bn)
        cache = self.__dict__.setdefault("_fold_cache", {})
        key = _key(conv, bn)
        entry = cache.get(id(conv))
        if entry is None or entry[0] is not conv or entry[1] != key:
            # Normal (not inference) tensors even under inference_mode, so a later call with
            # autograd on may save them for backward.
            with torch.inference_mode(False), torch.no_grad():
                weight, bias = ops.fold_bn(conv, bn)
            entry = (conv, key, weight, bias)
            cache[id(conv)] = entry  # one assignment: safe with concurrent readers
        return entry[2], entry[3]

    def _conv_bn(self, x: Tensor, conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm,
                 residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
        weight, bias = self._folded(conv, bn)
        return ops.conv_bias_act(x, weight, bias, conv.stride, conv.padding, conv.dilation,
                                 conv.groups, residual, relu, backend=self.backend)
