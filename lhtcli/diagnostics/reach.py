"""Long-range reachability through the ML-SWA mask graph (DESIGN.md section 3).

Information from a source token reaches query q in layer k when q may attend a key that holds it:
``reached_k = reached_{k-1} | {q : some allowed key of q (with layer k's max level) is reached}``.
This depends on the mask alone, not on weights: it is what the hierarchy *can* carry, layer by
layer, next to what a token window alone would carry (every layer at level 0).

One step is an exact attention pass with zero scores and the reached indicator as values (the
output is the share of a row's allowed keys that are reached, > 0 iff one is), through the same
linear-memory plans the model uses: no N x N tensor at any length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lhtcli.core.attention import build_mlswa_plan, compact_attention
from lhtcli.core.positions import HierarchicalPositions


@dataclass
class Reachability:
    sources: list[int]
    labels: list[str]  # a short name per source
    layers: list[int]  # each layer's max level
    reached: torch.Tensor  # [S, L, N] bool: reached after layer k (k = 0..L-1)
    window_only: torch.Tensor  # [S, L] int64: tokens reached with the token window alone
    num_tokens: int

    def counts(self) -> torch.Tensor:
        return self.reached.sum(-1)  # [S, L]

    def farthest(self) -> list[list[int]]:
        """Largest distance (in tokens) from each source reached after each layer."""
        idx = torch.arange(self.reached.shape[-1])
        result = []
        for s, source in enumerate(self.sources):
            dist = (idx - source).abs()
            result.append([int(torch.where(r, dist, torch.zeros_like(dist)).max()) for r in self.reached[s]])
        return result

    def layers_to_reach_all(self) -> list[int | None]:
        """Per source: how many layers until every token is reached (None if the model is too shallow)."""
        out = []
        for counts in self.counts().tolist():
            full = [k + 1 for k, c in enumerate(counts) if c >= self.num_tokens]
            out.append(full[0] if full else None)
        return out

    def to_json(self) -> dict[str, Any]:
        counts = self.counts().tolist()
        far = self.farthest()
        window = self.window_only.tolist()
        return {
            "num_tokens": self.num_tokens,
            "layer_max_level": self.layers,
            "sources": [
                {
                    "token": source,
                    "label": self.labels[s],
                    "reached": counts[s],
                    "farthest": far[s],
                    "window_only_reached": window[s],
                    "layers_to_reach_all": self.layers_to_reach_all()[s],
                }
                for s, source in enumerate(self.sources)
            ],
        }


def _spread(reached: torch.Tensor, plan) -> torch.Tensor:
    """One layer: [N, S] bool -> [N, S] bool (a row is reached when any allowed key is)."""
    n, s = reached.shape
    zeros = torch.zeros(1, 1, n, s, dtype=torch.float64, device=reached.device)  # all scores 0
    values = reached.to(torch.float64)[None, None]  # [1, 1, N, S]
    share = compact_attention(zeros, zeros, values, plan, scale=1.0).out[0, 0]
    return reached | (share > 0)


def reachability(
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    layer_max_levels: Sequence[int],
    sources: Sequence[int],
    labels: Sequence[str] | None = None,
) -> Reachability:
    """Tokens reached from each source after every layer of a model with these per-layer max levels
    (one sequence; padding is never reached)."""
    positions = positions.batched()
    if positions.batch_size != 1:
        raise ValueError("reachability is computed for one sequence at a time")
    n = int(positions.real_mask.sum())
    positions = positions[0:1]
    windows = [int(w) for w in window_size_per_level]
    for source in sources:
        if not 0 <= source < n:
            raise ValueError(f"source token {source} is outside the sequence of {n} tokens")
    plans: dict[int, Any] = {}

    def plan(level: int):
        if level not in plans:
            plans[level] = build_mlswa_plan(positions, windows, level)
        return plans[level]

    start = torch.zeros(positions.seq_len, len(sources), dtype=torch.bool)
    for s, source in enumerate(sources):
        start[source, s] = True
    hierarchical, window = start, start
    steps, window_counts = [], []
    for level in layer_max_levels:
        hierarchical = _spread(hierarchical, plan(int(level)))
        window = _spread(window, plan(0))
        steps.append(hierarchical.T.clone())
        window_counts.append(window.sum(0))
    reached = torch.stack(steps, 1)[:, :, :n]  # [S, L, N]
    names = list(labels) if labels is not None else [str(s) for s in sources]
    return Reachability(list(sources), names, [int(x) for x in layer_max_levels], reached,
                        torch.stack(window_counts, 1), n)


def default_sources(positions: HierarchicalPositions) -> list[int]:
    """[DOC] (when present), the middle token and the last token of the first sequence."""
    one = positions.batched()[0]
    n = int(one.real_mask.sum())
    picks = ([0] if one.has_doc_token else []) + [n // 2, n - 1]
    return list(dict.fromkeys(p for p in picks if 0 <= p < n))


__all__ = ["Reachability", "default_sources", "reachability"]
