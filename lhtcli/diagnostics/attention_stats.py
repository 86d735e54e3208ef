"""Attention statistics of a model: entropy per layer and head, per-level mass, heatmap data.

Everything is computed from a forward pass with ``capture=True`` (rotated queries and keys per
layer) through the exact probes of :mod:`lhtcli.core.probing`, in float64.

Definitions (DESIGN.md section 5):

* entropy of a query row: ``-sum_k p log p`` in nats over its allowed keys; statistics (mean, std,
  min, max) are over the real (non-padding) query rows, pooled over heads for a layer;
* normalised entropy: entropy / log(#allowed keys). A row with a single allowed key has no
  uncertainty to normalise (0 / log 1); such rows are **excluded** from the normalised mean (which
  is ``None`` when no row qualifies);
* level mass: the share of a row's probability arriving through the pairs each level adds
  (0 tokens, 1 sentences, 2 sections; the ``[DOC]`` links count in the top level), averaged over
  real rows;
* flags on a mean entropy: < 1.0 "focused (possible collapse)", > 2.0 "diffuse".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lhtcli.core.attention import MLSWAPlan, build_mlswa_plan
from lhtcli.core.mask import pair_level_map
from lhtcli.core.positions import HierarchicalPositions
from lhtcli.core.probing import mlswa_attention_probs, mlswa_row_stats

if TYPE_CHECKING:
    from lhtcli.model import LayerCapture

FOCUSED_BELOW = 1.0
DIFFUSE_ABOVE = 2.0
LEVEL_NAMES = ("tokens", "sentences", "sections")
FLAG_TEXT = {"focused": "focused (possible collapse)", "diffuse": "diffuse"}
INTERPRETATION = (
    f"entropy in nats: < {FOCUSED_BELOW:g} very focused (possible collapse), > {DIFFUSE_ABOVE:g} diffuse, "
    "1.5-2.5 typical; normalised entropy (entropy / log #allowed keys) compares rows fairly"
)


def entropy_flag(value: float | None) -> str | None:
    """ "focused" below 1.0 nats, "diffuse" above 2.0, else None."""
    if value is None or math.isnan(value):
        return None
    if value < FOCUSED_BELOW:
        return "focused"
    if value > DIFFUSE_ABOVE:
        return "diffuse"
    return None


def level_name(level: int) -> str:
    return LEVEL_NAMES[level] if level < len(LEVEL_NAMES) else f"level {level}"


@dataclass
class EntropyStats:
    """Entropy statistics of one layer (pooled over heads), one head, or the whole model."""

    mean: float
    std: float
    min: float
    max: float
    normalized_mean: float | None
    level_mass: list[float]
    num_queries: int

    @property
    def flag(self) -> str | None:
        return entropy_flag(self.mean)

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "normalized_mean": self.normalized_mean,
            "level_mass": list(self.level_mass),
            "num_queries": self.num_queries,
            "flag": self.flag,
        }


@dataclass
class LayerEntropy:
    layer: int
    max_level: int
    stats: EntropyStats
    heads: list[EntropyStats]

    def to_json(self, per_head: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {"layer": self.layer, "max_level": self.max_level, **self.stats.to_json()}
        if per_head:
            data["heads"] = [{"head": h, **s.to_json()} for h, s in enumerate(self.heads)]
        return data


@dataclass
class EntropyReport:
    layers: list[LayerEntropy]
    overall: EntropyStats
    num_levels: int
    num_sequences: int

    def to_json(self, per_head: bool = True) -> dict[str, Any]:
        """JSON-ready dict: ``units, interpretation, thresholds, levels, num_sequences, overall, layers``."""
        return {
            "units": "nats",
            "interpretation": INTERPRETATION,
            "thresholds": {"focused_below": FOCUSED_BELOW, "diffuse_above": DIFFUSE_ABOVE},
            "levels": [level_name(lvl) for lvl in range(self.num_levels)],
            "num_sequences": self.num_sequences,
            "overall": self.overall.to_json(),
            "layers": [layer.to_json(per_head) for layer in self.layers],
        }

    def scalars(self) -> dict[str, float]:
        """The scalars a training run logs (DESIGN.md section 5)."""
        values: dict[str, float] = {
            "attention/entropy_mean": self.overall.mean,
            "attention/entropy_std": self.overall.std,
            "attention/entropy_min": self.overall.min,
            "attention/entropy_max": self.overall.max,
        }
        if self.overall.normalized_mean is not None:
            values["attention/entropy_normalized_mean"] = self.overall.normalized_mean
        for layer in self.layers:
            values[f"attention_entropy/layer_{layer.layer}_mean"] = layer.stats.mean
            values[f"attention_entropy/layer_{layer.layer}_std"] = layer.stats.std
        for level, mass in enumerate(self.overall.level_mass):
            values[f"attention/level_mass_{level}"] = mass
        return values

    def warnings(self) -> list[str]:
        """One line per layer whose mean entropy is flagged."""
        lines = []
        for layer in self.layers:
            flag = layer.stats.flag
            if flag is not None:
                lines.append(
                    f"layer {layer.layer}: mean attention entropy {layer.stats.mean:.3f} nats, "
                    f"{FLAG_TEXT[flag]}"
                )
        return lines


@dataclass
class _Moments:
    """Running sums over query rows (float64 Python numbers)."""

    num_levels: int
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    norm_total: float = 0.0
    norm_count: int = 0
    mass: list[float] = field(default_factory=list)

    def add(self, entropy: torch.Tensor, normalized: torch.Tensor, mass: torch.Tensor) -> None:
        """entropy [R], normalised [R] (NaN = excluded), mass [R, L] of real rows."""
        if not self.mass:
            self.mass = [0.0] * self.num_levels
        if entropy.numel() == 0:
            return
        self.count += entropy.numel()
        self.total += float(entropy.sum())
        self.total_sq += float((entropy * entropy).sum())
        self.low = min(self.low, float(entropy.min()))
        self.high = max(self.high, float(entropy.max()))
        valid = ~torch.isnan(normalized)
        self.norm_total += float(normalized[valid].sum())
        self.norm_count += int(valid.sum())
        sums = mass.sum(0).tolist()
        self.mass = [a + b for a, b in zip(self.mass, sums, strict=True)]

    def merge(self, other: _Moments) -> None:
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)
        self.norm_total += other.norm_total
        self.norm_count += other.norm_count
        other_mass = other.mass or [0.0] * self.num_levels
        self.mass = [a + b for a, b in zip(self.mass or [0.0] * self.num_levels, other_mass, strict=True)]

    def stats(self) -> EntropyStats:
        if self.count == 0:
            nan = float("nan")
            return EntropyStats(nan, nan, nan, nan, None, [0.0] * self.num_levels, 0)
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        normalized = self.norm_total / self.norm_count if self.norm_count else None
        mass = [m / self.count for m in (self.mass or [0.0] * self.num_levels)]
        return EntropyStats(mean, math.sqrt(var), self.low, self.high, normalized, mass, self.count)


class EntropyAccumulator:
    """Collects per-row entropy statistics over one or more captured forward passes."""

    def __init__(self, window_size_per_level: Sequence[int]) -> None:
        self.windows = [int(w) for w in window_size_per_level]
        self.num_levels = len(self.windows)
        self._heads: dict[int, list[_Moments]] = {}
        self._max_level: dict[int, int] = {}
        self.num_sequences = 0

    def add(self, captures: Sequence[LayerCapture], positions: HierarchicalPositions) -> None:
        positions = positions.batched()
        if not captures:
            raise ValueError("no layer captures: run the model with capture=True")
        positions = positions.to(captures[0].q.device)
        real = positions.real_mask  # [B, N]
        plans: dict[int, MLSWAPlan] = {}
        for cap in captures:
            if cap.max_level not in plans:
                plans[cap.max_level] = build_mlswa_plan(positions, self.windows, cap.max_level)
            stats = mlswa_row_stats(
                cap.q, cap.k, positions, self.windows, cap.max_level, plan=plans[cap.max_level]
            )
            normalized = stats.normalized_entropy
            heads = self._heads.setdefault(
                cap.layer, [_Moments(self.num_levels) for _ in range(cap.q.shape[2])]
            )
            self._max_level[cap.layer] = cap.max_level
            entropy, normalized, mass = stats.entropy[real], normalized[real], stats.level_mass[real]
            for h, moments in enumerate(heads):
                moments.add(entropy[:, h], normalized[:, h], mass[:, h])
        self.num_sequences += positions.batch_size

    def report(self) -> EntropyReport:
        if not self._heads:
            raise ValueError("no attention statistics collected yet")
        layers = []
        overall = _Moments(self.num_levels)
        for layer in sorted(self._heads):
            pooled = _Moments(self.num_levels)
            for moments in self._heads[layer]:
                pooled.merge(moments)
            overall.merge(pooled)
            heads = [m.stats() for m in self._heads[layer]]
            layers.append(LayerEntropy(layer, self._max_level[layer], pooled.stats(), heads))
        return EntropyReport(layers, overall.stats(), self.num_levels, self.num_sequences)


def capture_attention(
    model: torch.nn.Module, input_ids: torch.Tensor, positions: HierarchicalPositions
) -> list[LayerCapture]:
    """One forward pass in eval mode without gradients, keeping each layer's rotated q and k.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(input_ids, positions, capture=True).captures
    finally:
        model.train(was_training)


def entropy_report(
    model: torch.nn.Module,
    batches: Sequence[tuple[torch.Tensor, HierarchicalPositions]],
) -> EntropyReport:
    """Entropy statistics of ``model`` over (input_ids, positions) batches."""
    windows = model.cfg.mlswa.window_size_per_level
    acc = EntropyAccumulator(windows)
    for input_ids, positions in batches:
        acc.add(capture_attention(model, input_ids, positions), positions)
    return acc.report()


@dataclass
class AttentionMap:
    """Exact attention of one layer on a square window of one sequence, ready to draw."""

    layer: int
    head: int | None  # None = mean over heads
    start: int
    probs: torch.Tensor  # [R, R] float32: rows = queries start.., columns = keys start..
    levels: torch.Tensor  # [R, R] int8 pair-level codes (0..2, 3 = [DOC] link, -1 masked)
    tokens: list[str]
    sentence_starts: list[int]  # indices (relative to ``start``) where a sentence begins
    section_starts: list[int]
    num_levels: int
    max_level: int

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "head": self.head,
            "start": self.start,
            "tokens": self.tokens,
            "probs": self.probs.tolist(),
            "levels": self.levels.tolist(),
            "sentence_starts": self.sentence_starts,
            "section_starts": self.section_starts,
        }


def attention_map(
    capture: LayerCapture,
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    tokens: Sequence[str] | None = None,
    *,
    sample: int = 0,
    start: int = 0,
    max_tokens: int = 60,
    head: int | None = None,
) -> AttentionMap:
    """Exact probabilities of queries ``start .. start+max_tokens`` over the same keys (one sequence).

    The softmax is normalised over all keys of the sequence; only the square window is kept. Padding
    at the end of the sequence is cut off.
    """
    positions = positions.batched()
    one = positions[sample : sample + 1].to(capture.q.device)
    length = int(one.real_mask.sum())
    if not 0 <= start < max(length, 1):
        raise ValueError(f"start={start} is outside the sequence of {length} tokens")
    stop = min(start + max_tokens, length)
    rows = torch.arange(start, stop, device=capture.q.device)
    q = capture.q[sample : sample + 1]
    k = capture.k[sample : sample + 1]
    heads = q.shape[2]
    if head is not None:
        if not 0 <= head < heads:
            raise ValueError(f"head must be between 0 and {heads - 1}, got {head}")
        q, k = q[:, :, head : head + 1], k[:, :, head : head + 1]
    windows = [int(w) for w in window_size_per_level]
    probs = mlswa_attention_probs(q, k, one, windows, capture.max_level, rows=rows)  # [1, R, H, N]
    probs = probs[0].mean(1)[:, start:stop].float().cpu()
    levels = pair_level_map(one, windows, capture.max_level, rows=rows)[0][:, start:stop].cpu()
    if tokens is None:
        shown = [str(i) for i in range(start, stop)]
    else:
        shown = [str(t) for t in list(tokens)[start:stop]]
        shown += [str(i) for i in range(start + len(shown), stop)]
    enums = [e[0, start:stop].tolist() for e in one.level_enums]
    sentence_starts = [i for i, v in enumerate(enums[1]) if v] if len(enums) > 1 else []
    section_starts = [i for i, v in enumerate(enums[2]) if v] if len(enums) > 2 else []
    return AttentionMap(
        capture.layer,
        head,
        start,
        probs,
        levels,
        shown,
        sentence_starts,
        section_starts,
        len(windows),
        capture.max_level,
    )


__all__ = [
    "DIFFUSE_ABOVE",
    "FLAG_TEXT",
    "FOCUSED_BELOW",
    "INTERPRETATION",
    "AttentionMap",
    "EntropyAccumulator",
    "EntropyReport",
    "EntropyStats",
    "LayerEntropy",
    "attention_map",
    "capture_attention",
    "entropy_flag",
    "entropy_report",
    "level_name",
]
