"""The Learned Hierarchical Transformer encoder (DESIGN.md section 4), as reference PyTorch.

Pre-LayerNorm blocks of ML-SWA self-attention and a GELU MLP, rotary (or learned absolute) token
positions, a final LayerNorm and a BERT-style MLM head tied to the token embedding. The ML-SWA call,
``context.attend`` (lhtcli/core/attention.py), is the only non-standard piece.

This file is the definition of the math. Training runs the same parameters through the fused CPU fast
paths in ``lhtcli/fused/`` (``LHTEncoder(cfg, fused=True)``, the default), which are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lhtcli.config import ModelConfig
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

    @classmethod
    def of(cls, attn: MLSWASelfAttention, q: torch.Tensor, k: torch.Tensor) -> LayerCapture:
        """The capture of ``attn``'s head-major [B, H, N, D] q and k (as the attention reads them)."""
        return cls(attn.layer, attn.max_level, q.detach().transpose(1, 2), k.detach().transpose(1, 2))


@dataclass
class LHTOutput:
    hidden: torch.Tensor  # [B, N, d_model] ([M, d_model]: the labelled rows, with return_logits=False)
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
        """The unit rotations exp(i * angle), complex of shape [B, 1, N, D/2] (broadcast over heads)."""
        angles = token_pos.to(self.inv_freq.dtype)[..., None] * self.inv_freq
        return torch.polar(torch.ones_like(angles), angles)[:, None]


COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., 2i], x[..., 2i+1]) by the angle of ``rotation[..., i]``: one complex
    multiply. Half precision is rotated in float32 (there is no complex bfloat16)."""
    work = x if x.dtype in COMPLEX_OF else x.float()
    turned = as_complex_pairs(work) * rotation.to(COMPLEX_OF[work.dtype])
    return torch.view_as_real(turned).flatten(-2).to(x.dtype)


def as_complex_pairs(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as complex [..., D/2] of its (even, odd) pairs: a view where the strides allow."""
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.contiguous()  # view_as_complex needs whole (re, im) pairs
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


class MLSWASelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, max_level: int) -> None:
        super().__init__()
        self.layer = layer
        self.max_level = max_level  # the highest hierarchy level this layer attends over
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, context: MLSWAContext, rotation, captures: list[LayerCapture] | None = None):
        batch, n, d_model = x.shape
        qkv = self.qkv(x).view(batch, n, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, D]
        if rotation is not None:
            q, k = apply_rotary(q, rotation), apply_rotary(k, rotation)
        if captures is not None:
            captures.append(LayerCapture.of(self, q, k))
        y = context.attend(q, k, v, self.max_level)  # ML-SWA: exact softmax attention over the allowed keys
        y = y.transpose(1, 2).reshape(batch, n, d_model)
        return self.dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, max_level: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = MLSWASelfAttention(cfg, layer, max_level)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, context: MLSWAContext, rotation, captures: list[LayerCapture] | None = None):
        x = x + self.attn(self.norm1(x), context, rotation, captures)
        return x + self.mlp(self.norm2(x))


class MLMHead(nn.Module):
    """BERT's transform (dense, GELU, LayerNorm) then a decoder tied to the token embedding."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), self.embedding.weight, self.bias)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions (label -100: not counted), in at least float32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class LHTEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, fused: bool = True) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        self.cfg = cfg
        self.fused = fused  # run lhtcli/fused/ (same parameters, same results, faster) instead of forward below
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = None if cfg.rope else nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.rotary = RotaryEmbedding(cfg.d_model // cfg.n_heads, cfg.rope_theta) if cfg.rope else None
        self.embedding_dropout = nn.Dropout(cfg.dropout)
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
        """input_ids [B, N]; positions batched to [B, N]; labels [B, N] (-100: no label). ``capture`` keeps
        each layer's q and k. With labels and ``return_logits=False`` (training) ``hidden`` and
        ``mlm_logits`` hold only the labelled rows ([M, d_model], [M, vocab]); the loss is the same."""
        if self.fused:
            from lhtcli.fused.encoder import forward  # (imported here: the fused paths build on this module)

            return forward(self, input_ids, positions, labels, capture, context, return_logits)
        positions, context = self.prepare(input_ids, positions, context)
        x, rotation = self.embed(input_ids, positions)
        x = self.embedding_dropout(x)
        captures: list[LayerCapture] | None = [] if capture else None
        for block in self.blocks:
            x = block(x, context, rotation, captures)
        hidden = self.final_norm(x) * positions.real_mask[..., None]  # padding carries no signal downstream
        if labels is not None and not return_logits:
            labelled = labels != -100
            hidden, labels = hidden[labelled], labels[labelled]
        logits = self.mlm_head(hidden)
        loss = None if labels is None else mlm_loss(logits, labels)
        return LHTOutput(hidden, logits, loss, captures or [])

    def prepare(self, input_ids, positions: HierarchicalPositions, context: MLSWAContext | None):
        """Checked, batched positions and the ML-SWA context (masks or plans shared by every layer)."""
        positions = positions.batched()
        n = input_ids.shape[1]
        if positions.seq_len != n:
            raise ValueError(f"positions cover {positions.seq_len} tokens but input_ids has {n}")
        if n > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {n} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        context = context or MLSWAContext(positions, self.cfg.mlswa.window_size_per_level, self.cfg.mlswa.backend)
        return positions, context

    def embed(self, input_ids, positions: HierarchicalPositions) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings (plus learned positions without RoPE) and RoPE's rotations [B, 1, N, D/2] (or None)."""
        token_pos = token_positions(positions)
        x = self.token_embedding(input_ids)
        if self.rotary is None:
            return x + self.position_embedding(token_pos), None
        return x, self.rotary(token_pos)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len: int, head_fraction: float = 1.0) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): matmuls plus attention over the
        average number of allowed keys (bounded by the token window for long sequences).
        ``head_fraction``: share of the tokens the MLM head runs on (training: the labelled ~15%), and so
        the last layer's output projection and MLP (the fused path runs only those rows there)."""
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
