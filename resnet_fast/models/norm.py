"""BatchNormAct2d: ``nn.BatchNorm2d`` that can also run fused with the residual add and ReLU.

A subclass, so state_dicts, ``isinstance(m, nn.BatchNorm2d)``, init loops and
``nn.SyncBatchNorm.convert_sync_batchnorm`` (which turns it into a plain SyncBatchNorm) keep
working. Called as a module it is exactly ``nn.BatchNorm2d``; the models call
:meth:`forward_act` where torchvision runs BN -> (add ->) ReLU.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops


class BatchNormAct2d(nn.BatchNorm2d):
    def forward_act(self, x: Tensor, residual: Optional[Tensor] = None, relu: bool = True,
                    backend: Optional[str] = None) -> Tensor:
        """``relu(bn(x) (+ residual))`` in one fused op (training: batch statistics and the
        running-stat update exactly as ``nn.BatchNorm2d.forward`` does them)."""
        self._check_input_dim(x)
        tracking = self.training and self.track_running_stats
        use_running = not self.training or self.track_running_stats
        return ops.batch_norm_act(
            x, self.weight, self.bias,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.training,  # batch_norm_act itself uses batch stats without running ones
            self.momentum, self.eps, residual, relu,
            self.num_batches_tracked if tracking else None, backend=backend)
