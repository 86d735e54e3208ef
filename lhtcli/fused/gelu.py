"""``F.gelu(linear(x))`` (replaces the MLP's and the MLM head's first layer).

On CPU float32 with the native module at hand, the bias and the exact GELU are one pass that also saves
GELU's derivative for the backward (in place of the pre-activation), which is then one multiply and the
bias gradient's column sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lhtcli.core import cpu_matmul
from lhtcli.fused.kernel import kernel_for


def linear_gelu(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    kernel = kernel_for(x)
    if kernel is None or linear.bias is None or linear.bias.dtype != torch.float32:
        return F.gelu(linear(x))
    h = cpu_matmul.linear(x, linear.weight)
    if torch.is_grad_enabled() and (h.requires_grad or linear.bias.requires_grad):
        return _BiasGELU.apply(h, linear.bias, kernel)
    return kernel.bias_gelu_forward(h, linear.bias, False)[0]


class _BiasGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias, kernel):
        y, derivative = kernel.bias_gelu_forward(h, bias, True)
        ctx.kernel = kernel
        ctx.save_for_backward(derivative)
        return y

    @staticmethod
    def backward(ctx, grad):
        (derivative,) = ctx.saved_tensors
        grad_h, grad_bias = ctx.kernel.bias_gelu_backward(grad.contiguous(), derivative)
        return grad_h, grad_bias if ctx.needs_input_grad[1] else None, None
