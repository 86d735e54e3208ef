"""Dropout with the keep decision read from 15-bit uniform integers (replaces ``nn.Dropout`` on CPU).

With the native module at hand the integers come from a counter-based generator (Philox4x32-10) inside
the kernel, keyed by one 63-bit seed drawn from torch's generator per call: the mask is drawn in the same
pass that applies it, and the backward redraws it from the seed instead of storing it (dropout was the
largest non-matmul cost of a CPU training step). Without it, the integers are four per 64-bit draw of
torch's generator, about 4x cheaper than ``torch.rand``. Either way the drop probability is ``p`` rounded to
a multiple of 1/32768, kept values are scaled by the exact inverse of the resulting keep probability (the
expectation is unchanged), and a fixed ``torch.manual_seed`` gives the same masks on the same path. Off
CPU it is ``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lhtcli.fused.kernel import kernel_for

LEVELS = 1 << 15


def drop_threshold(p: float) -> int:
    """Values whose 15-bit draw is below this are dropped."""
    return min(round(p * LEVELS), LEVELS - 1)


def keep_scale(p: float) -> float:
    """What kept values are multiplied by: the inverse of the keep probability after rounding."""
    return LEVELS / (LEVELS - drop_threshold(p))


def draw_seed() -> int:
    """The native kernel's Philox key for one call, from torch's generator."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def active(layer: nn.Module) -> bool:
    """Whether a dropout layer (``nn.Dropout`` or :class:`Dropout`) drops anything now."""
    return layer.training and layer.p > 0.0


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    kernel = kernel_for(x)
    if kernel is not None:
        return _NativeDropout.apply(x, draw_seed(), kernel, drop_threshold(p), keep_scale(p))
    n = x.numel()
    # random_() on int64 is uniform over [0, 2^63): every 16-bit quarter has 15 uniform low bits
    bits = torch.empty(-(-n // 4), dtype=torch.int64, device=x.device).random_().view(torch.int16)[:n]
    keep = bits.bitwise_and_(LEVELS - 1).ge_(drop_threshold(p)).view(x.shape)
    return x * (keep * torch.tensor(keep_scale(p), dtype=x.dtype))  # 0 or 1/keep-probability in x's dtype


class Dropout(nn.Module):
    """:func:`dropout` as a module, for use outside the fused encoder (it reads ``nn.Dropout`` layers)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    LEVELS = LEVELS

    @property
    def threshold(self) -> int:
        return drop_threshold(self.p)

    @property
    def scale(self) -> float:
        return keep_scale(self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _NativeDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed: int, kernel, threshold: int, scale: float):
        ctx.kernel, ctx.seed, ctx.threshold, ctx.scale = kernel, seed, threshold, scale
        return kernel.dropout_philox(x, seed, threshold, scale)

    @staticmethod
    def backward(ctx, grad):
        return ctx.kernel.dropout_philox(grad.contiguous(), ctx.seed, ctx.threshold, ctx.scale), None, None, None, None
