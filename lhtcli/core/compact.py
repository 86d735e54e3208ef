"""The explicit compacted algorithm: banded partial softmaxes per level merged exactly through
their log-sum-exps at the boundary rows (any dtype and device; per-level lse for diagnostics)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lhtcli.core.plan import (
    NEG_INF,
    LevelPlan,
    MLSWAPlan,
    _chunk_queries,
    _key_windows,
)


# ----------------------------------------------------------------------------------------------
# explicit partial softmaxes
# ----------------------------------------------------------------------------------------------
def _masked_softmax_parts(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised probabilities and lse of a masked score block; rows with no key get lse -inf."""
    scores = scores.masked_fill(~mask, NEG_INF)
    peak = scores.amax(-1, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(scores - peak)
    total = weights.sum(-1, keepdim=True)
    nonempty = total > 0
    total_safe = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, torch.log(total_safe) + peak, torch.full_like(total, NEG_INF))
    return weights / total_safe, lse.squeeze(-1)


def _partial(scores: torch.Tensor, mask: torch.Tensor, values) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax partial over masked ``scores [..., R, K]``: (values(probabilities), lse)."""
    probs, lse = _masked_softmax_parts(scores, mask)
    return values(probs), lse


def _band_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lp: LevelPlan, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Banded attention of compacted [B, H, M, D] tensors -> (out [B, H, M, D], lse [B, H, M])."""
    batch, heads, m, dim = q.shape
    qc = _chunk_queries(q, lp.chunk)  # [B, H, nc, C, D]
    kw = _key_windows(k, lp.chunk, lp.halo)  # [B, H, nc, K, D]
    vw = _key_windows(v, lp.chunk, lp.halo)
    scores = torch.matmul(qc, kw.transpose(-1, -2)) * scale
    out, lse = _partial(scores, lp.band_mask, lambda w: torch.matmul(w, vw))
    rows = qc.shape[2] * lp.chunk
    return out.reshape(batch, heads, rows, dim)[:, :, :m], lse.reshape(batch, heads, rows)[:, :, :m]


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) + exp(b)) whose gradient stays finite when both are -inf (torch.logaddexp gives NaN)."""
    peak = torch.maximum(a, b).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(a - peak) + torch.exp(b - peak)
    nonempty = total > 0
    return torch.where(
        nonempty, torch.log(torch.where(nonempty, total, torch.ones_like(total))) + peak, NEG_INF
    )


def _merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax partials over disjoint key sets exactly."""
    lse = _logaddexp(lse_a, lse_b)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(lse_a - lse_safe)[..., None]
    wb = torch.exp(lse_b - lse_safe)[..., None]
    return wa * out_a + wb * out_b, lse


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, *D] at index [B, M] (N = empty -> row N-1, never used) -> [B, H, M, *D]."""
    batch, heads = x.shape[:2]
    idx = index.clamp(max=x.shape[2] - 1)[:, None, :].expand(batch, heads, -1)
    if x.dim() == 4:
        return torch.gather(x, 2, idx[..., None].expand(-1, -1, -1, x.shape[3]))
    return torch.gather(x, 2, idx)


def _to_slots(x: torch.Tensor, slots: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """Compacted rows x [B, H, M, *D] -> [B, H, size, *D] at ``slots`` [B, M] (``fill`` elsewhere)."""
    batch, heads, m = x.shape[:3]
    idx = slots[:, None, :].expand(batch, heads, m)
    if x.dim() == 4:
        idx = idx[..., None].expand(-1, -1, -1, x.shape[3])
    return x.new_full((batch, heads, size, *x.shape[3:]), fill).scatter(2, idx, x)


@dataclass
class _BoundaryInputs:
    """The rows each level >= 1 reads: per level (q, k, v) of its participants, and [DOC]'s own."""

    levels: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    doc: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # q, k, v at position 0: [B, H, 1, D]

    @staticmethod
    def gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: MLSWAPlan) -> _BoundaryInputs:
        """Half-precision inputs are taken in float32: these few rows decide the merge weights."""
        dtype = _compute_dtype(q.dtype)
        levels = [tuple(_gather_rows(t, lp.index).to(dtype) for t in (q, k, v)) for lp in plan.levels[1:]]
        doc = None if plan.doc_link_mask is None else tuple(t[:, :, :1].to(dtype) for t in (q, k, v))
        return _BoundaryInputs(levels, doc)


def _boundary_partials(
    inputs: _BoundaryInputs,
    plan: MLSWAPlan,
    scale: float,
    collect_levels: bool = False,
    band=None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    """The pairs that levels >= 1 and the ``[DOC]`` rule add, on the boundary rows ([B, H, Mu + 1]).

    Returns (out, lse) of their softmax and, with ``collect_levels``, each level's lse on the
    boundary rows (the ``[DOC]`` links in the top level). ``band(q, k, v, level_plan, scale)`` computes
    a level's banded partial (default: explicit matmuls).
    """
    assert plan.boundary is not None
    band = band or _band_partial
    slots = plan.boundary.count + 1
    total: tuple[torch.Tensor, torch.Tensor] | None = None
    level_lse: list[torch.Tensor] = []
    for lp, (ql, kl, vl) in zip(plan.levels[1:], inputs.levels, strict=True):
        assert lp.to_boundary is not None
        part = band(ql, kl, vl, lp, scale)
        if inputs.doc is not None and lp is plan.levels[-1]:
            part = _merge(*part, *_doc_column(ql, *inputs.doc[1:], plan.doc_link_mask, scale))
        part = (
            _to_slots(part[0], lp.to_boundary, slots, 0.0),
            _to_slots(part[1], lp.to_boundary, slots, NEG_INF),
        )
        total = part if total is None else _merge(*total, *part)
        if collect_levels:
            level_lse.append(part[1])
    assert total is not None
    if inputs.doc is not None:
        _, k_top, v_top = inputs.levels[-1]
        row = _doc_row(inputs.doc[0], k_top, v_top, plan.doc_link_mask, scale)  # [DOC] is slot 0
        first = _merge(total[0][:, :, :1], total[1][:, :, :1], *row)
        total = (torch.cat([first[0], total[0][:, :, 1:]], 2), torch.cat([first[1], total[1][:, :, 1:]], 2))
        if collect_levels:
            top = level_lse[-1]
            level_lse[-1] = torch.cat([_logaddexp(top[:, :, :1], row[1]), top[:, :, 1:]], dim=2)
    return total, level_lse


def _doc_column(q_top, k_doc, v_doc, mask: torch.Tensor, scale: float):
    """Top-level queries may also see [DOC] (its key and value k_doc, v_doc [B, H, 1, D])."""
    scores = (q_top * k_doc).sum(-1, keepdim=True) * scale  # [B, H, Mt, 1]
    return _partial(scores, mask[..., None], lambda w: w * v_doc)


def _doc_row(q_doc, k_top, v_top, mask: torch.Tensor, scale: float):
    """[DOC]'s own partial over every top-level participant: ([B, H, 1, D], [B, H, 1])."""
    scores = torch.matmul(q_doc, k_top.transpose(-1, -2)) * scale  # [B, H, 1, Mt]
    return _partial(scores, mask[:, :, None, :], lambda w: torch.matmul(w, v_top))


def _write_boundary(x: torch.Tensor, rows: torch.Tensor, plan: MLSWAPlan, inplace: bool) -> torch.Tensor:
    """Position-space x [B, H, N, *D] with the valid boundary rows replaced by rows [B, H, Mu+1, *D]."""
    br = plan.boundary
    assert br is not None
    heads = torch.arange(x.shape[1], device=x.device)[None, :]
    index = (br.batch_of_valid[:, None], heads, br.position_of_valid[:, None])
    values = rows[br.batch_of_valid, :, br.slot_of_valid].to(x.dtype)  # [V, H, *D]
    return x.index_put_(index, values) if inplace else x.index_put(index, values)


# ----------------------------------------------------------------------------------------------
# explicit path (lse and per-level lse available)
# ----------------------------------------------------------------------------------------------
@dataclass
class AttentionResult:
    out: torch.Tensor  # [B, H, N, D]
    lse: torch.Tensor  # [B, H, N]; -inf on padding
    level_lse: list[torch.Tensor] | None = None  # per level [B, H, N]: lse of the pairs that level adds


def _check_plan(q: torch.Tensor, plan: MLSWAPlan) -> None:
    batch, _, n, _ = q.shape
    if n != plan.seq_len or batch != plan.batch_size:
        raise ValueError(f"plan was built for B={plan.batch_size}, N={plan.seq_len}; got B={batch}, N={n}")


def compact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: MLSWAPlan,
    scale: float | None = None,
    collect_levels: bool = False,
) -> AttentionResult:
    """Exact ML-SWA on head-major tensors [B, H, N, D] with every partial explicit (any dtype/device)."""
    _check_plan(q, plan)
    batch, heads, n, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    lp0 = plan.levels[0]
    if lp0.is_prefix:
        m = lp0.num_participants
        out0, lse0 = _band_partial(q[:, :, :m], k[:, :, :m], v[:, :, :m], lp0, scale)
        if m < n:
            out0 = F.pad(out0, (0, 0, 0, n - m))
            lse0 = F.pad(lse0, (0, n - m), value=NEG_INF)
    else:
        out0, lse0 = _band_partial(*(_gather_rows(t, lp0.index) for t in (q, k, v)), lp0, scale)
        out0 = _to_slots(out0, lp0.index, n + 1, 0.0)[:, :, :n]
        lse0 = _to_slots(lse0, lp0.index, n + 1, NEG_INF)[:, :, :n]
    return _add_boundary(q, k, v, out0, lse0, plan, scale, collect_levels)


def _add_boundary(q, k, v, out0, lse0, plan: MLSWAPlan, scale: float, collect_levels: bool,
                  band=None) -> AttentionResult:
    """Merge the pairs of levels >= 1 and the [DOC] rule into level 0's (out0, lse0) [B, H, N, *]."""
    if plan.boundary is None:
        return AttentionResult(out0, lse0, [lse0] if collect_levels else None)
    inputs = _BoundaryInputs.gather(q, k, v, plan)
    (out_b, lse_b), level_lse = _boundary_partials(inputs, plan, scale, collect_levels=collect_levels, band=band)
    index = plan.boundary.index
    out_b, lse_b = _merge(_gather_rows(out0, index), _gather_rows(lse0, index), out_b, lse_b)
    out = _write_boundary(out0, out_b, plan, inplace=False)
    lse = _write_boundary(lse0, lse_b, plan, inplace=False)
    levels = None
    if collect_levels:
        levels = [lse0]
        for per_level in level_lse:
            levels.append(_write_boundary(lse0.new_full(lse0.shape, NEG_INF), per_level, plan, inplace=False))
    return AttentionResult(out, lse, levels)


