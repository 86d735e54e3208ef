"""Exact ML-SWA attention with memory and time linear in the sequence length (DESIGN.md 3, PERF.md).

Backends (``model.mlswa.backend``):

* ``compact`` - the "compacted levels" algorithm. Level 0 is banded attention over all tokens, in
  chunks whose overlapping key windows are strided views of K/V; each level ``l >= 1`` is banded
  attention over the compacted sequence of its participants (sentence starts, section starts),
  leaving out pairs a lower level already allows, so every allowed pair counts exactly once. The
  ``[DOC]`` rule adds two tiny partials. The partial softmaxes are merged exactly through their
  log-sum-exps, and only at the *boundary rows* (participants of a level >= 1, and ``[DOC]``): every
  other row's output is its level-0 output.

  Two implementations share the plan. :func:`compact_attention` computes every partial explicitly
  (chunked matmul and masked softmax; plain autograd; the lse and per-level lse are available, in
  float64 too) and serves diagnostics. :func:`fast_compact_attention` is the training path: level 0
  runs through the fused attention kernel. On CPU every level's band runs in the flash kernel behind
  ``F.scaled_dot_product_attention``, called with its log-sum-exp inside one autograd function whose
  backward hands the kernel the *merged* output and lse (the split-KV identity), one call per level;
  elsewhere (CUDA) level 0 runs in the public SDPA, the boundary rows' level-0 lse is recomputed
  explicitly and autograd does the rest.
* ``dense`` - one SDPA call with the dense mask (built once per batch and ``max_level``); quadratic,
  the fastest below about 1.3k tokens on CPU.
* ``flex`` - FlexAttention over "extended keys" (one copy of each boundary token's key appended
  after the sequence, so hierarchical links land in a few extra key blocks), for CUDA.
* ``auto`` - dense up to a crossover length, compact above: :data:`DENSE_AUTO_MAX_LEN` tokens for
  wide token windows, less for narrow ones (see :func:`dense_crossover`).

Plans (indices and band masks) depend only on the document structure: :class:`MLSWAContext` builds
one per batch and ``max_level`` and shares it across layers and heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lhtcli.core.mask import doc_rule_active, level_enums, resolve_max_level
from lhtcli.core.positions import HierarchicalPositions

NEG_INF = float("-inf")
MAX_CHUNK = 128  # query rows per chunk at levels >= 1
LEVEL0_MAX_CHUNK = 256  # level 0: the CPU flash kernel is much faster with >= 192 query rows per call
MIN_CHUNK = 16
# auto runs dense up to this many tokens: one masked SDPA call beats the banded kernels below the
# crossover measured on CPU by benchmarks/attention.py (dense is faster at 1024, compact at 1536).
DENSE_AUTO_MAX_LEN = 1280
# Narrow token windows make the compact path cheaper per token while dense stays quadratic: measured
# crossovers are ~5 windows at w=256 and ~20 windows at w=32 (between 512 and 1024 tokens), so auto
# keeps dense up to DENSE_PER_WINDOW windows, clamped to [DENSE_AUTO_MIN_LEN, DENSE_AUTO_MAX_LEN].
DENSE_PER_WINDOW = 20
DENSE_AUTO_MIN_LEN = 512
BACKENDS = ("auto", "dense", "compact", "flex")

_FLASH_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# plan
# ----------------------------------------------------------------------------------------------
@dataclass
class LevelPlan:
    """Banded attention over one level's participants, in compacted order."""

    level: int
    window: int
    chunk: int
    halo: int  # keys on each side of a chunk: the window rounded up to whole chunks
    num_participants: int  # M: the largest participant count over the batch
    index: torch.Tensor  # [B, M] positions of participants; N marks an empty slot
    is_prefix: bool  # participants are positions 0..count-1 in every row: slice instead of gather
    band_mask: torch.Tensor  # [B, 1, nc, C, C + 2 * halo]
    to_boundary: torch.Tensor | None = None  # [B, M] slot among the boundary rows (levels >= 1)

    @property
    def num_chunks(self) -> int:
        return self.band_mask.shape[2]


@dataclass
class BoundaryRows:
    """Rows whose output merges more than the level-0 partial: participants of a level >= 1 and
    ``[DOC]`` (when its rule is active). Tensors over them have ``count + 1`` slots; the last one is
    a dummy that absorbs empty slots."""

    index: torch.Tensor  # [B, Mu + 1] positions; N for empty slots (and the dummy)
    valid: torch.Tensor  # [B, Mu + 1]
    batch_of_valid: torch.Tensor  # [V]: batch row of each valid slot
    slot_of_valid: torch.Tensor  # [V]
    position_of_valid: torch.Tensor  # [V]

    @property
    def count(self) -> int:
        return self.index.shape[1] - 1


@dataclass
class MLSWAPlan:
    seq_len: int
    batch_size: int
    max_level: int
    levels: list[LevelPlan]
    # [DOC] links with the top level's participants not already allowed by a level: [B, 1, Mt]
    doc_link_mask: torch.Tensor | None = None
    boundary: BoundaryRows | None = None
    real: torch.Tensor | None = None  # [B, N] real tokens
    has_padding: bool = False
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # lazily built per dtype / path


def _chunk_size(window: int, count: int, max_chunk: int = MAX_CHUNK) -> int:
    chunk = MIN_CHUNK
    while chunk < window and chunk < max_chunk:
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


def _band(e: torch.Tensor, valid: torch.Tensor, window: int, chunk: int, halo: int) -> torch.Tensor:
    """Chunked band mask [B, nc, C, C + 2*halo] of one level: |e_q - e_k| <= window among participants.

    ``e`` [B, M] increases along the valid slots, so each query's keys are one contiguous range of
    compacted indices (found by binary search): two comparisons per pair instead of the arithmetic."""
    batch, m = e.shape
    window = min(window, 1 << 40)
    big = torch.iinfo(torch.long).max // 4
    keys = torch.where(valid, e, big)  # sorted, invalid slots last
    lo = torch.searchsorted(keys, e - window, side="left")
    hi = torch.searchsorted(keys, e + window, side="right")
    lo = torch.where(valid, lo, m)  # invalid queries: empty range
    nc = -(-m // chunk)
    lo = F.pad(lo, (0, nc * chunk - m), value=m).view(batch, nc, chunk, 1)
    hi = F.pad(hi, (0, nc * chunk - m), value=0).view(batch, nc, chunk, 1)
    width = chunk + 2 * halo
    key_index = (
        torch.arange(width, device=e.device) - halo + chunk * torch.arange(nc, device=e.device)[:, None]
    )
    key_index = key_index[None, :, None, :]  # [1, nc, 1, K]
    return (key_index >= lo) & (key_index < hi)


def _compact_order(part: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Participants first, in position order: (order [B, M], valid [B, M], index [B, M] with N when empty)."""
    counts = part.sum(1)
    m = max(int(counts.max()), 1)
    order = torch.sort((~part).to(torch.int8), dim=1, stable=True).indices[:, :m]
    valid = torch.arange(m, device=part.device)[None, :] < counts[:, None]
    return order, valid, torch.where(valid, order, torch.full_like(order, n))


def build_mlswa_plan(
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None = None,
) -> MLSWAPlan:
    """Precompute participants, band masks and boundary rows for every active level (shared by layers
    and heads)."""
    windows = [int(w) for w in window_size_per_level]
    max_level = resolve_max_level(windows, max_level)
    enums = level_enums(positions, windows)  # [L, B, N]
    _, batch, n = enums.shape
    levels: list[LevelPlan] = []
    for level in range(max_level + 1):
        order, valid, index = _compact_order(enums[level] != 0, n)
        m = index.shape[1]
        is_prefix = bool(((order == torch.arange(m, device=order.device)[None, :]) | ~valid).all())
        gathered = torch.gather(enums[: level + 1], 2, order[None].expand(level + 1, batch, m))
        ev = torch.where(valid[None], gathered, 0)  # [l+1, B, M]
        increasing = (ev[level, :, 1:] > ev[level, :, :-1]) | ~valid[:, 1:]
        if not bool(increasing.all()):
            raise ValueError(f"level {level} enumeration must increase along the sequence")
        window = windows[level]
        reach = min(window, m)  # enumerations increase, so allowed keys lie within `window` slots
        chunk = _chunk_size(reach, m, LEVEL0_MAX_CHUNK if level == 0 else MAX_CHUNK)
        halo = -(-reach // chunk) * chunk
        band = _band(ev[level], valid, window, chunk, halo)
        if level:
            eq = _chunk_queries(ev[:level, ..., None], chunk)  # [l, B, nc, C, 1]
            ek = _key_windows(ev[:level, ..., None], chunk, halo).transpose(-1, -2)  # [l, B, nc, 1, C+2h]
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
    real = enums[0] != 0
    plan = MLSWAPlan(n, batch, max_level, levels, doc_link_mask, real=real, has_padding=not bool(real.all()))
    if max_level >= 1:
        plan.boundary = _build_boundary(enums, plan)
    return plan


def _build_boundary(enums: torch.Tensor, plan: MLSWAPlan) -> BoundaryRows:
    n = plan.seq_len
    part = (enums[1 : plan.max_level + 1] != 0).any(0)
    if plan.doc_link_mask is not None:
        part[:, 0] |= enums[0][:, 0] != 0
    _, valid, index = _compact_order(part, n)
    batch, mu = index.shape
    index = F.pad(index, (0, 1), value=n)  # the dummy slot
    valid = F.pad(valid, (0, 1), value=False)
    slot_of = torch.full((batch, n + 1), mu, dtype=torch.long, device=index.device)
    slot_of.scatter_(1, index, torch.arange(mu + 1, device=index.device).expand(batch, -1))
    slot_of[:, n] = mu  # empty slots of every level point at the dummy
    for lp in plan.levels[1:]:
        lp.to_boundary = torch.gather(slot_of, 1, lp.index)
    batch_of, slot = torch.nonzero(valid, as_tuple=True)
    return BoundaryRows(index, valid, batch_of, slot, index[batch_of, slot])


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


# ----------------------------------------------------------------------------------------------
# fast path: level 0 through the fused kernel
# ----------------------------------------------------------------------------------------------
def _geometry(lp: LevelPlan) -> tuple[int, int, int, int]:
    """(chunk C, halo, number of chunks nc, key window K) of a level's band."""
    return lp.chunk, lp.halo, lp.num_chunks, lp.chunk + 2 * lp.halo


def _rows_with_keys(plan: MLSWAPlan, level: int) -> torch.Tensor:
    """[B, nc*C]: rows (in the level's compacted order, chunk-padded) that have a key at this level."""
    key = ("rows_with_keys", level)
    if key not in plan.cache:
        lp = plan.levels[level]
        if level == 0:  # every real token sees itself
            rows = lp.num_chunks * lp.chunk
            has = F.pad(lp.index < plan.seq_len, (0, rows - lp.num_participants), value=False)
        else:
            has = lp.band_mask.any(-1).flatten(1)
        plan.cache[key] = (has, bool(has[:, : lp.num_participants].all()))
    return plan.cache[key]


def _level_mask(plan: MLSWAPlan, level: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive band mask [B, nc, C, K] of ``dtype``; rows with no key at this level are opened (all
    zeros) so that no kernel sees a fully masked row: their lse is set to -inf afterwards."""
    key = ("mask", level, dtype)
    if key not in plan.cache:
        lp = plan.levels[level]
        band = lp.band_mask[:, 0]
        has, _ = _rows_with_keys(plan, level)
        band = band | ~has.view(band.shape[0], lp.num_chunks, lp.chunk, 1)
        zero = torch.zeros((), dtype=dtype, device=band.device)
        plan.cache[key] = torch.where(band, zero, torch.full_like(zero, NEG_INF))
    return plan.cache[key]


def _level0_mask(plan: MLSWAPlan, dtype: torch.dtype) -> torch.Tensor:
    return _level_mask(plan, 0, dtype)


def prepare_plan(plan: MLSWAPlan, dtype: torch.dtype) -> MLSWAPlan:
    """Build the float band masks the fast path needs for ``dtype`` now rather than at the first call
    (they are cached on the plan either way)."""
    for level in range(len(plan.levels)):
        _level_mask(plan, level, _compute_dtype(dtype) if level else dtype)
    return plan


def _rows_to_chunks(x: torch.Tensor, chunk: int, nc: int, fill: float = 0.0) -> torch.Tensor:
    """[B, H, N, *D] -> [B, H, nc, C, *D] covering rows 0..nc*C-1 (a view when N >= nc*C)."""
    n, rows = x.shape[2], nc * chunk
    if rows <= n:
        return x[:, :, :rows].unflatten(2, (nc, chunk))
    pad = (0, 0, 0, rows - n) if x.dim() == 4 else (0, rows - n)
    return F.pad(x, pad, value=fill).unflatten(2, (nc, chunk))


def _chunks_to_rows(x: torch.Tensor, n: int, fill: float = 0.0) -> torch.Tensor:
    """[B, H, nc, C, *D] -> [B, H, N, *D] (cut or padded with ``fill``)."""
    x = x.flatten(2, 3)
    rows = x.shape[2]
    if rows >= n:
        return x[:, :, :n]
    pad = (0, 0, 0, n - rows) if x.dim() == 4 else (0, n - rows)
    return F.pad(x, pad, value=fill)


def _padded_keys(x: torch.Tensor, lp: LevelPlan, token_major: bool = False) -> torch.Tensor:
    """[B, H, M, D] -> [B, H, nc*C + 2*halo, D]: a level's key rows with the halo on both sides.

    ``token_major`` stores them as [B, L, H, D] (the model's layout; the flash kernel's too)."""
    chunk, halo, nc, _ = _geometry(lp)
    rows = nc * chunk
    x = x[:, :, :rows]
    body = x.shape[2]
    batch, heads, _, dim = x.shape
    if token_major:
        padded = x.new_empty(batch, rows + 2 * halo, heads, dim).transpose(1, 2)
    else:
        padded = x.new_empty(batch, heads, rows + 2 * halo, dim)
    padded[:, :, :halo] = 0  # no fill of the body
    padded[:, :, halo : halo + body] = x
    padded[:, :, halo + body :] = 0
    return padded


def _windows(padded: torch.Tensor, lp: LevelPlan) -> torch.Tensor:
    chunk, _, _, width = _geometry(lp)
    return padded.unfold(2, width, chunk).transpose(-1, -2)  # [B, H, nc, K, D], a view


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0][None] if len(parts) == 1 else torch.stack(parts)


# The flash kernel is called with the chunks as its batch and the heads as its heads: q [nc, H, C, D]
# and windows [nc, H, K, D]. Its outputs are then laid out [nc, C, H, D], i.e. token-major [N, H, D],
# the model's own layout (no copy on the way out, none for a token-major grad_out on the way back).
def _flash_band(q, k, v, plan: MLSWAPlan, level: int, scale: float):
    """One level's banded attention in the CPU flash kernel, on its rows in compacted order
    ([B, H, M, D]; level 0: all N positions). Returns (out, lse, padded keys, padded values); rows
    with no key at this level get out 0 and lse -inf."""
    lp = plan.levels[level]
    m = q.shape[2]
    chunk, _, nc, _ = _geometry(lp)
    mask = _level_mask(plan, level, q.dtype)
    qc = _rows_to_chunks(q, chunk, nc)
    kp, vp = _padded_keys(k, lp, token_major=True), _padded_keys(v, lp, token_major=True)
    kw, vw = _windows(kp, lp), _windows(vp, lp)
    outs, lses = [], []
    for b in range(q.shape[0]):
        out_b, lse_b = _FLASH_FORWARD(
            qc[b].transpose(0, 1),
            kw[b].transpose(0, 1),
            vw[b].transpose(0, 1),
            0.0,
            False,
            attn_mask=mask[b][:, None],
            scale=scale,
        )
        outs.append(out_b.transpose(0, 1))  # [H, nc, C, D], token-major underneath
        lses.append(lse_b.transpose(0, 1))
    out = _chunks_to_rows(_stack(outs), m)
    lse = _chunks_to_rows(_stack(lses), m)
    has, everywhere = _rows_with_keys(plan, level)
    if not everywhere or m > has.shape[1]:
        has = (has[:, :m] if has.shape[1] >= m else F.pad(has, (0, m - has.shape[1]), value=False))[:, None]
        out = out.masked_fill_(~has[..., None], 0.0)
        lse = lse.masked_fill_(~has, NEG_INF)
    return out, lse, kp, vp


def _flash_band_backward(grad_out, q, kp, vp, out, lse, plan: MLSWAPlan, level: int, scale: float):
    """Gradients (dq [B, H, M, D], dk, dv) of one level's pairs within the *merged* softmax: the
    kernel gets the merged output and lse (the split-KV identity), rows without a key here lse +inf."""
    lp = plan.levels[level]
    m = q.shape[2]
    chunk, halo, nc, width = _geometry(lp)
    mask = _level_mask(plan, level, q.dtype)
    has, _ = _rows_with_keys(plan, level)
    lc = _rows_to_chunks(lse, chunk, nc, fill=math.inf)
    lc = lc.masked_fill(~has.view(has.shape[0], 1, nc, chunk), math.inf)
    qc, gc, oc = (_rows_to_chunks(t, chunk, nc) for t in (q, grad_out, out))
    kw, vw = _windows(kp, lp), _windows(vp, lp)
    grads: list[list[torch.Tensor]] = [[], [], []]
    for b in range(q.shape[0]):
        parts = _FLASH_BACKWARD(
            *(t[b].transpose(0, 1) for t in (gc, qc, kw, vw, oc, lc)),
            0.0,
            False,
            attn_mask=mask[b][:, None],
            scale=scale,
        )
        grads[0].append(_chunks_to_rows(parts[0].transpose(0, 1)[None], m)[0])
        grads[1].append(_fold_windows(parts[1], lp, m))
        grads[2].append(_fold_windows(parts[2], lp, m))
    return tuple(_stack(g) for g in grads)


def _fold_windows(grad: torch.Tensor, lp: LevelPlan, m: int) -> torch.Tensor:
    """Sum the kernel's gradients of overlapping key windows ([nc, H, K, D], laid out [nc, K, H, D])
    back onto rows: [H, M, D] (token-major underneath)."""
    chunk, halo, nc, width = _geometry(lp)
    blocks = width // chunk
    grad = grad.transpose(1, 2)  # [nc, K, H, D]
    padded = grad.new_empty(nc + blocks - 1, chunk, *grad.shape[2:])
    padded[:nc] = grad[:, :chunk]
    padded[nc:] = 0
    for d in range(1, blocks):
        padded[d : d + nc] += grad[:, d * chunk : (d + 1) * chunk]
    rows = padded.flatten(0, 1)[halo : halo + m]  # [M', H, D]
    if rows.shape[0] < m:
        rows = F.pad(rows, (0, 0, 0, 0, 0, m - rows.shape[0]))
    return rows.transpose(0, 1)


def _flash_forward(q, k, v, plan: MLSWAPlan, scale: float):
    """Exact ML-SWA forward with every level's band in the CPU flash kernel: (out [B, H, N, D],
    lse [B, H, N], padded level-0 keys and values)."""
    out, lse, kp, vp = _flash_band(q, k, v, plan, 0, scale)
    if plan.boundary is not None:
        index = plan.boundary.index
        inputs = _BoundaryInputs.gather(q, k, v, plan)

        def band(ql, kl, vl, lp, scale):
            return _flash_band(ql, kl, vl, plan, lp.level, scale)[:2]

        extra, _ = _boundary_partials(inputs, plan, scale, band=band)
        merged = _merge(_gather_rows(out, index), _gather_rows(lse, index), extra[0], extra[1].to(lse.dtype))
        _write_boundary(out, merged[0], plan, inplace=True)
        _write_boundary(lse, merged[1], plan, inplace=True)
    return out, lse, kp, vp


def flash_compact_result(q, k, v, plan: MLSWAPlan, scale: float | None = None,
                         collect_levels: bool = False) -> AttentionResult:
    """:func:`compact_attention`'s result (out, lse, per-level lse) with every level's band in the CPU
    flash kernel: no score tensor is materialised, so diagnostics of long sequences stay fast and
    small. Forward only; needs :func:`flash_available` and a plan whose level 0 is a prefix."""
    _check_plan(q, plan)
    if not (flash_available(q) and plan.levels[0].is_prefix):
        raise ValueError("flash_compact_result needs a CPU flash dtype and a plan without padding holes")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out0, lse0, _, _ = _flash_band(q, k, v, plan, 0, scale)

    def band(ql, kl, vl, lp, scale):
        return _flash_band(ql, kl, vl, plan, lp.level, scale)[:2]

    return _add_boundary(q, k, v, out0, lse0, plan, scale, collect_levels, band=band)


class _FlashCompact(torch.autograd.Function):
    """Exact ML-SWA with every level's band in the CPU flash kernel, forward and backward.

    The backward uses the split-KV identity: for the keys of one partial (a level's band), the exact
    gradient of the *whole* softmax is what the flash backward kernel computes when handed the
    merged output O and merged lse (p = exp(s - lse) is then the global probability and
    D = rowsum(dO * O) the global one). So each level runs one backward kernel call on its own rows,
    and the two tiny [DOC] partials get theirs in closed form.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: MLSWAPlan, scale: float):
        out, lse, kp, vp = _flash_forward(q, k, v, plan, scale)
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(q, k, v, kp, vp, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, kp, vp, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        dq, dk, dv = _flash_band_backward(grad_out, q, kp, vp, out, lse, plan, 0, scale)
        if plan.boundary is not None:
            _boundary_backward(grad_out, q, k, v, out, lse, plan, scale, (dq, dk, dv))
        return dq, dk, dv, None, None


def _boundary_backward(grad_out, q, k, v, out, lse, plan: MLSWAPlan, scale: float, grads) -> None:
    """Add the gradients of the pairs of levels >= 1 and of the [DOC] rule into ``grads`` (in place)."""
    n = plan.seq_len
    inputs = _BoundaryInputs.gather(q, k, v, plan)
    dtype = inputs.levels[0][0].dtype
    for lp, (ql, kl, vl) in zip(plan.levels[1:], inputs.levels, strict=True):
        rows = [_gather_rows(t, lp.index).to(dtype) for t in (grad_out, out)]
        lse_rows = _gather_rows(lse, lp.index).to(dtype)
        kp, vp = _padded_keys(kl, lp), _padded_keys(vl, lp)
        level_grads = _flash_band_backward(rows[0], ql, kp, vp, rows[1], lse_rows, plan, lp.level, scale)
        idx = lp.index.clamp(max=n - 1)[:, None, :, None].expand_as(level_grads[0])
        for acc, g in zip(grads, level_grads, strict=True):
            acc.scatter_add_(2, idx, g.to(acc.dtype))  # empty slots carry exact zeros
    if inputs.doc is not None:
        top = plan.levels[-1]
        q_top, k_top, v_top = inputs.levels[-1]
        grad_top, out_top = (_gather_rows(t, top.index).to(dtype) for t in (grad_out, out))
        lse_top = _gather_rows(lse, top.index).to(dtype)
        q_doc, k_doc, v_doc = inputs.doc
        grad_doc, out_doc = (t[:, :, :1].to(dtype) for t in (grad_out, out))
        mask = plan.doc_link_mask  # [B, 1, Mt]
        # [DOC]'s column: top-level query t sees key 0 with probability p_t
        p = torch.exp(torch.where(mask, (q_top * k_doc).sum(-1) * scale - lse_top, NEG_INF))  # [B, H, Mt]
        g = p * ((grad_top * v_doc).sum(-1) - (grad_top * out_top).sum(-1))
        dq_top = scale * g[..., None] * k_doc
        dk_doc = scale * (g[..., None] * q_top).sum(2, keepdim=True)
        dv_doc = (p[..., None] * grad_top).sum(2, keepdim=True)
        # [DOC]'s row: query 0 sees top-level key j with probability r_j
        r = torch.exp(torch.where(mask, (q_doc * k_top).sum(-1) * scale - lse[:, :, :1].to(dtype), NEG_INF))
        h = r * ((grad_doc * v_top).sum(-1) - (grad_doc * out_doc).sum(-1))
        dq_doc = scale * (h[..., None] * k_top).sum(2, keepdim=True)
        dk_top = scale * h[..., None] * q_doc
        dv_top = r[..., None] * grad_doc
        idx = top.index.clamp(max=n - 1)[:, None, :, None].expand_as(dq_top)
        for acc, g_top, g_doc in zip(grads, (dq_top, dk_top, dv_top), (dq_doc, dk_doc, dv_doc), strict=True):
            acc.scatter_add_(2, idx, g_top.to(acc.dtype))
            acc[:, :, :1] += g_doc.to(acc.dtype)


def _sdpa_rows(plan: MLSWAPlan) -> dict[str, torch.Tensor]:
    """Boundary rows grouped by level-0 chunk (for their explicit level-0 lse on the SDPA path)."""
    if "sdpa_rows" in plan.cache:
        return plan.cache["sdpa_rows"]
    br = plan.boundary
    assert br is not None
    chunk, _, nc, _ = _geometry(plan.levels[0])
    batch, slots = br.index.shape
    pos = br.index.clamp(max=nc * chunk - 1)
    chunk_of = torch.where(br.valid, pos // chunk, nc)  # invalid slots sort last
    counts = torch.zeros(batch, nc + 1, dtype=torch.long, device=pos.device).scatter_add_(
        1, chunk_of, torch.ones_like(chunk_of)
    )[:, :nc]
    width = max(int(counts.max()), 1)
    starts = torch.cumsum(counts, 1) - counts  # first slot of each chunk (slots are sorted by position)
    rank = torch.arange(slots, device=pos.device)[None] - torch.gather(F.pad(starts, (0, 1)), 1, chunk_of)
    grouped = torch.where(br.valid, chunk_of * width + rank, nc * width)  # slot -> grouped row
    members = torch.zeros(batch, nc * width + 1, dtype=torch.long, device=pos.device)
    members.scatter_(1, grouped, torch.where(br.valid, pos % chunk, 0))
    used = torch.zeros(batch, nc * width + 1, dtype=torch.bool, device=pos.device)
    used.scatter_(1, grouped, br.valid)
    members, used = members[:, :-1].view(batch, nc, width), used[:, :-1].view(batch, nc, width)
    band = plan.levels[0].band_mask[:, 0]  # [B, nc, C, K]
    rows_mask = torch.gather(band, 2, members[..., None].expand(-1, -1, -1, band.shape[-1])) & used[..., None]
    grouped = grouped.clamp(max=nc * width - 1)
    plan.cache["sdpa_rows"] = {"members": members, "mask": rows_mask[:, None], "grouped": grouped}
    return plan.cache["sdpa_rows"]


def _sdpa_compact(q, k, v, plan: MLSWAPlan, scale: float) -> torch.Tensor:
    """Exact ML-SWA with public ops (any device): level 0 through ``F.scaled_dot_product_attention``,
    the boundary rows' level-0 lse recomputed explicitly, autograd for the backward."""
    n = plan.seq_len
    lp0 = plan.levels[0]
    chunk, halo, nc, width = _geometry(lp0)
    mask = _level0_mask(plan, q.dtype)
    qc = _rows_to_chunks(q, chunk, nc)
    kp, vp = _padded_keys(k, lp0), _padded_keys(v, lp0)
    kw, vw = _windows(kp, lp0), _windows(vp, lp0)
    outs = [
        F.scaled_dot_product_attention(qc[b], kw[b], vw[b], attn_mask=mask[b : b + 1], scale=scale)
        for b in range(q.shape[0])
    ]
    out = _chunks_to_rows(torch.stack(outs), n)
    if plan.has_padding:
        out = out.masked_fill(~plan.real[:, None, :, None], 0.0)
    if plan.boundary is None:
        return out
    rows = _sdpa_rows(plan)
    batch, heads, dim = q.shape[0], q.shape[1], q.shape[3]
    members = rows["members"][:, None, :, :, None].expand(batch, heads, -1, -1, dim)
    dtype = _compute_dtype(q.dtype)
    q_rows = torch.gather(qc, 3, members).to(dtype)  # [B, H, nc, R, D]
    blocks = kp.unflatten(2, (-1, chunk)).to(dtype)  # [B, H, nc + K/C - 1, C, D]: non-overlapping blocks
    scores = (
        torch.cat(
            [torch.matmul(q_rows, blocks[:, :, d : d + nc].transpose(-1, -2)) for d in range(width // chunk)],
            -1,
        )
        * scale
    )
    _, lse_rows = _masked_softmax_parts(scores, rows["mask"])
    grouped = rows["grouped"][:, None].expand(batch, heads, -1)
    lse0 = torch.gather(lse_rows.flatten(2), 2, grouped)  # [B, H, Mu + 1]
    index = plan.boundary.index
    extra, _ = _boundary_partials(_BoundaryInputs.gather(q, k, v, plan), plan, scale)
    merged, _ = _merge(_gather_rows(out, index), lse0, extra[0], extra[1])
    return _write_boundary(out, merged, plan, inplace=False)


def flash_available(q: torch.Tensor) -> bool:
    """True when the CPU flash kernel with log-sum-exp can run level 0 of the fast path."""
    return _FLASH_FORWARD is not None and q.device.type == "cpu" and q.dtype in _FLASH_DTYPES


def fast_compact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: MLSWAPlan,
    scale: float | None = None,
    level0: str = "auto",
) -> torch.Tensor:
    """Exact ML-SWA for training on head-major [B, H, N, D]: the output only (no lse).

    ``level0``: ``"flash"`` (every level's band in the CPU flash kernel, inside one autograd
    function), ``"sdpa"`` (level 0 in the public SDPA, autograd; any device), ``"explicit"``
    (:func:`compact_attention`), or ``"auto"`` (flash where available, else sdpa). Plans whose level 0
    is not a prefix of the sequence (holes of padding) use explicit.
    """
    _check_plan(q, plan)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = k.to(q.dtype), v.to(q.dtype)
    if level0 == "auto":
        level0 = "flash" if flash_available(q) else "sdpa"
    if level0 == "explicit" or not plan.levels[0].is_prefix:
        return compact_attention(q, k, v, plan, scale).out
    if level0 == "flash":
        if not flash_available(q):
            raise ValueError(
                f"the flash level-0 path needs a CPU tensor of {_FLASH_DTYPES}, got {q.device} {q.dtype}"
            )
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return _FlashCompact.apply(q, k, v, plan, scale)
        return _flash_forward(q, k, v, plan, scale)[0]
    if level0 == "sdpa":
        return _sdpa_compact(q, k, v, plan, scale)
    raise ValueError(f"unknown level0 path {level0!r} (expected auto, flash, sdpa or explicit)")


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


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def dense_crossover(token_window: int | None = None) -> int:
    """Longest sequence ``auto`` runs dense for this level-0 window (None: a wide window)."""
    if token_window is None:
        return DENSE_AUTO_MAX_LEN
    return max(DENSE_AUTO_MIN_LEN, min(DENSE_AUTO_MAX_LEN, DENSE_PER_WINDOW * int(token_window)))


def choose_backend(
    seq_len: int, device: torch.device | str, requested: str = "auto", token_window: int | None = None
) -> str:
    """The backend that runs: ``requested``, or for ``auto`` dense on short sequences and compact above
    (the crossover depends on the token window, see :func:`dense_crossover`)."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r} (expected one of {', '.join(BACKENDS)})")
    if requested != "auto":
        return requested
    return "dense" if seq_len <= dense_crossover(token_window) else "compact"


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
    (faster for short sequences); ``"flex"`` uses FlexAttention (CUDA); ``"auto"`` picks by length.
    """
    if q.dim() != 4:
        raise ValueError(f"q, k, v must be [B, N, H, D], got q of shape {tuple(q.shape)}")
    positions = positions.batched()
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    chosen = choose_backend(q.shape[1], q.device, backend, token_window=int(window_size_per_level[0]))
    if chosen == "compact":
        plan = plan or build_mlswa_plan(positions, window_size_per_level, max_level)
        out = fast_compact_attention(qh, kh, vh, plan, scale)
    elif chosen == "dense":
        mask = DenseMask.from_positions(positions, window_size_per_level, max_level)
        out = dense_sdpa_attention(qh, kh, vh, mask, scale)
    else:
        flex_plan = build_flex_plan(positions, window_size_per_level, max_level)
        out = flex_compact_attention(qh, kh, vh, flex_plan, scale)
    return out.transpose(1, 2)


class MLSWAContext:
    """Everything attention needs for one batch, prepared once and shared by every layer and head.

    Plans (or dense masks, or flex block masks) are built lazily per distinct ``max_level``.
    """

    def __init__(
        self,
        positions: HierarchicalPositions,
        window_size_per_level: Sequence[int],
        backend: str = "auto",
    ) -> None:
        self.positions = positions.batched()
        self.windows = [int(w) for w in window_size_per_level]
        self.backend = choose_backend(self.positions.seq_len, self.positions.device, backend,
                                      token_window=self.windows[0])
        self._prepared: dict[int, Any] = {}

    def prepared(self, max_level: int):
        if max_level not in self._prepared:
            if self.backend == "dense":
                self._prepared[max_level] = DenseMask.from_positions(self.positions, self.windows, max_level)
            elif self.backend == "flex":
                self._prepared[max_level] = build_flex_plan(self.positions, self.windows, max_level)
            else:
                self._prepared[max_level] = build_mlswa_plan(self.positions, self.windows, max_level)
        return self._prepared[max_level]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_level: int, scale: float | None = None
    ) -> torch.Tensor:
        """Head-major [B, H, N, D] -> [B, H, N, D]."""
        prepared = self.prepared(max_level)
        if self.backend == "dense":
            return dense_sdpa_attention(q, k, v, prepared, scale)
        if self.backend == "flex":
            return flex_compact_attention(q, k, v, prepared, scale)
        return fast_compact_attention(q, k, v, prepared, scale)
