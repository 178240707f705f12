"""Regularizers used by course-style and timm-style ResNets: stochastic depth (DropPath) and
DropBlock. Both are identities in eval mode and hold no parameters or buffers, so they never
change a state_dict."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016): zero a whole sample's residual branch with
    probability ``p``, scale the kept ones by 1/(1-p) so the expectation is unchanged."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Module form of :func:`drop_path` with drop probability ``p`` in [0, 1)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath: expected a drop probability in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DropBlock2d(nn.Module):
    """DropBlock (Ghiasi et al. 2018): drop contiguous ``block_size`` x ``block_size``
    squares of each feature map instead of single activations.

    Block centres are drawn where a whole block fits, at the paper's rate
    gamma = p / block_size^2 * (H*W) / ((H-bs+1)*(W-bs+1)); overlapping blocks make the
    realized drop fraction a little lower than ``p``. Kept activations are rescaled by
    numel / kept so the batch mean is preserved. ``block_size`` larger than the feature map
    is clamped to it.
    """

    def __init__(self, p: float, block_size: int = 7) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropBlock2d: expected a drop probability in [0, 1), got {p}")
        if block_size < 1:
            raise ValueError(f"DropBlock2d: expected block_size >= 1, got {block_size}")
        self.p = float(p)
        self.block_size = int(block_size)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.dim() != 4:
            raise ValueError(f"DropBlock2d: expected a 4-D (N, C, H, W) tensor, got shape "
                             f"{list(x.shape)}")
        n, c, h, w = x.shape
        bs = min(self.block_size, h, w)
        valid = (h - bs + 1) * (w - bs + 1)
        gamma = self.p / (bs * bs) * (h * w) / valid
        # Seeds only where a full block fits: pad the valid region back to H x W with zeros.
        seeds = torch.bernoulli(torch.full((n, c, h - bs + 1, w - bs + 1), min(gamma, 1.0),
                                           dtype=x.dtype, device=x.device))
        # Pad the seed grid back to H x W so that max_pool2d (window bs, padding bs//2) grows
        # the seed at valid row i into rows i .. i+bs-1 (same for columns). For an even bs the
        # pool's output has one extra trailing row/column, cropped below.
        lo, hi = (bs - 1) // 2, bs // 2
        seeds = F.pad(seeds, (lo, hi, lo, hi))
        dropped = F.max_pool2d(seeds, kernel_size=bs, stride=1, padding=bs // 2)
        if bs % 2 == 0:
            dropped = dropped[:, :, :h, :w]
        keep = 1.0 - dropped
        scale = keep.numel() / keep.sum().clamp_min(1.0)
        return x * keep * scale

    def extra_repr(self) -> str:
        return f"p={self.p}, block_size={self.block_size}"
