"""Dense ML-SWA: one masked SDPA call with the [B, N, N] mask built once per batch (quadratic;
the fastest for short sequences) and the plain masked-softmax reference."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lhtcli.core.compact import (
    _masked_softmax_parts,
)
from lhtcli.core.mask import doc_rule_active, level_enums, resolve_max_level
from lhtcli.core.plan import (
    NEG_INF,
)
from lhtcli.core.positions import HierarchicalPositions


# ----------------------------------------------------------------------------------------------
# dense
# ----------------------------------------------------------------------------------------------
def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference masked softmax on [B, H, N, D] with a bool mask [B, N, N]: (out, lse); empty rows give 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    probs, lse = _masked_softmax_parts(scores, mask[:, None])
    return torch.matmul(probs, v), lse


class DenseMask:
    """The dense [B, N, N] mask of one batch and ``max_level``, with its SDPA forms cached per dtype."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        has_key = mask.any(-1)  # [B, N]
        self.empty_rows = None if bool(has_key.all()) else ~has_key[:, None, :, None]
        self._additive: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def from_positions(
        cls,
        positions: HierarchicalPositions,
        window_size_per_level: Sequence[int],
        max_level: int | None = None,
        block_rows: int = 512,
    ) -> DenseMask:
        """Build the mask in row blocks with int32 arithmetic (no [B, N, N] int64 temporaries)."""
        windows = [int(w) for w in window_size_per_level]
        max_level = resolve_max_level(windows, max_level)
        all_enums = level_enums(positions, windows)
        enums = all_enums[: max_level + 1].to(torch.int32)
        _, batch, n = enums.shape
        mask = torch.empty(batch, n, n, dtype=torch.bool, device=enums.device)
        nonzero = enums != 0
        for start in range(0, n, block_rows):
            stop = min(n, start + block_rows)
            block = None
            for level in range(max_level + 1):
                diff = (enums[level][:, start:stop, None] - enums[level][:, None, :]).abs_()
                ok = (diff <= windows[level]).logical_and_(nonzero[level][:, start:stop, None])
                ok.logical_and_(nonzero[level][:, None, :])
                block = ok if block is None else block.logical_or_(ok)
            mask[:, start:stop] = block
        if doc_rule_active(positions, windows, max_level):
            top = (all_enums[-1] != 0) & (all_enums[0][:, :1] != 0)  # top-level tokens of rows with a [DOC]
            mask[:, 0, :] |= top
            mask[:, :, 0] |= top
        return cls(mask)

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, N, N] float mask; rows without any key are opened (their output is zeroed later)."""
        if dtype not in self._additive:
            opened = self.mask if self.empty_rows is None else self.mask | self.empty_rows[:, 0]
            zero = torch.zeros((), dtype=dtype, device=opened.device)
            self._additive[dtype] = torch.where(opened, zero, torch.full_like(zero, NEG_INF))[:, None]
        return self._additive[dtype]


def dense_sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: DenseMask | torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One fused SDPA call with the dense mask; padding rows give exactly 0 (and no NaN gradient)."""
    if not isinstance(mask, DenseMask):
        mask = DenseMask(mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive(q.dtype), scale=scale)
    if mask.empty_rows is not None:
        out = out.masked_fill(mask.empty_rows, 0.0)
    return out


