"""The MLM head's logits and loss (replaces ``MLMHead.forward`` and the cross-entropy after it).

On CPU float32 with the native module at hand, the decoder's bias, the softmax, the loss and (in the
backward) its gradient and the bias gradient are one pass each after a bias-free matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lhtcli.core import cpu_matmul
from lhtcli.fused.gelu import linear_gelu
from lhtcli.fused.kernel import kernel_for
from lhtcli.model import MLMHead, mlm_loss


def head_transform(head: MLMHead, hidden: torch.Tensor) -> torch.Tensor:
    """The head's dense + GELU + LayerNorm."""
    return head.norm(linear_gelu(hidden, head.dense))


def head_logits(head: MLMHead, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(head_transform(head, hidden), head.embedding.weight, head.bias)


def logits_and_loss(head: MLMHead, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [M, vocab] of hidden [M, d_model] and their mean cross-entropy against ``targets`` [M]."""
    h = head_transform(head, hidden)
    kernel = kernel_for(h)
    if kernel is None or targets.numel() == 0 or head.bias.dtype != torch.float32:
        logits = F.linear(h, head.embedding.weight, head.bias)
        return logits, mlm_loss(logits, targets)
    logits = cpu_matmul.linear(h, head.embedding.weight)
    return _BiasCrossEntropy.apply(logits, head.bias, targets.contiguous(), kernel)


class _BiasCrossEntropy(torch.autograd.Function):
    """(logits + bias, mean cross-entropy); the bias is added in place to the bias-free product."""

    @staticmethod
    def forward(ctx, logits, bias, targets, kernel):
        ctx.set_materialize_grads(False)
        loss, lse = kernel.cross_entropy_forward(logits, bias, targets)
        ctx.mark_dirty(logits)
        ctx.kernel = kernel
        ctx.save_for_backward(logits, lse, targets)
        return logits, loss

    @staticmethod
    def backward(ctx, grad_logits, grad_loss):
        logits, lse, targets = ctx.saved_tensors
        if grad_loss is None:
            grad, grad_bias = grad_logits, None if grad_logits is None else grad_logits.sum(0)
        else:
            scale = float(grad_loss) / logits.shape[0]
            grad, grad_bias = ctx.kernel.cross_entropy_backward(logits, lse, targets, scale)
            if grad_logits is not None:
                grad = grad + grad_logits
                grad_bias = grad_bias + grad_logits.sum(0)
        return grad, grad_bias if ctx.needs_input_grad[1] else None, None, None
