"""Exact ML-SWA attention probabilities of every allowed pair, block by block, in linear memory.

A diagnostic that needs more than a row statistic (a pooled sentence x sentence map, the mass on
the first tokens, the largest attention logit) needs the probability of each allowed pair. They are
``p_qk = exp(scale * q.k - lse_q)`` (PERF.md, "exact weights for chosen rows"), with the exact
row log-sum-exps of the linear kernels, and every allowed pair falls in exactly one of two kinds of
block (DESIGN.md section 3):

* **token-window blocks**: a chunk of query rows and the band of keys within the level-0 window of
  the chunk; they own the pairs whose lowest allowing level is 0;
* **boundary blocks**: a chunk of the *participants* (tokens with a sentence or section ordinal in
  an active level, and ``[DOC]``) against all participants; they own the pairs that only a level
  >= 1 or the ``[DOC]`` rule allows (those link participants only).

Which pairs are allowed, and by which level, comes from :func:`lhtcli.core.mask.pair_level_map`, the
definition the dense reference uses. Blocks are ``[B, R, H, K]`` with R rows of at most
``block_rows`` and K about ``block_rows + 2 * window`` (token blocks) or the participant count
(boundary blocks): memory is linear in N, and no N x N tensor exists. Tensors are token-major
``[B, N, H, D]`` like every public attention function (see :mod:`lhtcli.core.attention`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lhtcli.core.mask import MASKED, doc_rule_active, level_enums, pair_level_map, resolve_max_level
from lhtcli.core.positions import HierarchicalPositions

BLOCK_ROWS = 512


@dataclass
class PairBlock:
    """The allowed pairs one block owns; everything else in it is excluded (-inf score, 0 probability)."""

    rows: torch.Tensor  # [R] query indices
    keys: torch.Tensor  # [K] key indices
    codes: torch.Tensor  # [B, R, K] int8 pair-level codes of the owned pairs, MASKED elsewhere
    scores: torch.Tensor  # [B, R, H, K] float64 scaled logits, -inf where not owned
    probs: torch.Tensor  # [B, R, H, K] float64 exact probabilities, 0 where not owned


def _check(q: torch.Tensor, k: torch.Tensor, positions: HierarchicalPositions) -> HierarchicalPositions:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [B, N, H, D] tensors of one shape, got {tuple(q.shape)}, {tuple(k.shape)}")
    positions = positions.batched().to(q.device)
    if positions.batch_size != q.shape[0] or positions.seq_len != q.shape[1]:
        raise ValueError(f"positions are [B={positions.batch_size}, N={positions.seq_len}], q is {tuple(q.shape)}")
    enum0 = positions.level_enums[0]
    index = torch.arange(1, enum0.shape[1] + 1, device=enum0.device).expand_as(enum0)
    if not bool(((enum0 == 0) | (enum0 == index)).all()):
        # the band of a chunk is an index range only when token ordinals are index + 1
        raise ValueError("level-0 enumerations must be index + 1 for real tokens (padding at the end)")
    return positions


def participants(positions: HierarchicalPositions, windows: Sequence[int], max_level: int) -> torch.Tensor:
    """Indices (ascending) of the tokens that take part in a level >= 1 or the [DOC] rule in any row."""
    enums = level_enums(positions, windows)
    n = enums.shape[-1]
    mask = torch.zeros(n, dtype=torch.bool, device=enums.device)
    for level in range(1, max_level + 1):
        mask |= (enums[level] != 0).any(0)
    if doc_rule_active(positions, windows, max_level) and n:
        mask[0] = True
    return torch.nonzero(mask).flatten()


def iter_pair_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None = None,
    *,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
    row_range: tuple[int, int] | None = None,
    block_rows: int = BLOCK_ROWS,
) -> Iterator[PairBlock]:
    """Every allowed pair of the query rows in ``row_range`` (all rows when None), exactly once.

    ``lse`` [B, N, H] is the rows' log-sum-exp (from :func:`lhtcli.core.probing.mlswa_row_stats`);
    computed here when None. Probabilities are float64.
    """
    positions = _check(q, k, positions)
    windows = [int(w) for w in window_size_per_level]
    max_level = resolve_max_level(windows, max_level)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if lse is None:
        from lhtcli.core.probing import mlswa_row_stats

        lse = mlswa_row_stats(q, k, positions, windows, max_level, scale=scale).lse
    assert lse is not None
    n = q.shape[1]
    first, stop = (0, n) if row_range is None else (max(0, row_range[0]), min(n, row_range[1]))
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(torch.float64)
    q64, k64 = q.to(torch.float64), k.to(torch.float64)
    w0 = windows[0]

    real = positions.real_mask

    def band_codes(rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        # level 0 alone: token ordinals are index + 1, so the rule is |q - k| <= w0 between real tokens
        near = (rows[:, None] - keys[None, :]).abs() <= w0
        ok = near[None] & real[:, rows, None] & real[:, None, keys]
        return torch.where(ok, 0, MASKED).to(torch.int8)

    def boundary_codes(rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        codes = pair_level_map(positions, windows, max_level, rows, keys)
        return torch.where(codes > 0, codes, torch.full_like(codes, MASKED))

    def block(rows: torch.Tensor, keys: torch.Tensor, codes_of) -> PairBlock:
        codes = codes_of(rows, keys)
        owned = (codes != MASKED)[:, :, None, :]  # [B, R, 1, K]
        scores = torch.einsum("brhd,bkhd->brhk", q64[:, rows], k64[:, keys]) * scale
        scores = scores.masked_fill(~owned, float("-inf"))
        probs = torch.exp(scores - safe_lse[:, rows, :, None])
        probs = torch.where(owned, probs, torch.zeros_like(probs))
        return PairBlock(rows, keys, codes, scores, probs)

    for a in range(first, stop, block_rows):
        b = min(stop, a + block_rows)
        rows = torch.arange(a, b, device=q.device)
        keys = torch.arange(max(0, a - w0), min(n, b + w0), device=q.device)
        yield block(rows, keys, band_codes)

    if max_level == 0 and not doc_rule_active(positions, windows, max_level):
        return
    part = participants(positions, windows, max_level)
    chosen = part[(part >= first) & (part < stop)]
    for a in range(0, chosen.numel(), block_rows):
        yield block(chosen[a : a + block_rows], part, boundary_codes)


@dataclass
class PairStats:
    """Per-row statistics that need individual pair probabilities (float64 unless said)."""

    sink_mass: torch.Tensor  # [B, N, H]: probability on the first ``sink_tokens`` keys
    sink_visible: torch.Tensor  # [B, N] bool: the row may attend at least one of those keys
    max_logit: torch.Tensor  # [B, N, H]: largest scaled score over allowed keys; -inf on padding
    sink_tokens: int


def mlswa_pair_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None = None,
    *,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
    sink_tokens: int = 4,
) -> PairStats:
    """Attention-sink mass (keys ``0 .. sink_tokens-1``: ``[DOC]``/[CLS] and the first tokens) and the
    largest attention logit of every row, exactly, in linear memory."""
    batch, n, heads, _ = q.shape
    sink = torch.zeros(batch, n, heads, dtype=torch.float64, device=q.device)
    visible = torch.zeros(batch, n, dtype=torch.bool, device=q.device)
    top = torch.full((batch, n, heads), float("-inf"), dtype=torch.float64, device=q.device)
    for blk in iter_pair_blocks(q, k, positions, window_size_per_level, max_level, lse=lse, scale=scale):
        is_sink = blk.keys < sink_tokens
        if bool(is_sink.any()):
            sink[:, blk.rows] += blk.probs[..., is_sink].sum(-1)
            visible[:, blk.rows] |= (blk.codes[..., is_sink] != MASKED).any(-1)
        top[:, blk.rows] = torch.maximum(top[:, blk.rows], blk.scores.amax(-1))
    return PairStats(sink, visible, top, sink_tokens)


def _onehot(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct ids >= 0, one-hot [len(ids), #distinct] float64) of a 1-D id tensor; -1 rows stay zero."""
    values, inverse = torch.unique(ids, return_inverse=True)
    onehot = torch.zeros(ids.numel(), values.numel(), dtype=torch.float64, device=ids.device)
    onehot[torch.arange(ids.numel(), device=ids.device), inverse] = 1.0
    keep = values >= 0
    return values[keep], onehot[:, keep]


def pooled_attention_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None,
    unit_sets: Sequence[tuple[torch.Tensor, int]],
    *,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
    row_range: tuple[int, int] | None = None,
) -> list[torch.Tensor]:
    """:func:`pooled_attention` for several unit sets (e.g. sentences and sections) in one pass over the
    pairs. Within a block the few units it touches are pooled with two small matrix products."""
    heads = q.shape[2]
    sums = [torch.zeros(heads, count * count, dtype=torch.float64, device=q.device) for _, count in unit_sets]
    unit_sets = [(units.to(q.device), count) for units, count in unit_sets]
    for blk in iter_pair_blocks(
        q, k, positions, window_size_per_level, max_level, lse=lse, scale=scale, row_range=row_range
    ):
        r, kk = blk.rows.numel(), blk.keys.numel()
        for (units, count), total in zip(unit_sets, sums, strict=True):
            for b in range(units.shape[0]):
                uq, oq = _onehot(units[b, blk.rows])
                uk, ok = _onehot(units[b, blk.keys])
                if not uq.numel() or not uk.numel():
                    continue
                rows_pooled = oq.T @ blk.probs[b].reshape(r, heads * kk)  # [uq, H * K]
                local = rows_pooled.reshape(-1, heads, kk).transpose(0, 1) @ ok  # [H, uq, uk]
                flat = (uq[:, None] * count + uk[None, :]).reshape(-1)
                total.index_add_(1, flat, local.reshape(heads, -1))
    return [total.reshape(heads, count, count) for total, (_, count) in zip(sums, unit_sets, strict=True)]


def pooled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None,
    units: torch.Tensor,
    num_units: int,
    *,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
    row_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """[H, U, U] float64: summed probability from the query rows of unit i to the keys of unit j.

    ``units`` [B, N] int64 names each token's unit (0 .. U-1; -1 leaves the token out as query and as
    key). Divide row i by the number of its query tokens for the mean attention of a token of unit i.
    """
    return pooled_attention_maps(
        q, k, positions, window_size_per_level, max_level, [(units, num_units)], lse=lse, scale=scale,
        row_range=row_range,
    )[0]


__all__ = [
    "BLOCK_ROWS",
    "PairBlock",
    "PairStats",
    "iter_pair_blocks",
    "mlswa_pair_stats",
    "participants",
    "pooled_attention",
    "pooled_attention_maps",
]
