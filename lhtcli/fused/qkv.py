"""q, k, v from the packed projection ``qkv(x)`` (replaces the reference attention's view, permute and RoPE).

PyTorch's route writes the packed gradient three times in the backward (stack, rotate, cat); these write
it once. On CPU float32 with the native module at hand, the bias, RoPE and the head-major layout the
attention kernels read best are one pass after a bias-free matmul, and one pass back that also sums the
bias gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from lhtcli.core import cpu_matmul
from lhtcli.fused.kernel import kernel_for
from lhtcli.model import COMPLEX_OF, apply_rotary, as_complex_pairs


def attention_inputs(x: torch.Tensor, linear: nn.Linear, n_heads: int, rotation: torch.Tensor | None):
    """q, k, v [B, H, N, D] from the packed projection ``linear(x)`` [B, N, 3, H, D], q and k rotated by
    ``rotation`` [B, N, D/2] (complex) when given."""
    batch, n, _ = x.shape
    head_dim = linear.out_features // (3 * n_heads)
    kernel = kernel_for(x)
    if (
        kernel is not None
        and linear.bias is not None
        and linear.bias.dtype == torch.float32
        and head_dim % 2 == 0
        and (rotation is None or rotation.dtype == torch.complex64 and rotation.is_contiguous())
    ):
        qkv = cpu_matmul.linear(x, linear.weight).view(batch, n, 3, n_heads, head_dim)
        pairs = None if rotation is None else torch.view_as_real(rotation)  # [B, N, D/2, (cos, sin)]
        return _QKVHeads.apply(qkv, linear.bias, pairs, kernel)
    qkv = linear(x).view(batch, n, 3, n_heads, head_dim)
    # Split along the packed axis of the token-major layout: the backward is then one cat straight
    # into the projection's gradient layout (no zero-filled per-head copies, no reshape copy).
    return tuple(t.transpose(1, 2) for t in split_rotated(qkv, rotation))


def split_rotated(qkv: torch.Tensor, rotation: torch.Tensor | None):
    """(q, k, v) [B, N, H, D] from the packed projection [B, N, 3, H, D]; q and k rotated by
    ``rotation`` [B, N, D/2] (complex) when given."""
    if rotation is None:
        return qkv.unbind(2)
    if qkv.dtype in COMPLEX_OF:
        return _RotatedQKV.apply(qkv, rotation.to(COMPLEX_OF[qkv.dtype]))
    return _split_and_rotate(qkv, rotation)  # half precision: rotated in float32, autograd's backward


def _split_and_rotate(qkv: torch.Tensor, rotation: torch.Tensor):
    qk, v = qkv.split([2, 1], dim=2)
    q, k = apply_rotary(qk, rotation[:, :, None, None]).unbind(2)
    return q, k, v.squeeze(2)


class _RotatedQKV(torch.autograd.Function):
    """q, k (rotated) and v from the packed projection [B, N, 3, H, D], whose backward writes the
    packed gradient in one pass: the inverse rotations of dq and dk go straight into their thirds of it."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, rotation: torch.Tensor):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero tensor made
        ctx.save_for_backward(rotation)
        return _split_and_rotate(qkv, rotation)

    @staticmethod
    def backward(ctx, *grads):
        (rotation,) = ctx.saved_tensors
        like = next((g for g in grads if g is not None), None)
        if like is None:
            return None, None
        batch, n, heads, dim = like.shape
        packed = like.new_empty(batch, n, 3, heads, dim)
        inverse = rotation.conj()[:, :, None]  # [B, N, 1, D/2]
        for part, grad in enumerate(grads):
            target = packed[:, :, part]
            if grad is None:
                target.zero_()
            elif part == 2:
                target.copy_(grad)
            else:
                out = torch.view_as_complex(target.unflatten(-1, (-1, 2)))
                torch.mul(as_complex_pairs(grad), inverse, out=out)
        return packed, None


class _QKVHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, pairs, kernel):
        ctx.set_materialize_grads(False)
        ctx.kernel = kernel
        ctx.save_for_backward(pairs)
        heads = kernel.qkv_heads(qkv, bias, pairs)  # [3, B, H, N, D]
        return heads[0], heads[1], heads[2]

    @staticmethod
    def backward(ctx, *grads):
        (pairs,) = ctx.saved_tensors
        like = next((g for g in grads if g is not None), None)
        if like is None:
            return None, None, None, None
        full = [torch.zeros_like(like) if g is None else g if g.stride(-1) == 1 else g.contiguous() for g in grads]
        packed, grad_bias = ctx.kernel.qkv_heads_backward(*full, pairs)
        return packed, grad_bias if ctx.needs_input_grad[1] else None, None, None
