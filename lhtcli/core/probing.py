"""Exact attention diagnostics computed on demand (DESIGN.md section 5, PERF.md).

The training forward never materialises attention weights. These probes recompute what a
diagnostic needs from a layer's (rotated) queries and keys, exactly and in float64:

* :func:`mlswa_attention_probs` — the masked softmax probabilities of chosen query rows,
  ``p_qk = exp(scale * q.k - lse_q)`` on allowed keys, zero elsewhere ([B, R, H, N]);
* :func:`mlswa_attention_entropy` — the entropy of every row with memory linear in N:
  ``H(q) = lse(q) - scale * q . (sum_k p_qk k)``, i.e. one extra attention pass with the keys as
  values (float32 would cancel digits when H is near 0, hence float64);
* :func:`mlswa_level_mass` — the share of each row's probability that arrives through the pairs each
  level adds (``exp(level_lse - lse)``; the ``[DOC]`` links count in the top level).

All take ``q, k: [B, N, H, D]`` (the layout of every public attention function, see
:mod:`lhtcli.core.attention`) and batched or single :class:`~lhtcli.core.positions.HierarchicalPositions`;
per-row results keep the token axis before the head axis (``[B, N, H]``, ``[B, N, H, L]``). Padding
rows give probability 0, entropy 0, key count 0 and level mass 0 (never NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lhtcli.core.attention import (
    MLSWAPlan,
    build_mlswa_plan,
    compact_attention,
    flash_available,
    flash_compact_result,
)
from lhtcli.core.mask import mlswa_dense_mask, resolve_max_level
from lhtcli.core.positions import HierarchicalPositions

MAX_PROB_ELEMENTS = 64 * 1024 * 1024  # B * H * R * N above this is refused (512 MiB in float64)


@dataclass
class AttentionRowStats:
    """Per-row attention statistics of one layer, all float64 except ``key_counts``."""

    entropy: torch.Tensor  # [B, N, H] nats; 0 on padding
    key_counts: torch.Tensor  # [B, N] int64: allowed keys per query; 0 on padding
    level_mass: torch.Tensor  # [B, N, H, L] share per level (L = number of windows); 0 on padding
    lse: torch.Tensor | None = None  # [B, N, H] log-sum-exp of the scaled scores; -inf on padding
    level_key_counts: torch.Tensor | None = None  # [B, N, L] int64: keys each level adds per query

    @property
    def normalized_entropy(self) -> torch.Tensor:
        """entropy / log(#allowed keys), [B, N, H]; NaN where a row has fewer than 2 allowed keys."""
        counts = self.key_counts[:, :, None].to(self.entropy.dtype)
        valid = counts >= 2
        denom = torch.where(valid, torch.log(counts.clamp(min=2)), torch.ones_like(counts))
        return torch.where(valid, self.entropy / denom, torch.full_like(self.entropy, float("nan")))


def _check_qk(q: torch.Tensor, k: torch.Tensor, positions: HierarchicalPositions) -> HierarchicalPositions:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            "q and k must be [B, N, H, D] tensors of one shape, "
            f"got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    positions = positions.batched()
    if positions.batch_size != q.shape[0] or positions.seq_len != q.shape[1]:
        raise ValueError(
            f"positions are [B={positions.batch_size}, N={positions.seq_len}] but q is "
            f"[B={q.shape[0]}, N={q.shape[1]}]"
        )
    return positions.to(q.device)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _result_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def mlswa_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None = None,
    rows: torch.Tensor | Sequence[int] | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact ML-SWA attention probabilities [B, R, H, N] of the query ``rows`` (all rows when None).

    Zero outside the mask; every real row sums to 1; padding rows are all zero. Computed in float64
    and returned in float64 for float64 inputs, float32 otherwise. Refuses (ValueError) when
    B * H * R * N exceeds ``MAX_PROB_ELEMENTS``: pick fewer rows.
    """
    positions = _check_qk(q, k, positions)
    windows = [int(w) for w in window_size_per_level]
    max_level = resolve_max_level(windows, max_level)
    batch, n, heads, _ = q.shape
    if rows is None:
        row_index = torch.arange(n, device=q.device)
    else:
        row_index = torch.as_tensor(rows, dtype=torch.long, device=q.device).reshape(-1)
        if row_index.numel() and (int(row_index.min()) < 0 or int(row_index.max()) >= n):
            raise ValueError(f"rows must be query indices in [0, {n}), got {row_index.tolist()[:8]}...")
    elements = batch * heads * row_index.numel() * n
    if elements > MAX_PROB_ELEMENTS:
        raise ValueError(
            f"attention probabilities for B={batch}, H={heads}, R={row_index.numel()}, N={n} would need "
            f"{elements:,} values (limit {MAX_PROB_ELEMENTS:,}); select fewer query rows (rows=...), "
            "or use mlswa_attention_entropy for statistics of every row"
        )
    mask = mlswa_dense_mask(positions, windows, max_level, rows=row_index)  # [B, R, N]
    q64 = q[:, row_index].to(torch.float64).transpose(1, 2)  # [B, H, R, D]
    k64 = k.to(torch.float64).transpose(1, 2)
    scores = torch.matmul(q64, k64.transpose(-1, -2)) * _scale(q, scale)  # [B, H, R, N]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    empty = ~torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(lse), lse))
    probs = torch.where(mask[:, None], probs, torch.zeros_like(probs))
    return probs.transpose(1, 2).to(_result_dtype(q))


def _count(lse: torch.Tensor) -> torch.Tensor:
    return torch.round(torch.where(torch.isfinite(lse), torch.exp(lse), torch.zeros_like(lse))).to(torch.long)


def _allowed_key_counts(
    positions: HierarchicalPositions, plan: MLSWAPlan, num_levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allowed keys per query [B, N] and the keys each level adds [B, N, L], from the log-sum-exps of
    all-zero scores (= logs of the counts).

    They depend on the plan alone, so layers sharing a plan share one computation (cached on it)."""
    if "key_counts" not in plan.cache:
        batch, n = positions.batch_size, positions.seq_len
        zeros = torch.zeros(batch, 1, n, 1, dtype=torch.float64, device=positions.device)
        result = compact_attention(zeros, zeros, zeros, plan, scale=1.0, collect_levels=True)
        per_level = torch.zeros(batch, n, num_levels, dtype=torch.long, device=positions.device)
        for level, level_lse in enumerate(result.level_lse or []):
            per_level[..., level] = _count(level_lse[:, 0])
        plan.cache["key_counts"] = (_count(result.lse[:, 0]), per_level)
    return plan.cache["key_counts"]


def mlswa_row_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None = None,
    *,
    scale: float | None = None,
    plan: MLSWAPlan | None = None,
) -> AttentionRowStats:
    """Entropy, allowed key counts (in all and per level), per-level mass and log-sum-exp of every query
    row in one linear-memory pass.

    ``plan`` (from :func:`build_mlswa_plan` for the same positions, windows and ``max_level``) may be
    passed to share it across layers.
    """
    positions = _check_qk(q, k, positions)
    windows = [int(w) for w in window_size_per_level]
    max_level = resolve_max_level(windows, max_level)
    if plan is None:
        plan = build_mlswa_plan(positions, windows, max_level)
    elif plan.max_level != max_level or plan.seq_len != q.shape[1] or plan.batch_size != q.shape[0]:
        raise ValueError("the plan was built for other positions or another max_level")
    # the kernels are head-major; results go back to the public token-major layout
    q64, k64 = q.to(torch.float64).transpose(1, 2), k.to(torch.float64).transpose(1, 2)
    scale = _scale(q, scale)
    if flash_available(q64) and plan.levels[0].is_prefix:  # the fused kernel: no score tensor at all
        result = flash_compact_result(q64, k64, k64, plan, scale=scale, collect_levels=True)
    else:
        result = compact_attention(q64, k64, k64, plan, scale=scale, collect_levels=True)
    real = torch.isfinite(result.lse)  # [B, H, N]
    lse = torch.where(real, result.lse, torch.zeros_like(result.lse))
    expected_score = scale * (q64 * result.out).sum(-1)
    entropy = torch.where(real, (lse - expected_score).clamp(min=0.0), torch.zeros_like(lse))

    batch, n, heads, _ = q.shape
    level_mass = torch.zeros(batch, heads, n, len(windows), dtype=torch.float64, device=q.device)
    assert result.level_lse is not None
    for level, level_lse in enumerate(result.level_lse):
        share = torch.exp(level_lse - lse)
        level_mass[..., level] = torch.where(real & torch.isfinite(level_lse), share, torch.zeros_like(share))
    counts, level_counts = _allowed_key_counts(positions, plan, len(windows))
    return AttentionRowStats(
        entropy.transpose(1, 2), counts, level_mass.transpose(1, 2), result.lse.transpose(1, 2), level_counts
    )


def mlswa_attention_entropy(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None = None,
    *,
    scale: float | None = None,
    plan: MLSWAPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy in nats [B, N, H] float64, allowed key counts [B, N] int64) for every query row.

    Memory is linear in N (no N x N tensor). Padding rows have entropy 0 and count 0.
    """
    stats = mlswa_row_stats(q, k, positions, window_size_per_level, max_level, scale=scale, plan=plan)
    return stats.entropy, stats.key_counts


def mlswa_level_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None = None,
    *,
    scale: float | None = None,
    plan: MLSWAPlan | None = None,
) -> torch.Tensor:
    """[B, N, H, L] float64: share of each row's attention through the pairs level l adds.

    L is the number of windows; level 0 are the token-window pairs, level l > 0 the pairs only level
    l (and no lower level) allows; the ``[DOC]`` links count in the top level. Inactive levels (above
    ``max_level``) are 0. Real rows sum to 1 over L; padding rows are 0.
    """
    stats = mlswa_row_stats(q, k, positions, window_size_per_level, max_level, scale=scale, plan=plan)
    return stats.level_mass


__all__ = [
    "MAX_PROB_ELEMENTS",
    "AttentionRowStats",
    "mlswa_attention_entropy",
    "mlswa_attention_probs",
    "mlswa_level_mass",
    "mlswa_row_stats",
]
