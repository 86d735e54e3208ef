"""The Learned Hierarchical Transformer encoder (DESIGN.md section 4).

Pre-LayerNorm blocks of ML-SWA self-attention and a GELU MLP, rotary (or learned absolute) token
positions, a final LayerNorm and a BERT-style MLM head tied to the token embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lhtcli.config import ModelConfig
from lhtcli.core import cpu_matmul, native
from lhtcli.core.attention import MLSWAContext
from lhtcli.core.positions import HierarchicalPositions


@dataclass
class LayerCapture:
    """What a diagnostic needs from one layer: rotated queries and keys, [B, N, H, D] (token-major, the
    layout of the probes in :mod:`lhtcli.core.probing`)."""

    layer: int
    max_level: int
    q: torch.Tensor
    k: torch.Tensor


@dataclass
class LHTOutput:
    hidden: torch.Tensor  # [B, N, d_model] ([M, d_model]: the labelled rows, in training)
    mlm_logits: torch.Tensor  # [B, N, vocab] ([M, vocab])
    loss: torch.Tensor | None = None
    captures: list[LayerCapture] = field(default_factory=list)


def token_positions(positions: HierarchicalPositions) -> torch.Tensor:
    """0-based token index of each real token (padding gets 0): the coordinate RoPE rotates by."""
    return (positions.batched().level_enums[0] - 1).clamp(min=0)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, token_pos: torch.Tensor) -> torch.Tensor:
        """The unit rotations exp(i * angle), complex of shape [B, 1, N, D/2]."""
        angles = token_pos.to(self.inv_freq.dtype)[..., None] * self.inv_freq
        return torch.polar(torch.ones_like(angles), angles)[:, None]


_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., 2i], x[..., 2i+1]) by the angle of ``rotation[..., i]``.

    One complex multiply instead of four real ones, a stack and their backward: RoPE was the largest
    elementwise cost of a training step. Half precision is rotated in float32 (there is no complex
    bfloat16)."""
    work = x if x.dtype in _COMPLEX_OF else x.float()
    turned = _as_complex_pairs(work) * rotation.to(_COMPLEX_OF[work.dtype])
    return torch.view_as_real(turned).flatten(-2).to(x.dtype)


def _as_complex_pairs(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as complex [..., D/2] of its (even, odd) pairs: a view where the strides allow."""
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.contiguous()  # view_as_complex needs whole (re, im) pairs
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


class _RotatedQKV(torch.autograd.Function):
    """q, k (rotated) and v from the packed projection [B, N, 3, H, D], whose backward writes the
    packed gradient in one pass: the inverse rotations of dq and dk go straight into their thirds of
    it. Composed from split, rotate and unbind, autograd would write it three times (stack, rotate,
    cat). (With the native module, :func:`attention_inputs` does this and more in one kernel pass.)"""

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
                torch.mul(_as_complex_pairs(grad), inverse, out=out)
        return packed, None


def split_rotated(qkv: torch.Tensor, rotation: torch.Tensor | None):
    """(q, k, v) [B, N, H, D] from the packed projection [B, N, 3, H, D]; q and k rotated by
    ``rotation`` [B, N, D/2] (complex) when given."""
    if rotation is None:
        return qkv.unbind(2)
    if qkv.dtype in _COMPLEX_OF:
        return _RotatedQKV.apply(qkv, rotation.to(_COMPLEX_OF[qkv.dtype]))
    return _split_and_rotate(qkv, rotation)  # half precision: rotated in float32, autograd's backward


def attention_inputs(x: torch.Tensor, linear: nn.Linear, n_heads: int, rotation: torch.Tensor | None):
    """q, k, v [B, H, N, D] from the packed projection ``linear(x)`` [B, N, 3, H, D], q and k rotated by
    ``rotation`` [B, N, D/2] (complex) when given.

    On CPU float32 with the native module at hand this is one pass after a bias-free matmul (bias, RoPE and
    the head-major layout the attention kernels read best), and one pass back that also sums the bias
    gradient; otherwise head-major views of PyTorch's split and rotation."""
    batch, n, _ = x.shape
    head_dim = linear.out_features // (3 * n_heads)
    kernel = _native_kernel_for(x)
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


def _split_and_rotate(qkv: torch.Tensor, rotation: torch.Tensor):
    qk, v = qkv.split([2, 1], dim=2)
    q, k = apply_rotary(qk, rotation[:, :, None, None]).unbind(2)
    return q, k, v.squeeze(2)


class Dropout(nn.Module):
    """Inverted dropout, as ``nn.Dropout``, with the keep decision read from 15-bit uniform integers.

    On CPU with the native module at hand, the integers come from a counter-based generator (Philox4x32-10)
    inside the kernel, keyed by one 63-bit seed drawn from torch's generator per call: the mask is
    drawn in parallel in the same pass that applies it, and the backward redraws it from the seed
    instead of storing it (dropout was the largest non-matmul cost of a CPU training step). Without it,
    the integers are four per 64-bit draw of torch's generator, about 4x cheaper than ``torch.rand``.
    Either way the drop probability is ``p`` rounded to a multiple of 1/32768, kept values are scaled by
    the exact inverse of the resulting keep probability (the expectation is unchanged), and a fixed
    ``torch.manual_seed`` gives the same masks on the same path. Off CPU it is ``F.dropout``."""

    LEVELS = 1 << 15

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = min(round(p * self.LEVELS), self.LEVELS - 1)

    @property
    def active(self) -> bool:
        return self.training and self.p > 0.0

    @property
    def scale(self) -> float:
        """What kept values are multiplied by: the inverse of the keep probability after rounding."""
        return self.LEVELS / (self.LEVELS - self.threshold)

    @staticmethod
    def draw_seed() -> int:
        """The native kernel's Philox key for one call, from torch's generator."""
        return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        kernel = _native_kernel_for(x)
        if kernel is not None:
            return _NativeDropout.apply(x, self.draw_seed(), kernel, self.threshold, self.scale)
        n = x.numel()
        # random_() on int64 is uniform over [0, 2^63): every 16-bit quarter has 15 uniform low bits
        bits = torch.empty(-(-n // 4), dtype=torch.int64, device=x.device).random_().view(torch.int16)[:n]
        keep = bits.bitwise_and_(self.LEVELS - 1).ge_(self.threshold).view(x.shape)
        return x * (keep * torch.tensor(self.scale, dtype=x.dtype))  # 0 or 1/keep-probability in x's dtype

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _native_kernel_for(x: torch.Tensor):
    """The native module when it is at hand for this contiguous float32 CPU tensor (it is never built for
    these elementwise kernels alone: training builds it when its batches run the compact path, or a
    cached build is loaded)."""
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or not x.is_contiguous()
        or torch.is_autocast_enabled("cpu")
        or not native.ready()
    ):
        return None  # (CUDA, half precision or autocast, strided views: PyTorch's ops)
    return native.band_kernel()


class _NativeDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed: int, kernel, threshold: int, scale: float):
        ctx.kernel, ctx.seed, ctx.threshold, ctx.scale = kernel, seed, threshold, scale
        return kernel.dropout_philox(x, seed, threshold, scale)

    @staticmethod
    def backward(ctx, grad):
        return ctx.kernel.dropout_philox(grad.contiguous(), ctx.seed, ctx.threshold, ctx.scale), None, None, None, None


def residual_branch(
    residual: torch.Tensor | None,
    x: torch.Tensor,
    linear: nn.Linear,
    dropout: Dropout,
    norm: nn.LayerNorm | None = None,
):
    """``residual + dropout(linear(x))`` (just ``dropout(linear(x))`` without a residual), and with ``norm``
    the pair (that sum, ``norm`` of it). Training on CPU float32 with the native module at hand, the
    projection's bias, the dropout and the residual add are one pass after a bias-free matmul (instead of a
    bias copy, a dropout pass and an add), and so is the LayerNorm after them when it is a plain affine one."""
    kernel = _native_kernel_for(x)
    if (
        residual is None
        or kernel is None
        or not dropout.active
        or linear.bias is None
        or linear.bias.dtype != torch.float32
        or residual.dtype != torch.float32
        or not residual.is_contiguous()
    ):
        out = dropout(linear(x))
        out = out if residual is None else residual + out
        return out if norm is None else (out, norm(out))
    y = cpu_matmul.linear(x, linear.weight)
    seed = dropout.draw_seed()
    if norm is not None and _plain_float32_norm(norm, y.shape[-1]):
        return _ResidualNorm.apply(residual, y, linear.bias, norm.weight, norm.bias, kernel, seed, dropout.threshold,
                                   dropout.scale, norm.eps)
    out = _ResidualDropout.apply(residual, y, linear.bias, kernel, seed, dropout.threshold, dropout.scale)
    return out if norm is None else (out, norm(out))


def _plain_float32_norm(norm: nn.LayerNorm, features: int) -> bool:
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


def linear_gelu(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``F.gelu(linear(x))``; on CPU float32 with the native module at hand, the bias and the exact GELU
    are one pass that also saves GELU's derivative for the backward (in place of the pre-activation),
    which is then one multiply and the bias gradient's column sums."""
    kernel = _native_kernel_for(x)
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


class MLSWASelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, max_level: int) -> None:
        super().__init__()
        self.layer = layer
        self.max_level = max_level
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        context: MLSWAContext,
        rotary: torch.Tensor | None,
        captures: list[LayerCapture] | None,
        residual: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        norm: nn.LayerNorm | None = None,
    ):
        """The attention sublayer's output, added to ``residual`` when given; with ``norm``, the pair (that,
        ``norm`` of it). With ``rows`` (flat indices into the B * N tokens) only those rows go on through the
        output projection: [len(rows), d_model], ``residual`` already gathered to them."""
        batch, n, d_model = x.shape
        q, k, v = attention_inputs(x, self.qkv, self.n_heads, None if rotary is None else rotary[:, 0])
        if captures is not None:
            captures.append(
                LayerCapture(self.layer, self.max_level, q.detach().transpose(1, 2), k.detach().transpose(1, 2))
            )
        out = context.attend(q, k, v, self.max_level)
        out = out.transpose(1, 2).reshape(batch, n, d_model)
        if rows is not None:
            out = out.reshape(batch * n, d_model).index_select(0, rows)
        return residual_branch(residual, out, self.proj, self.dropout, norm)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, norm: nn.LayerNorm | None = None):
        """The MLP's output, added to ``residual`` when given; with ``norm``, the pair (that, ``norm`` of it)."""
        return residual_branch(residual, linear_gelu(x, self.fc), self.proj, self.dropout, norm)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, max_level: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = MLSWASelfAttention(cfg, layer, max_level)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, normed, context, rotary, captures, next_norm: nn.LayerNorm, rows: torch.Tensor | None = None):
        """x [B, N, d_model] and ``normed`` = norm1(x) -> (the block's output, ``next_norm`` of it): each
        LayerNorm is computed with the residual add before it (one native pass on CPU). With ``rows`` (flat
        token indices) the outputs are just those rows, [len(rows), d_model]: every token still serves as
        a key and value, but only these rows go on through the projection, the residual and the MLP."""
        residual = x if rows is None else x.reshape(-1, x.shape[-1]).index_select(0, rows)
        x, normed = self.attn(normed, context, rotary, captures, residual=residual, rows=rows, norm=self.norm2)
        return self.mlp(normed, residual=x, norm=next_norm)


class MLMHead(nn.Module):
    """BERT's transform (dense, GELU, LayerNorm) then a decoder tied to the token embedding."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self._transform(hidden), self.embedding.weight, self.bias)

    def _transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(linear_gelu(hidden, self.dense))

    def logits_and_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [M, vocab] of hidden [M, d_model] and their mean cross-entropy against ``targets`` [M].

        On CPU float32 with the native module at hand, the decoder's bias, the softmax, the loss and (in
        the backward) its gradient and the bias gradient are one pass each after a bias-free matmul."""
        h = self._transform(hidden)
        kernel = _native_kernel_for(h)
        if kernel is None or targets.numel() == 0 or self.bias.dtype != torch.float32:
            logits = F.linear(h, self.embedding.weight, self.bias)
            return logits, F.cross_entropy(_at_least_float32(logits), targets)
        logits = cpu_matmul.linear(h, self.embedding.weight)
        return _BiasCrossEntropy.apply(logits, self.bias, targets.contiguous(), kernel)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits go up to float32 for the loss; float64 ones stay float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


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


class LHTEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = None if cfg.rope else nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.rotary = RotaryEmbedding(cfg.d_model // cfg.n_heads, cfg.rope_theta) if cfg.rope else None
        self.embedding_dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i, lvl) for i, lvl in enumerate(cfg.max_levels()))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.mlm_head = MLMHead(cfg, self.token_embedding)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: HierarchicalPositions,
        labels: torch.Tensor | None = None,
        capture: bool = False,
        context: MLSWAContext | None = None,
        return_logits: bool = True,
    ) -> LHTOutput:
        """input_ids [B, N]; positions batched to [B, N]. ``capture`` keeps each layer's q and k.

        With ``return_logits=False`` and labels (training) only the labelled positions, about 15% of the
        tokens, go through the MLM head and, since nothing else reads the last layer's output, through
        the last layer's output projection and MLP: ``hidden`` and ``mlm_logits`` hold just those rows
        ([M, d_model], [M, vocab]), and the loss and every gradient are those of the full computation.
        """
        positions = positions.batched()
        batch, n = input_ids.shape
        if positions.seq_len != n:
            raise ValueError(f"positions cover {positions.seq_len} tokens but input_ids has {n}")
        if n > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {n} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        context = context or MLSWAContext(positions, self.cfg.mlswa.window_size_per_level, self.cfg.mlswa.backend)
        token_pos = token_positions(positions)
        x = self.token_embedding(input_ids)
        rotary = None
        if self.rotary is not None:
            rotary = self.rotary(token_pos)
        else:
            x = x + self.position_embedding(token_pos)
        x = self.embedding_dropout(x)
        captures: list[LayerCapture] | None = [] if capture else None
        labelled_only = labels is not None and not return_logits
        normed = self.blocks[0].norm1(x)
        for block, next_block in zip(self.blocks[:-1], self.blocks[1:], strict=True):
            x, normed = block(x, normed, context, rotary, captures, next_block.norm1)
        if not labelled_only:
            _, hidden = self.blocks[-1](x, normed, context, rotary, captures, self.final_norm)
            hidden = hidden * positions.real_mask[..., None]  # padding carries no signal downstream
            logits = self.mlm_head(hidden)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(_at_least_float32(logits).view(-1, logits.shape[-1]), labels.view(-1),
                                       ignore_index=-100)
            return LHTOutput(hidden, logits, loss, captures or [])
        rows = (labels.reshape(-1) != -100).nonzero().squeeze(1)
        _, hidden = self.blocks[-1](x, normed, context, rotary, captures, self.final_norm, rows=rows)
        hidden = hidden * positions.real_mask.reshape(-1, 1).index_select(0, rows)
        logits, loss = self.mlm_head.logits_and_loss(hidden, labels.reshape(-1).index_select(0, rows))
        return LHTOutput(hidden, logits, loss, captures or [])

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len: int, head_fraction: float = 1.0) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): matmuls plus attention over the
        average number of allowed keys (bounded by the token window for long sequences).
        ``head_fraction``: share of the tokens the MLM head runs on (training: the labelled ~15%), and so
        the last layer's output projection and MLP (nothing else reads the last layer's other rows)."""
        cfg = self.cfg
        per_layer = 2 * (4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff)
        last_layer_tail = 2 * (cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff) * (1.0 - head_fraction)
        dense = per_layer * cfg.num_layers - last_layer_tail
        head = 2 * cfg.d_model * (cfg.d_model + (cfg.vocab_size or 0)) * head_fraction
        keys = min(seq_len, 2 * cfg.mlswa.window_size_per_level[0] + 1)
        attention = 2 * 2 * keys * cfg.d_model * cfg.num_layers
        return 3.0 * (dense + head + attention)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no weight decay on biases and norms (vectors), decay on matrices."""
        decay, no_decay = [], []
        for _name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (decay if param.dim() >= 2 else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def describe_size(num_params: int) -> str:
    if num_params >= 1e9:
        return f"{num_params / 1e9:.2f}B"
    if num_params >= 1e6:
        return f"{num_params / 1e6:.2f}M"
    return f"{num_params / 1e3:.1f}K"


__all__ = ["LHTEncoder", "LHTOutput", "LayerCapture", "describe_size"]
