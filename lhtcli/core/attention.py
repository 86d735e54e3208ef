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
  the fastest below a few hundred tokens on CPU with the native kernels (about 1.3k without).
* ``flex`` - FlexAttention over "extended keys" (one copy of each boundary token's key appended
  after the sequence, so hierarchical links land in a few extra key blocks), for CUDA.
* ``auto`` - dense up to a crossover length, compact above: :data:`DENSE_AUTO_MAX_LEN` tokens for
  wide token windows, less for narrow ones (see :func:`dense_crossover`).

Tensor layout: every public attention function of :mod:`lhtcli.core` takes and returns token-major
tensors, ``q, k, v: [B, N, H, D]`` (batch, tokens, heads, head size): :func:`mlswa_attention` and
the probes of :mod:`lhtcli.core.probing` (``mlswa_attention_probs`` -> ``[B, R, H, N]``,
``mlswa_row_stats`` / ``mlswa_attention_entropy`` -> ``[B, N, H]``, ``mlswa_level_mass`` ->
``[B, N, H, L]``), and the model's ``LayerCapture.q`` / ``.k``. The token axis always comes before
the head axis. The kernels below (:func:`compact_attention`, :func:`fast_compact_attention`,
:class:`MLSWAContext`) are head-major ``[B, H, N, D]`` building blocks, not the public API.

Plans (indices and band masks) depend only on the document structure: :class:`MLSWAContext` builds
one per batch and ``max_level`` and shares it across layers and heads.

This module is the public entry point and the dispatch; the implementations live beside it:
:mod:`lhtcli.core.plan`, :mod:`lhtcli.core.compact` (explicit), :mod:`lhtcli.core.flash` (fast),
:mod:`lhtcli.core.dense` and :mod:`lhtcli.core.flex`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lhtcli.core import native
from lhtcli.core.compact import AttentionResult, compact_attention
from lhtcli.core.dense import DenseMask, dense_attention, dense_sdpa_attention
from lhtcli.core.flash import fast_compact_attention, flash_available, flash_compact_result, prepare_plan
from lhtcli.core.flex import build_flex_plan, flex_compact_attention
from lhtcli.core.plan import MLSWAPlan, build_mlswa_plan
from lhtcli.core.positions import HierarchicalPositions

# auto runs dense up to this many tokens: one masked SDPA call beats the banded kernels below the
# crossover measured on CPU by benchmarks/attention.py (dense is faster at 1024, compact at 1536).
DENSE_AUTO_MAX_LEN = 1280
# Narrow token windows make the compact path cheaper per token while dense stays quadratic: measured
# crossovers are ~5 windows at w=256 and ~20 windows at w=32 (between 512 and 1024 tokens), so auto
# keeps dense up to DENSE_PER_WINDOW windows, clamped to [DENSE_AUTO_MIN_LEN, DENSE_AUTO_MAX_LEN].
DENSE_PER_WINDOW = 20
DENSE_AUTO_MIN_LEN = 512
# With the native CPU kernels (core/native.py) the compact path wins much earlier, and earlier still
# for batches (dense's cost grows with B N^2, the compact path's per-call overhead does not). Measured
# crossovers per layer f+b (ML-SWA windows w, 16-64 heads x dims): one sequence ~280 tokens at w=32 to
# ~470 at w=256; batches of 8 ~130 at w=32 to ~230 at w=256. auto keeps dense up to
# (NATIVE_DENSE_BASE + w) / sqrt(B) tokens, at least NATIVE_DENSE_MIN_LEN.
NATIVE_DENSE_BASE = 256
NATIVE_DENSE_MIN_LEN = 128
BACKENDS = ("auto", "dense", "compact", "flex")


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def dense_crossover(token_window: int | None = None, native_kernel: bool = False, batch_size: int = 1) -> int:
    """Longest sequence ``auto`` runs dense for this level-0 window (None: a wide window), with or
    without the native CPU kernels, for batches of ``batch_size`` sequences."""
    if token_window is None:
        return DENSE_AUTO_MAX_LEN
    if native_kernel:
        reach = (NATIVE_DENSE_BASE + int(token_window)) / math.sqrt(max(batch_size, 1))
        return max(NATIVE_DENSE_MIN_LEN, min(DENSE_AUTO_MAX_LEN, int(reach)))
    return max(DENSE_AUTO_MIN_LEN, min(DENSE_AUTO_MAX_LEN, DENSE_PER_WINDOW * int(token_window)))


def choose_backend(
    seq_len: int,
    device: torch.device | str,
    requested: str = "auto",
    token_window: int | None = None,
    native_kernel: bool | None = None,
    batch_size: int = 1,
) -> str:
    """The backend that runs: ``requested``, or for ``auto`` dense on short sequences and compact above
    (the crossover depends on the token window and, on CPU, on whether the native level-0 kernel is
    built, and on the batch size, see :func:`dense_crossover`; ``native_kernel`` overrides that check)."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r} (expected one of {', '.join(BACKENDS)})")
    if requested != "auto":
        return requested
    if native_kernel is None:
        native_kernel = torch.device(device).type == "cpu" and native.ready()
    return "dense" if seq_len <= dense_crossover(token_window, native_kernel, batch_size) else "compact"


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
    chosen = choose_backend(q.shape[1], q.device, backend, token_window=int(window_size_per_level[0]),
                            batch_size=q.shape[0])
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
                                      token_window=self.windows[0], batch_size=self.positions.batch_size)
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


__all__ = [
    "BACKENDS",
    "DENSE_AUTO_MAX_LEN",
    "AttentionResult",
    "DenseMask",
    "MLSWAContext",
    "MLSWAPlan",
    "build_flex_plan",
    "build_mlswa_plan",
    "choose_backend",
    "compact_attention",
    "dense_attention",
    "dense_crossover",
    "dense_sdpa_attention",
    "fast_compact_attention",
    "flash_available",
    "flash_compact_result",
    "flex_compact_attention",
    "mlswa_attention",
    "prepare_plan",
]
