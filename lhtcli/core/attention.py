"""Exact ML-SWA attention with memory and time linear in the sequence length.

The "compacted levels" algorithm (PERF.md): every active level ``l`` runs as a banded attention over
the compacted sequence of its participants (all real tokens, sentence starts, section starts),
excluding pairs a lower level already allows so that every allowed pair is counted exactly once.
The ``[DOC]`` rule adds two tiny partials (its row over the top level, and its column for the top
level's queries). The partial softmaxes are merged exactly through their log-sum-exps.

The plan (indices and band masks) depends only on the document structure: build it once per batch
and share it across layers and heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lhtcli.core.mask import doc_rule_active, level_enums, mlswa_dense_mask, resolve_max_level
from lhtcli.core.positions import HierarchicalPositions

NEG_INF = float("-inf")
MAX_CHUNK = 128
MIN_CHUNK = 16
DENSE_AUTO_MAX_LEN = 1024  # below this, one dense masked softmax beats the banded kernels (PERF.md)


@dataclass
class LevelPlan:
    """Banded attention over one level's participants, in compacted order."""

    level: int
    window: int
    chunk: int
    halo: int
    num_participants: int  # M: the largest participant count over the batch
    index: torch.Tensor  # [B, M] positions of participants; N marks an empty slot
    is_prefix: bool  # participants are positions 0..count-1 in every row: slice instead of gather
    band_mask: torch.Tensor  # [B, 1, nc, C, C + 2 * halo]


@dataclass
class MLSWAPlan:
    seq_len: int
    batch_size: int
    max_level: int
    levels: list[LevelPlan]
    # [DOC] links with the top level's participants not already allowed by a level: [B, 1, Mt]
    doc_link_mask: torch.Tensor | None = None


def _chunk_size(window: int, count: int) -> int:
    chunk = MIN_CHUNK
    while chunk < window and chunk < MAX_CHUNK:
        chunk *= 2
    return max(1, min(chunk, count))


def _chunk_queries(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """[..., M, *rest] -> [..., nc, C, *rest] along dim -2 (zero padded)."""
    m = x.shape[-2]
    nc = -(-m // chunk)
    x = F.pad(x, (0, 0, 0, nc * chunk - m))
    return x.reshape(*x.shape[:-2], nc, chunk, x.shape[-1])


def _key_windows(x: torch.Tensor, chunk: int, halo: int) -> torch.Tensor:
    """[..., M, D] -> overlapping key windows [..., nc, C + 2*halo, D] (zero padded, a strided view)."""
    m = x.shape[-2]
    nc = -(-m // chunk)
    x = F.pad(x, (0, 0, halo, nc * chunk - m + halo))
    return x.unfold(-2, chunk + 2 * halo, chunk).transpose(-1, -2)


def _allowed(eq: torch.Tensor, ek: torch.Tensor, window: int) -> torch.Tensor:
    return (eq != 0) & (ek != 0) & ((eq - ek).abs() <= window)


def build_mlswa_plan(
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None = None,
) -> MLSWAPlan:
    """Precompute participants and band masks for every active level (shared by layers and heads)."""
    windows = [int(w) for w in window_size_per_level]
    max_level = resolve_max_level(windows, max_level)
    enums = level_enums(positions, windows)  # [L, B, N]
    _, batch, n = enums.shape
    device = enums.device
    levels: list[LevelPlan] = []
    for level in range(max_level + 1):
        part = enums[level] != 0
        counts = part.sum(1)
        m = max(int(counts.max()), 1)
        order = torch.sort((~part).to(torch.int8), dim=1, stable=True).indices[:, :m]
        valid = torch.arange(m, device=device)[None, :] < counts[:, None]
        index = torch.where(valid, order, torch.full_like(order, n))
        is_prefix = bool(((order == torch.arange(m, device=device)[None, :]) | ~valid).all())
        gathered = torch.gather(enums[: level + 1], 2, order[None].expand(level + 1, batch, m))
        ev = torch.where(valid[None], gathered, 0)  # [l+1, B, M]
        increasing = (ev[level, :, 1:] > ev[level, :, :-1]) | ~valid[:, 1:]
        if not bool(increasing.all()):
            raise ValueError(f"level {level} enumeration must increase along the sequence")
        window = windows[level]
        chunk = _chunk_size(window, m)
        halo = -(-window // chunk) * chunk
        eq = _chunk_queries(ev[..., None], chunk)  # [l+1, B, nc, C, 1]
        ek = _key_windows(ev[..., None], chunk, halo).transpose(-1, -2)  # [l+1, B, nc, 1, C+2h]
        band = _allowed(eq[level], ek[level], window)
        for lower in range(level):
            band &= ~_allowed(eq[lower], ek[lower], windows[lower])
        levels.append(LevelPlan(level, window, chunk, halo, m, index, is_prefix, band[:, None]))

    doc_link_mask = None
    if doc_rule_active(positions, windows, max_level):
        top = levels[-1]
        safe = top.index.clamp(max=n - 1)
        covered = torch.zeros_like(safe, dtype=torch.bool)
        for level in range(max_level + 1):
            e_doc = enums[level][:, :1]
            e_key = torch.gather(enums[level], 1, safe)
            covered |= _allowed(e_doc, e_key, windows[level])
        doc_real = enums[0][:, :1] != 0
        doc_link_mask = (doc_real & (top.index < n) & ~covered)[:, None, :]
    return MLSWAPlan(n, batch, max_level, levels, doc_link_mask)


def _masked_softmax_parts(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised probabilities and lse of a masked score block; rows with no key get lse -inf."""
    scores = scores.masked_fill(~mask, NEG_INF)
    peak = scores.amax(-1, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(scores - peak)
    total = weights.sum(-1, keepdim=True)
    nonempty = total > 0
    total_safe = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, torch.log(total_safe) + peak, torch.full_like(total, NEG_INF))
    return weights / total_safe, lse.squeeze(-1)


def _band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: LevelPlan, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Banded attention of compacted [B, H, M, D] tensors -> (out [B, H, M, D], lse [B, H, M])."""
    batch, heads, m, dim = q.shape
    qc = _chunk_queries(q, plan.chunk)  # [B, H, nc, C, D]
    kw = _key_windows(k, plan.chunk, plan.halo)  # [B, H, nc, K, D]
    vw = _key_windows(v, plan.chunk, plan.halo)
    scores = torch.matmul(qc, kw.transpose(-1, -2)) * scale
    probs, lse = _masked_softmax_parts(scores, plan.band_mask)
    out = torch.matmul(probs, vw)
    nc = qc.shape[2]
    out = out.reshape(batch, heads, nc * plan.chunk, dim)[:, :, :m]
    lse = lse.reshape(batch, heads, nc * plan.chunk)[:, :, :m]
    return out, lse


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) + exp(b)) whose gradient stays finite when both are -inf (torch.logaddexp gives NaN)."""
    peak = torch.maximum(a, b).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(a - peak) + torch.exp(b - peak)
    nonempty = total > 0
    return torch.where(nonempty, torch.log(torch.where(nonempty, total, torch.ones_like(total))) + peak, NEG_INF)


def _merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax partials over disjoint key sets exactly."""
    lse = _logaddexp(lse_a, lse_b)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(lse_a - lse_safe)[..., None]
    wb = torch.exp(lse_b - lse_safe)[..., None]
    return wa * out_a + wb * out_b, lse


@dataclass
class AttentionResult:
    out: torch.Tensor  # [B, H, N, D]
    lse: torch.Tensor  # [B, H, N]; -inf on padding
    level_lse: list[torch.Tensor] | None = None  # per level [B, H, N]: lse of the pairs that level adds


def compact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: MLSWAPlan,
    scale: float | None = None,
    collect_levels: bool = False,
) -> AttentionResult:
    """Exact ML-SWA on head-major tensors [B, H, N, D] using a prebuilt plan."""
    batch, heads, n, dim = q.shape
    if n != plan.seq_len or batch != plan.batch_size:
        raise ValueError(f"plan was built for B={plan.batch_size}, N={plan.seq_len}; got B={batch}, N={n}")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    # Slot N absorbs empty participant slots; its lse of 0 keeps every merge finite (no NaN gradients).
    out_total: torch.Tensor | None = None
    lse_total: torch.Tensor | None = None
    level_lse: list[torch.Tensor] = []
    doc_row: tuple[torch.Tensor, torch.Tensor] | None = None
    for lp in plan.levels:
        m = lp.num_participants
        if lp.is_prefix:
            ql, kl, vl = q[:, :, :m], k[:, :, :m], v[:, :, :m]
        else:
            gi = lp.index.clamp(max=n - 1)[:, None, :, None].expand(batch, heads, m, dim)
            ql, kl, vl = (torch.gather(t, 2, gi) for t in (q, k, v))
        out_l, lse_l = _band_attention(ql, kl, vl, lp, scale)
        if plan.doc_link_mask is not None and lp is plan.levels[-1]:
            out_l, lse_l = _doc_column(ql, k, v, out_l, lse_l, plan.doc_link_mask, scale)
            doc_row = _doc_row(q, kl, vl, plan.doc_link_mask, scale)
        if out_total is None:
            out_total, lse_total = _initial_totals(out_l, lse_l, lp, n)
        else:
            out_total, lse_total = _merge_into(out_total, lse_total, out_l, lse_l, lp)
        if collect_levels:
            level_lse.append(_scatter_rows(lse_l, lp, n, NEG_INF))
    assert out_total is not None and lse_total is not None
    out_total, lse_total = out_total[:, :, :n], lse_total[:, :, :n]
    if doc_row is not None:
        row_out, row_lse = doc_row
        out0, lse0 = _merge(out_total[:, :, :1], lse_total[:, :, :1], row_out, row_lse)
        out_total = torch.cat([out0, out_total[:, :, 1:]], dim=2)
        lse_total = torch.cat([lse0, lse_total[:, :, 1:]], dim=2)
        if collect_levels:
            top = level_lse[-1]
            level_lse[-1] = torch.cat([_logaddexp(top[:, :, :1], row_lse), top[:, :, 1:]], dim=2)
    return AttentionResult(out_total, lse_total, level_lse if collect_levels else None)


def _doc_column(q_top, k, v, out_top, lse_top, mask: torch.Tensor, scale: float):
    """Top-level queries may also see [DOC] (position 0): a one-key softmax partial merged in."""
    col_lse = ((q_top * k[:, :, :1]).sum(-1) * scale).masked_fill(~mask, NEG_INF)  # [B, H, Mt]
    col_out = v[:, :, :1].expand_as(out_top) * mask[..., None]
    return _merge(out_top, lse_top, col_out, col_lse)


def _doc_row(q, k_top, v_top, mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[DOC]'s own partial over every top-level participant: (out [B, H, 1, D], lse [B, H, 1])."""
    row_scores = torch.matmul(q[:, :, :1], k_top.transpose(-1, -2)) * scale  # [B, H, 1, Mt]
    row_probs, row_lse = _masked_softmax_parts(row_scores, mask[:, :, None, :])
    return torch.matmul(row_probs, v_top), row_lse


def _scatter_rows(values: torch.Tensor, lp: LevelPlan, n: int, fill: float) -> torch.Tensor:
    """Compacted per-row values [B, H, M] -> positions [B, H, N] (``fill`` elsewhere)."""
    batch, heads, m = values.shape
    full = values.new_full((batch, heads, n + 1), fill)
    full = full.scatter(2, lp.index[:, None, :].expand(batch, heads, m), values)
    return full[:, :, :n]


def _initial_totals(out_l, lse_l, lp: LevelPlan, n: int):
    batch, heads, m, dim = out_l.shape
    if lp.is_prefix:
        out_total = torch.cat([out_l, out_l.new_zeros(batch, heads, n + 1 - m, dim)], dim=2)
        lse_total = torch.cat([lse_l, lse_l.new_full((batch, heads, n + 1 - m), NEG_INF)], dim=2)
    else:
        ii = lp.index[:, None, :].expand(batch, heads, m)
        out_total = out_l.new_zeros(batch, heads, n + 1, dim).scatter(2, ii[..., None].expand(-1, -1, -1, dim), out_l)
        lse_total = lse_l.new_full((batch, heads, n + 1), NEG_INF).scatter(2, ii, lse_l)
    slot = torch.tensor([n], device=lse_total.device)
    return out_total, lse_total.index_fill(2, slot, 0.0)


def _merge_into(out_total, lse_total, out_l, lse_l, lp: LevelPlan):
    batch, heads, m, dim = out_l.shape
    ii = lp.index[:, None, :].expand(batch, heads, m)
    iid = ii[..., None].expand(batch, heads, m, dim)
    out_new, lse_new = _merge(torch.gather(out_total, 2, iid), torch.gather(lse_total, 2, ii), out_l, lse_l)
    return out_total.scatter(2, iid, out_new), lse_total.scatter(2, ii, lse_new)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference masked softmax on [B, H, N, D] with a bool mask [B, N, N]: (out, lse); empty rows give 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    probs, lse = _masked_softmax_parts(scores, mask[:, None])
    return torch.matmul(probs, v), lse


def choose_backend(seq_len: int, device: torch.device, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "dense" if seq_len <= DENSE_AUTO_MAX_LEN else "compact"


def mlswa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None = None,
    *,
    plan: MLSWAPlan | None = None,
    backend: str = "compact",
    scale: float | None = None,
) -> torch.Tensor:
    """Exact ML-SWA attention. q, k, v: [B, N, H, D] -> [B, N, H, D]; padding rows are zero.

    ``backend="compact"`` (default) is linear in N; ``"dense"`` materialises the [B, N, N] mask
    (faster for short sequences); ``"auto"`` picks by length.
    """
    if q.dim() != 4:
        raise ValueError(f"q, k, v must be [B, N, H, D], got q of shape {tuple(q.shape)}")
    positions = positions.batched()
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    chosen = choose_backend(q.shape[1], q.device, backend)
    if chosen == "dense":
        mask = mlswa_dense_mask(positions, window_size_per_level, max_level)
        out, _ = dense_attention(qh, kh, vh, mask, scale)
    elif chosen == "compact":
        plan = plan or build_mlswa_plan(positions, window_size_per_level, max_level)
        out = compact_attention(qh, kh, vh, plan, scale).out
    else:
        raise ValueError(f"unknown attention backend {chosen!r} (expected auto, dense or compact)")
    return out.transpose(1, 2)


class MLSWAContext:
    """Everything attention needs for one batch, prepared once and shared by every layer and head.

    Plans (or dense masks) are built lazily per distinct ``max_level`` the layers ask for.
    """

    def __init__(
        self,
        positions: HierarchicalPositions,
        window_size_per_level: Sequence[int],
        backend: str = "auto",
    ) -> None:
        self.positions = positions.batched()
        self.windows = [int(w) for w in window_size_per_level]
        self.backend = choose_backend(self.positions.seq_len, self.positions.device, backend)
        self._prepared: dict[int, object] = {}

    def prepared(self, max_level: int):
        if max_level not in self._prepared:
            if self.backend == "dense":
                self._prepared[max_level] = mlswa_dense_mask(self.positions, self.windows, max_level)
            else:
                self._prepared[max_level] = build_mlswa_plan(self.positions, self.windows, max_level)
        return self._prepared[max_level]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_level: int, scale: float | None = None
    ) -> torch.Tensor:
        """Head-major [B, H, N, D] -> [B, H, N, D]."""
        prepared = self.prepared(max_level)
        if self.backend == "dense":
            return dense_attention(q, k, v, prepared, scale)[0]
        return compact_attention(q, k, v, prepared, scale).out
