"""``residual + dropout(linear(x))`` and the LayerNorm after it (replaces a block's two residual adds).

Training on CPU float32 with the native module at hand, the projection's bias, the dropout and the
residual add are one pass after a bias-free matmul (instead of a bias copy, a dropout pass and an add),
and so is the LayerNorm after them when it is a plain affine one.
"""

from __future__ import annotations

import torch
from torch import nn

from lhtcli.core import cpu_matmul
from lhtcli.fused import dropout as drop
from lhtcli.fused.kernel import kernel_for


def residual_branch(
    residual: torch.Tensor | None,
    x: torch.Tensor,
    linear: nn.Linear,
    dropout: nn.Module,
    norm: nn.LayerNorm | None = None,
):
    """``residual + dropout(linear(x))`` (just ``dropout(linear(x))`` without a residual), and with ``norm``
    the pair (that sum, ``norm`` of it). ``dropout`` is an ``nn.Dropout`` (its ``p`` and mode are read)."""
    kernel = kernel_for(x)
    if (
        residual is None
        or kernel is None
        or not drop.active(dropout)
        or linear.bias is None
        or linear.bias.dtype != torch.float32
        or residual.dtype != torch.float32
        or not residual.is_contiguous()
    ):
        out = drop.dropout(linear(x), dropout.p, dropout.training)
        out = out if residual is None else residual + out
        return out if norm is None else (out, norm(out))
    y = cpu_matmul.linear(x, linear.weight)
    seed, threshold, scale = drop.draw_seed(), drop.drop_threshold(dropout.p), drop.keep_scale(dropout.p)
    if norm is not None and plain_float32_norm(norm, y.shape[-1]):
        return _ResidualNorm.apply(residual, y, linear.bias, norm.weight, norm.bias, kernel, seed, threshold, scale,
                                   norm.eps)
    out = _ResidualDropout.apply(residual, y, linear.bias, kernel, seed, threshold, scale)
    return out if norm is None else (out, norm(out))


def plain_float32_norm(norm: nn.LayerNorm, features: int) -> bool:
    return (
        tuple(norm.normalized_shape) == (features,)
        and norm.weight is not None
        and norm.bias is not None
        and norm.weight.dtype == torch.float32
        and norm.bias.dtype == torch.float32
    )


class _ResidualNorm(torch.autograd.Function):
    """(x, LayerNorm(x)) for x = residual + dropout(y + bias), one native pass each way."""

    @staticmethod
    def forward(ctx, residual, y, bias, weight, norm_bias, kernel, seed: int, threshold: int, scale: float, eps: float):
        ctx.set_materialize_grads(False)
        x, normed, stats = kernel.residual_norm_forward(y, bias, residual, seed, threshold, scale, weight.contiguous(),
                                                        norm_bias.contiguous(), eps)
        ctx.kernel, ctx.seed, ctx.threshold, ctx.scale = kernel, seed, threshold, scale
        ctx.save_for_backward(x, stats, weight)
        return x, normed

    @staticmethod
    def backward(ctx, grad_x, grad_normed):
        x, stats, weight = ctx.saved_tensors
        if grad_normed is None:
            grad_normed = torch.zeros_like(x)
        total, grad_y, grad_bias, grad_weight, grad_norm_bias = ctx.kernel.residual_norm_backward(
            None if grad_x is None else grad_x.contiguous(), grad_normed.contiguous(), x, stats, weight.contiguous(),
            ctx.seed, ctx.threshold, ctx.scale,
        )
        needs = ctx.needs_input_grad
        return (
            total if needs[0] else None,
            grad_y if needs[1] else None,
            grad_bias if needs[2] else None,
            grad_weight if needs[3] else None,
            grad_norm_bias if needs[4] else None,
            None, None, None, None, None,
        )


class _ResidualDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, y, bias, kernel, seed: int, threshold: int, scale: float):
        ctx.kernel, ctx.seed, ctx.threshold, ctx.scale = kernel, seed, threshold, scale
        return kernel.dropout_philox(y, seed, threshold, scale, bias, residual)

    @staticmethod
    def backward(ctx, grad):
        grad_y = ctx.kernel.dropout_philox(grad.contiguous(), ctx.seed, ctx.threshold, ctx.scale)
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad, grad_y, grad_bias, None, None, None, None
