"""The fast compact path: every level's band in the fused CPU flash kernel (exact forward and a
split-KV backward), or level 0 in the public SDPA elsewhere."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lhtcli.core.compact import (
    AttentionResult,
    _add_boundary,
    _boundary_partials,
    _BoundaryInputs,
    _check_plan,
    _compute_dtype,
    _gather_rows,
    _masked_softmax_parts,
    _merge,
    _write_boundary,
    compact_attention,
)
from lhtcli.core.native import band_kernel
from lhtcli.core.plan import (
    NEG_INF,
    LevelPlan,
    MLSWAPlan,
    chunks_past_participants,
    contiguous_band_parts,
    extra_keys,
)

_FLASH_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


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
        if lp.contiguous:
            plan.cache[key] = _contiguous_level_mask(lp, plan.seq_len, dtype)
        else:
            band = lp.band_mask[:, 0]
            has, _ = _rows_with_keys(plan, level)
            band = band | ~has.view(band.shape[0], lp.num_chunks, lp.chunk, 1)
            zero = torch.zeros((), dtype=dtype, device=band.device)
            plan.cache[key] = torch.where(band, zero, torch.full_like(zero, NEG_INF))
    return plan.cache[key]


def _contiguous_level_mask(lp: LevelPlan, n: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_level_mask` of a contiguous band as one broadcast add of its factors (a full-size
    ``where`` over the bool band is several times slower); only chunks holding rows without a key
    (the participants end there) are patched."""
    counts = lp.counts.to(lp.index.device)
    pattern, keys_ok, _ = contiguous_band_parts(counts, lp.window, lp.chunk, lp.halo, lp.num_chunks)

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, NEG_INF)

    mask = additive(pattern) + additive(keys_ok)[:, :, None, :]
    for b, first, past in chunks_past_participants(counts, lp.chunk, lp.num_chunks):
        mask[b, first:].masked_fill_(past, 0.0)
    return mask


def _level0_mask(plan: MLSWAPlan, dtype: torch.dtype) -> torch.Tensor:
    return _level_mask(plan, 0, dtype)


def prepare_plan(plan: MLSWAPlan, dtype: torch.dtype) -> MLSWAPlan:
    """Build what the fast path needs for ``dtype`` now rather than at the first call (it is cached on
    the plan either way): the float band masks, or, when the native kernel runs the plan, the boundary
    rows' extra-key lists instead."""
    if _native_kernel_for(dtype, plan.levels[0].index.device, plan) is not None:
        if plan.boundary is not None:
            extra_keys(plan)
        return plan
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


# ----------------------------------------------------------------------------------------------
# level 0 through the native band kernel (core/native.py) where it is available
# ----------------------------------------------------------------------------------------------
def _native_kernel_for(dtype: torch.dtype, device: torch.device, plan: MLSWAPlan):
    """The native kernel when it can run this plan's level 0 (float32 CPU, a contiguous band), else None."""
    lp = plan.levels[0]
    if dtype != torch.float32 or device.type != "cpu" or not (lp.contiguous and lp.is_prefix):
        return None
    return band_kernel()


def _native_level0(q: torch.Tensor, plan: MLSWAPlan):
    return _native_kernel_for(q.dtype, q.device, plan)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` when its rows are BLAS-ready (unit stride within a row, rows apart by at least a row; an
    expanded gradient can have row stride 0), else a contiguous copy."""
    return x if x.stride(-1) == 1 and x.stride(-2) >= x.shape[-1] else x.contiguous()


def _extra_key_lists(plan: MLSWAPlan) -> tuple[torch.Tensor, ...]:
    keys = extra_keys(plan)
    return keys.row_batch, keys.row_pos, keys.offsets, keys.keys


def _native_forward(kernel, q, k, v, plan: MLSWAPlan, scale: float):
    """The whole ML-SWA forward in the native kernel: level 0's band, then the extra keys of the
    boundary rows (levels >= 1, [DOC]) merged in place."""
    window = min(plan.levels[0].window, plan.seq_len)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, lse = kernel.band_forward(q, k, v, plan.levels[0].counts, window, scale)
    out = out.transpose(1, 2)  # token-major underneath, as the flash path's
    if plan.boundary is not None:
        kernel.extra_forward(q, k, v, out, lse, *_extra_key_lists(plan), scale)
    return out, lse


def _native_backward(kernel, grad_out, q, k, v, out, lse, plan: MLSWAPlan, scale: float):
    window = min(plan.levels[0].window, plan.seq_len)
    grad_out, q, k, v, out = (_last_dim_contiguous(t) for t in (grad_out, q, k, v, out))
    # the kernel returns [B, N, H, D] views of head-major gradients: back to [B, H, N, D], contiguous
    grads = [g.transpose(1, 2) for g in kernel.band_backward(grad_out, q, k, v, out, lse, plan.levels[0].counts,
                                                               window, scale)]
    if plan.boundary is not None:
        kernel.extra_backward(grad_out, q, k, v, out, lse, *_extra_key_lists(plan), scale, *grads)
    return grads


def _flash_forward(q, k, v, plan: MLSWAPlan, scale: float):
    """Exact ML-SWA forward with every level's band in the CPU flash kernel (level 0 in the native
    kernel where available): (out [B, H, N, D], lse [B, H, N], padded level-0 keys and values, or
    None when the native kernel ran level 0)."""
    kernel = _native_level0(q, plan)
    if kernel is not None:
        return (*_native_forward(kernel, q, k, v, plan, scale), None, None)
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
        if kp is None:
            dq, dk, dv = _native_backward(band_kernel(), grad_out, q, k, v, out, lse, plan, scale)
            return dq, dk, dv, None, None
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


