"""FlexAttention over "extended keys" (CUDA): one copy of each boundary token's key appended after
the sequence, so hierarchical links land in a few extra key blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lhtcli.core.mask import doc_rule_active, level_enums, resolve_max_level
from lhtcli.core.plan import (
    _compact_order,
)
from lhtcli.core.positions import HierarchicalPositions

# ----------------------------------------------------------------------------------------------
# flex (CUDA): extended keys
# ----------------------------------------------------------------------------------------------
FLEX_KEY_ALIGN = 128  # appended keys are padded to this times a power of two (few compiled shapes)
_COMPILED_FLEX: Any = None


@dataclass
class FlexPlan:
    seq_len: int
    batch_size: int
    max_level: int
    extended_index: torch.Tensor  # [B, X]: the position behind each appended key (0 on unused slots)
    block_mask: Any  # torch.nn.attention.flex_attention.BlockMask over N queries x (N + X) keys
    real: torch.Tensor  # [B, N]
    mask_mod: Any = field(repr=False, default=None)


def flex_mask_mod(
    positions: HierarchicalPositions, windows: Sequence[int], max_level: int, extended_index, valid
):
    """FlexAttention ``mask_mod`` of ML-SWA over extended keys.

    Key ``kv < N`` is allowed exactly when level 0 allows it; appended key ``N + j`` (a copy of the
    token at ``extended_index[b, j]``) is allowed when a level >= 1 or the [DOC] rule allows that
    token and level 0 does not, so that every allowed pair is counted once.
    """
    enums = level_enums(positions, windows)[: max_level + 1].contiguous()  # [l+1, B, N]
    n = enums.shape[2]
    wins = [int(w) for w in windows[: max_level + 1]]
    doc = doc_rule_active(positions, windows, max_level)
    top = level_enums(positions, windows)[len(windows) - 1].contiguous()
    doc_real = enums[0][:, 0] != 0

    def allowed(level, b, q_idx, key):
        eq, ek = enums[level][b, q_idx], enums[level][b, key]
        return (eq != 0) & (ek != 0) & ((eq - ek).abs() <= wins[level])

    def mask_mod(b, h, q_idx, kv_idx):
        appended = kv_idx >= n
        slot = (kv_idx - n).clamp(min=0)
        key = torch.where(appended, extended_index[b, slot], kv_idx)
        level0 = allowed(0, b, q_idx, key)
        higher = torch.zeros_like(level0)
        for level in range(1, max_level + 1):
            higher = higher | allowed(level, b, q_idx, key)
        if doc:
            link = ((q_idx == 0) & (top[b, key] != 0)) | ((key == 0) & (top[b, q_idx] != 0))
            higher = higher | (link & doc_real[b])
        return torch.where(appended, higher & ~level0 & valid[b, slot], level0)

    return mask_mod


def build_flex_plan(
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None = None,
    compile_mask: bool | None = None,
) -> FlexPlan:
    """Extended keys and a BlockMask for one batch (shared by all layers and heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    positions = positions.batched()
    windows = [int(w) for w in window_size_per_level]
    max_level = resolve_max_level(windows, max_level)
    enums = level_enums(positions, windows)
    _, batch, n = enums.shape
    part = (
        (enums[1 : max_level + 1] != 0).any(0)
        if max_level >= 1
        else torch.zeros_like(enums[0], dtype=torch.bool)
    )
    if doc_rule_active(positions, windows, max_level):
        part[:, 0] |= enums[0][:, 0] != 0
    order, valid, _ = _compact_order(part, n)
    if max_level == 0:
        valid = torch.zeros_like(valid)
    width = FLEX_KEY_ALIGN
    while width < order.shape[1]:  # powers of two: few distinct shapes for the compiled kernel
        width *= 2
    extended = F.pad(torch.where(valid, order, 0), (0, width - order.shape[1]))
    valid = F.pad(valid, (0, width - valid.shape[1]))
    mask_mod = flex_mask_mod(positions, windows, max_level, extended, valid)
    device = enums.device
    compile_mask = device.type == "cuda" if compile_mask is None else compile_mask
    block_mask = create_block_mask(mask_mod, batch, None, n, n + width, device=device, _compile=compile_mask)
    return FlexPlan(n, batch, max_level, extended, block_mask, enums[0] != 0, mask_mod)


def flex_compact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: FlexPlan,
    scale: float | None = None,
    compiled=None,
) -> torch.Tensor:
    """Exact ML-SWA with FlexAttention over extended keys (compiled once per process on CUDA)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if compiled is None:
        compiled = q.device.type == "cuda"
    fn = flex_attention
    if compiled:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        fn = _COMPILED_FLEX
    index = plan.extended_index[:, None, :, None].expand(q.shape[0], k.shape[1], -1, k.shape[3])
    k_ext = torch.cat([k, torch.gather(k, 2, index)], 2)
    v_ext = torch.cat([v, torch.gather(v, 2, index)], 2)
    out = fn(q, k_ext, v_ext, block_mask=plan.block_mask, scale=scale)
    return out.masked_fill(~plan.real[:, None, :, None], 0.0)


