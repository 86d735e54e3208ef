"""The encoder's forward pass through the fused pieces: :class:`~lhtcli.model.LHTEncoder`'s parameters, the
reference's results (to float32 rounding; the same dropout rate, other masks), fewer passes over memory.

Two changes of plumbing against the reference besides the fused ops:

- Each LayerNorm is computed together with the residual add before it, so a block takes and returns
  the pair (x, the next LayerNorm of x): the next block's ``norm1``, or the final norm after the last.
- Training (labels given, ``return_logits=False``): nothing but the MLM head reads the last layer's
  output, and the head reads only the labelled ~15% of the rows; so after the last attention (every token
  still a key and value) only those rows go on through its output projection, residual and MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from lhtcli.core.attention import MLSWAContext
from lhtcli.core.positions import HierarchicalPositions
from lhtcli.fused.dropout import dropout
from lhtcli.fused.gelu import linear_gelu
from lhtcli.fused.loss import head_logits, logits_and_loss
from lhtcli.fused.qkv import attention_inputs
from lhtcli.fused.residual import residual_branch
from lhtcli.model import MLP, Block, LayerCapture, LHTEncoder, LHTOutput, MLSWASelfAttention, mlm_loss


def forward(
    model: LHTEncoder,
    input_ids: torch.Tensor,
    positions: HierarchicalPositions,
    labels: torch.Tensor | None,
    capture: bool,
    context: MLSWAContext | None,
    return_logits: bool,
) -> LHTOutput:
    """:meth:`LHTEncoder.forward`, fused (the same arguments and outputs)."""
    positions, context = model.prepare(input_ids, positions, context)
    x, rotary = model.embed(input_ids, positions)
    rotation = None if rotary is None else rotary[:, 0]  # [B, N, D/2]: the fused q/k/v pass is token-major
    x = dropout(x, model.embedding_dropout.p, model.embedding_dropout.training)
    captures: list[LayerCapture] | None = [] if capture else None
    blocks = model.blocks
    normed = blocks[0].norm1(x)
    for block, next_block in zip(blocks[:-1], blocks[1:], strict=True):
        x, normed = block_forward(block, x, normed, context, rotation, captures, next_block.norm1)
    if labels is None or return_logits:
        _, hidden = block_forward(blocks[-1], x, normed, context, rotation, captures, model.final_norm)
        hidden = hidden * positions.real_mask[..., None]  # padding carries no signal downstream
        logits = head_logits(model.mlm_head, hidden)
        loss = None if labels is None else mlm_loss(logits, labels)
        return LHTOutput(hidden, logits, loss, captures or [])
    rows = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    _, hidden = block_forward(blocks[-1], x, normed, context, rotation, captures, model.final_norm, rows=rows)
    hidden = hidden * positions.real_mask.reshape(-1, 1).index_select(0, rows)
    logits, loss = logits_and_loss(model.mlm_head, hidden, labels.reshape(-1).index_select(0, rows))
    return LHTOutput(hidden, logits, loss, captures or [])


def block_forward(
    block: Block,
    x: torch.Tensor,
    normed: torch.Tensor,
    context: MLSWAContext,
    rotation: torch.Tensor | None,
    captures: list[LayerCapture] | None,
    next_norm: nn.LayerNorm,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, N, d_model] and ``normed`` = norm1(x) -> (the block's output, ``next_norm`` of it). With ``rows``
    (flat token indices) the outputs are just those rows, [len(rows), d_model]."""
    residual = x if rows is None else x.reshape(-1, x.shape[-1]).index_select(0, rows)
    x, normed = attention_forward(block.attn, normed, context, rotation, captures, residual, rows, block.norm2)
    return mlp_forward(block.mlp, normed, x, next_norm)


def attention_forward(
    attn: MLSWASelfAttention,
    x: torch.Tensor,
    context: MLSWAContext,
    rotation: torch.Tensor | None,
    captures: list[LayerCapture] | None,
    residual: torch.Tensor,
    rows: torch.Tensor | None,
    norm: nn.LayerNorm,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + the attention sublayer's output, ``norm`` of that); with ``rows`` only those rows go on
    through the output projection, ``residual`` already gathered to them."""
    batch, n, d_model = x.shape
    q, k, v = attention_inputs(x, attn.qkv, attn.n_heads, rotation)
    if captures is not None:
        captures.append(LayerCapture.of(attn, q, k))
    out = context.attend(q, k, v, attn.max_level)
    out = out.transpose(1, 2).reshape(batch, n, d_model)
    if rows is not None:
        out = out.reshape(batch * n, d_model).index_select(0, rows)
    return residual_branch(residual, out, attn.proj, attn.dropout, norm)


def mlp_forward(mlp: MLP, x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm):
    """(residual + the MLP's output, ``norm`` of that)."""
    return residual_branch(residual, linear_gelu(x, mlp.fc), mlp.proj, mlp.dropout, norm)
