"""The ML-SWA plan: per level, which positions take part and the band of keys each chunk of
queries may see; built once per batch from the document structure and shared by every layer."""

from __future__ import annotations

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
    # the band is one [C, K] pattern cut by the row's participant count (see contiguous_band_parts)
    contiguous: bool = False
    counts: torch.Tensor | None = None  # [B] participants per batch row (CPU, int64)

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


@dataclass
class ExtraKeys:
    """What levels >= 1 and the [DOC] rule add, as key lists: row r (batch row ``row_batch[r]``,
    position ``row_pos[r]``) also sees the positions ``keys[offsets[r] : offsets[r + 1]]``, none of
    them in its level-0 band. Rows are ordered by batch row, then position; CPU int64 tensors."""

    row_batch: torch.Tensor  # [R]
    row_pos: torch.Tensor  # [R]
    offsets: torch.Tensor  # [R + 1]
    keys: torch.Tensor  # [E]


def extra_keys(plan: MLSWAPlan) -> ExtraKeys:
    """The plan's boundary pairs as :class:`ExtraKeys` (built once per plan, then cached on it)."""
    if "extra_keys" in plan.cache:
        return plan.cache["extra_keys"]
    batches, queries, keys = [], [], []
    for lp in plan.levels[1:]:
        b, c, r, col = torch.nonzero(lp.band_mask[:, 0], as_tuple=True)
        batches.append(b)
        queries.append(lp.index[b, c * lp.chunk + r])
        keys.append(lp.index[b, c * lp.chunk - lp.halo + col])
    if plan.doc_link_mask is not None:  # [DOC] (position 0) and the top level's linked participants
        b, t = torch.nonzero(plan.doc_link_mask[:, 0], as_tuple=True)
        linked = plan.levels[-1].index[b, t]
        batches += [b, b]
        queries += [linked, torch.zeros_like(linked)]
        keys += [torch.zeros_like(linked), linked]
    empty = torch.zeros(0, dtype=torch.long)
    b = torch.cat(batches).cpu() if batches else empty
    q = torch.cat(queries).cpu() if queries else empty
    k = torch.cat(keys).cpu() if keys else empty
    stride = plan.seq_len + 1
    row_of_pair = b * stride + q  # one number per (batch row, position): sorting it groups the rows
    order = torch.argsort(row_of_pair, stable=True)
    rows, counts = torch.unique_consecutive(row_of_pair[order], return_counts=True)
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
    result = ExtraKeys(rows // stride, rows % stride, offsets, k[order].contiguous())
    plan.cache["extra_keys"] = result
    return result


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


def contiguous_band_parts(
    counts: torch.Tensor, window: int, chunk: int, halo: int, nc: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The band of a level whose enumeration is 1, 2, 3, ... over its participants, factored:
    (pattern [C, K]: |q - k| <= window within a chunk's key window, keys_ok [B, nc, K]: the key slot
    holds a participant, queries_ok [B, nc, C]). Their broadcast AND is the band; building it this way
    costs two broadcast ops instead of four full-size ones."""
    device = counts.device
    width = chunk + 2 * halo
    offset = torch.arange(chunk, device=device)[:, None] + halo - torch.arange(width, device=device)
    pattern = offset.abs() <= window
    key_slot = torch.arange(width, device=device) - halo + chunk * torch.arange(nc, device=device)[:, None]
    counts = counts[:, None, None]
    keys_ok = (key_slot >= 0) & (key_slot < counts)
    queries_ok = torch.arange(nc * chunk, device=device).view(nc, chunk) < counts
    return pattern, keys_ok, queries_ok


def chunks_past_participants(counts: torch.Tensor, chunk: int, nc: int):
    """For each batch row whose participants end before its last chunk: (row b, first such chunk,
    bool [nc - first, C, 1] marking the rows at or past the count). Only these few chunks differ from
    the band pattern, so they are patched instead of building the full-size row mask."""
    for b, count in enumerate(counts.tolist()):
        first = count // chunk
        if first < nc:
            rows = torch.arange(first * chunk, nc * chunk, device=counts.device) >= count
            yield b, first, rows.view(-1, chunk, 1)


def _is_contiguous(e: torch.Tensor, valid: torch.Tensor) -> bool:
    """The valid slots (a prefix) are enumerated 1, 2, 3, ...: slot distance is enumeration distance."""
    slots = torch.arange(1, e.shape[1] + 1, device=e.device)
    return bool(((e == slots) | ~valid).all())


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
        counts = valid.sum(1)
        contiguous = level == 0 and _is_contiguous(ev[level], valid)
        if contiguous:
            nc = -(-m // chunk)
            pattern, keys_ok, _ = contiguous_band_parts(counts, window, chunk, halo, nc)
            band = pattern & keys_ok[:, :, None, :]
            for b, first, past in chunks_past_participants(counts, chunk, nc):  # those rows see nothing
                band[b, first:] &= ~past
        else:
            band = _band(ev[level], valid, window, chunk, halo)
        if level:
            eq = _chunk_queries(ev[:level, ..., None], chunk)  # [l, B, nc, C, 1]
            ek = _key_windows(ev[:level, ..., None], chunk, halo).transpose(-1, -2)  # [l, B, nc, 1, C+2h]
            for lower in range(level):
                band &= ~_allowed(eq[lower], ek[lower], windows[lower])
        levels.append(
            LevelPlan(level, window, chunk, halo, m, index, is_prefix, band[:, None], contiguous=contiguous,
                      counts=counts.cpu())
        )

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


