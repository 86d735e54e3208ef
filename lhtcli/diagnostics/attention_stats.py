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
* hierarchy usage of level l: of the real rows that *have* a level-l link (a key that only level l,
  or for the top level the ``[DOC]`` rule, allows), the mean share of attention through those links;
* attention sinks: the share of a row's attention on the first ``SINK_TOKENS`` keys (``[DOC]``/[CLS]
  and the first tokens), averaged over the rows that may attend at least one of them;
* max logit: the largest scaled attention score ``q.k / sqrt(d)`` over allowed pairs;
* health is judged on the normalised entropy, never on absolute nats (a row of an ML-SWA layer may
  see 65 or 513 keys, where 4-6 nats is ordinary): below ``FOCUSED_BELOW`` the attention is
  focused on about one key (possible collapse), above ``UNIFORM_ABOVE`` it is near-uniform (the
  scores ignore content, as with random weights). Between two reports of one model (two
  checkpoints, or two logging steps of a run) a fall of the normalised entropy to less than
  ``COLLAPSE_RATIO`` of its earlier value is a collapse (the sharp fall that work on attention-entropy
  collapse observes before training diverges).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lhtcli.core.attention import MLSWAPlan, build_mlswa_plan
from lhtcli.core.mask import pair_level_map
from lhtcli.core.pairs import mlswa_pair_stats
from lhtcli.core.positions import HierarchicalPositions
from lhtcli.core.probing import mlswa_attention_probs, mlswa_row_stats

if TYPE_CHECKING:
    from lhtcli.model import LayerCapture

# Thresholds on the normalised entropy (entropy / log #allowed keys), so that they mean the same
# for a 65-key and a 513-key row. 0.1 leaves about n**0.1 effective keys (1.5 of 65, 1.9 of 513): one
# key takes nearly everything. 0.98 is within 2% of the uniform distribution's entropy.
FOCUSED_BELOW = 0.1
UNIFORM_ABOVE = 0.98
COLLAPSE_RATIO = 0.5  # a later normalised entropy below half of an earlier one is a collapse
SINK_TOKENS = 4  # [DOC]/[CLS] and the first three tokens
LEVEL_NAMES = ("tokens", "sentences", "sections")
FLAG_TEXT = {
    "focused": "focused on about one key (possible collapse)",
    "uniform": "near-uniform (scores ignore content)",
    "collapse": "collapsed (normalised entropy fell sharply)",
}
INTERPRETATION = (
    f"health is judged on normalised entropy (entropy / log #allowed keys, 0..1): < {FOCUSED_BELOW:g} "
    f"focused on about one key (possible collapse), > {UNIFORM_ABOVE:g} near-uniform; a fall to less than "
    f"{COLLAPSE_RATIO:g}x an earlier value is a collapse. Absolute nats depend on the window: an ML-SWA "
    "row sees dozens to hundreds of keys, where 3-6 nats is ordinary"
)


def entropy_flag(normalized: float | None) -> str | None:
    """ "focused" below ``FOCUSED_BELOW`` normalised entropy, "uniform" above ``UNIFORM_ABOVE``, else None."""
    if normalized is None or math.isnan(normalized):
        return None
    if normalized < FOCUSED_BELOW:
        return "focused"
    if normalized > UNIFORM_ABOVE:
        return "uniform"
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
    sink_share: float | None = None  # mean over rows that can see a sink key
    max_logit: float | None = None
    hierarchy_usage: list[float | None] = field(default_factory=list)  # per level, over linked rows
    linked_queries: list[int] = field(default_factory=list)  # per level: rows with such a link
    # per level, over the same rows: the share uniform attention would give those links (#links / #keys)
    hierarchy_uniform: list[float | None] = field(default_factory=list)

    @property
    def flag(self) -> str | None:
        return entropy_flag(self.normalized_mean)

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
            "sink_share": self.sink_share,
            "max_logit": self.max_logit,
            "hierarchy_usage": list(self.hierarchy_usage),
            "linked_queries": list(self.linked_queries),
            "hierarchy_uniform": list(self.hierarchy_uniform),
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
            "thresholds": {
                "on": "normalized_mean",
                "focused_below": FOCUSED_BELOW,
                "uniform_above": UNIFORM_ABOVE,
                "collapse_ratio": COLLAPSE_RATIO,
                "sink_tokens": SINK_TOKENS,
            },
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
            i = layer.layer
            values[f"attention_entropy/layer_{i}_mean"] = layer.stats.mean
            values[f"attention_entropy/layer_{i}_std"] = layer.stats.std
            if layer.stats.normalized_mean is not None:
                values[f"attention_entropy/layer_{i}_normalized"] = layer.stats.normalized_mean
            if layer.stats.sink_share is not None:
                values[f"attention_sinks/layer_{i}"] = layer.stats.sink_share
            if layer.stats.max_logit is not None:
                values[f"attention_logits/layer_{i}_max"] = layer.stats.max_logit
            for level in range(1, self.num_levels):
                usage = layer.stats.hierarchy_usage[level] if level < len(layer.stats.hierarchy_usage) else None
                if usage is not None:
                    values[f"hierarchy_usage/layer_{i}_{level_name(level)}"] = usage
                    base = layer.stats.hierarchy_uniform[level]
                    if base:  # > 1: the layer prefers these links over what uniform attention gives them
                        values[f"hierarchy_usage/layer_{i}_{level_name(level)}_vs_uniform"] = usage / base
        for level, mass in enumerate(self.overall.level_mass):
            values[f"attention/level_mass_{level}"] = mass
        return values

    def warnings(self, random_weights: bool = False) -> list[str]:
        """One line per layer whose pooled normalised entropy is flagged.

        A single head that is focused (a previous-token or sink head) or near-uniform (an averaging
        head) can be a healthy specialisation, so heads are marked in the per-head table, not alarmed;
        a whole layer focused or near-uniform is not (and a head's sharp fall is, see
        :func:`collapse_warnings`)."""
        lines = []
        hint = " (expected for random weights)" if random_weights else ""
        for layer in self.layers:
            flag = layer.stats.flag
            if flag is not None:
                lines.append(
                    f"layer {layer.layer}: normalised attention entropy {layer.stats.normalized_mean:.3f} "
                    f"({layer.stats.mean:.2f} nats), {FLAG_TEXT[flag]}{hint}"
                )
        return lines

    def flagged_heads(self) -> list[tuple[int, int, str]]:
        """(layer, head, flag) of every head whose normalised entropy is flagged (informational)."""
        return [
            (layer.layer, h, head.flag)
            for layer in self.layers
            for h, head in enumerate(layer.heads)
            if head.flag is not None
        ]


@dataclass
class HeadChange:
    """How one layer (head None) or head changed between two reports."""

    layer: int
    head: int | None
    before: EntropyStats
    after: EntropyStats

    @property
    def collapsed(self) -> bool:
        a, b = self.before.normalized_mean, self.after.normalized_mean
        return a is not None and b is not None and a > 0 and b < COLLAPSE_RATIO * a

    def delta(self, key: str) -> float | None:
        a, b = getattr(self.before, key), getattr(self.after, key)
        return None if a is None or b is None else b - a

    def to_json(self) -> dict[str, Any]:
        keys = ("mean", "normalized_mean", "sink_share", "max_logit")
        data: dict[str, Any] = {"layer": self.layer, "head": self.head, "collapsed": self.collapsed}
        for key in keys:
            data[key] = {"before": getattr(self.before, key), "after": getattr(self.after, key),
                         "delta": self.delta(key)}
        data["hierarchy_usage"] = {
            "before": list(self.before.hierarchy_usage),
            "after": list(self.after.hierarchy_usage),
        }
        return data


def compare_reports(before: EntropyReport, after: EntropyReport) -> list[HeadChange]:
    """Per layer (head None) and per head, in layer order; layers missing from either report are skipped."""
    earlier = {layer.layer: layer for layer in before.layers}
    changes = []
    for layer in after.layers:
        old = earlier.get(layer.layer)
        if old is None:
            continue
        changes.append(HeadChange(layer.layer, None, old.stats, layer.stats))
        for h, (a, b) in enumerate(zip(old.heads, layer.heads, strict=False)):
            changes.append(HeadChange(layer.layer, h, a, b))
    return changes


def collapse_warnings(changes: Sequence[HeadChange], before: str = "before", after: str = "now") -> list[str]:
    lines = []
    collapsed_layers = {c.layer for c in changes if c.head is None and c.collapsed}
    for c in changes:
        if not c.collapsed or (c.head is not None and c.layer in collapsed_layers):
            continue
        where = f"layer {c.layer}" + ("" if c.head is None else f" head {c.head}")
        lines.append(
            f"{where}: normalised attention entropy fell from {c.before.normalized_mean:.3f} ({before}) to "
            f"{c.after.normalized_mean:.3f} ({after}), {FLAG_TEXT['collapse']}"
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
    sink_total: float = 0.0
    sink_count: int = 0
    top_logit: float = -math.inf
    usage_total: list[float] = field(default_factory=list)
    usage_count: list[int] = field(default_factory=list)
    uniform_total: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mass = self.mass or [0.0] * self.num_levels
        self.usage_total = self.usage_total or [0.0] * self.num_levels
        self.usage_count = self.usage_count or [0] * self.num_levels
        self.uniform_total = self.uniform_total or [0.0] * self.num_levels

    def add(
        self,
        entropy: torch.Tensor,
        normalized: torch.Tensor,
        mass: torch.Tensor,
        linked: torch.Tensor | None = None,
        uniform: torch.Tensor | None = None,
        sink: torch.Tensor | None = None,
        sink_visible: torch.Tensor | None = None,
        max_logit: torch.Tensor | None = None,
    ) -> None:
        """entropy [R], normalised [R] (NaN = excluded), mass [R, L] of real rows; optionally ``linked``
        [R, L] bool (the row has a link of that level) with ``uniform`` [R, L] (the share of the row's keys
        each level adds), sink mass [R] with its visibility [R] bool, and the rows' max logits [R]."""
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
        self.mass = [a + b for a, b in zip(self.mass, mass.sum(0).tolist(), strict=True)]
        if linked is not None:
            used = torch.where(linked, mass, torch.zeros_like(mass)).sum(0).tolist()
            self.usage_total = [a + b for a, b in zip(self.usage_total, used, strict=True)]
            self.usage_count = [a + int(b) for a, b in zip(self.usage_count, linked.sum(0).tolist(), strict=True)]
            if uniform is not None:
                base = torch.where(linked, uniform, torch.zeros_like(uniform)).sum(0).tolist()
                self.uniform_total = [a + b for a, b in zip(self.uniform_total, base, strict=True)]
        if sink is not None and sink_visible is not None:
            self.sink_total += float(sink[sink_visible].sum())
            self.sink_count += int(sink_visible.sum())
        if max_logit is not None:
            self.top_logit = max(self.top_logit, float(max_logit.max()))

    def merge(self, other: _Moments) -> None:
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)
        self.norm_total += other.norm_total
        self.norm_count += other.norm_count
        self.mass = [a + b for a, b in zip(self.mass, other.mass, strict=True)]
        self.sink_total += other.sink_total
        self.sink_count += other.sink_count
        self.top_logit = max(self.top_logit, other.top_logit)
        self.usage_total = [a + b for a, b in zip(self.usage_total, other.usage_total, strict=True)]
        self.usage_count = [a + b for a, b in zip(self.usage_count, other.usage_count, strict=True)]
        self.uniform_total = [a + b for a, b in zip(self.uniform_total, other.uniform_total, strict=True)]

    def stats(self) -> EntropyStats:
        if self.count == 0:
            nan = float("nan")
            return EntropyStats(nan, nan, nan, nan, None, [0.0] * self.num_levels, 0)
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        normalized = self.norm_total / self.norm_count if self.norm_count else None
        mass = [m / self.count for m in self.mass]
        usage = [t / c if c else None for t, c in zip(self.usage_total, self.usage_count, strict=True)]
        return EntropyStats(
            mean,
            math.sqrt(var),
            self.low,
            self.high,
            normalized,
            mass,
            self.count,
            sink_share=self.sink_total / self.sink_count if self.sink_count else None,
            max_logit=self.top_logit if math.isfinite(self.top_logit) else None,
            hierarchy_usage=usage,
            linked_queries=list(self.usage_count),
            hierarchy_uniform=[t / c if c else None for t, c in zip(self.uniform_total, self.usage_count, strict=True)],
        )


class EntropyAccumulator:
    """Collects per-row entropy statistics over one or more captured forward passes.

    ``pair_stats`` adds the attention-sink share and max logit (one more linear pass over the
    allowed pairs of every layer, :func:`lhtcli.core.pairs.mlswa_pair_stats`).
    """

    def __init__(self, window_size_per_level: Sequence[int], pair_stats: bool = True) -> None:
        self.windows = [int(w) for w in window_size_per_level]
        self.num_levels = len(self.windows)
        self.pair_stats = pair_stats
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
            heads = self._heads.setdefault(
                cap.layer, [_Moments(self.num_levels) for _ in range(cap.q.shape[2])]
            )
            self._max_level[cap.layer] = cap.max_level
            entropy, normalized, mass = stats.entropy[real], stats.normalized_entropy[real], stats.level_mass[real]
            assert stats.level_key_counts is not None
            level_counts = stats.level_key_counts[real].to(torch.float64)  # [R, L]
            linked = level_counts > 0
            uniform = level_counts / stats.key_counts[real].to(torch.float64).clamp(min=1)[:, None]
            sink = visible = top = None
            if self.pair_stats:
                pair = mlswa_pair_stats(
                    cap.q, cap.k, positions, self.windows, cap.max_level, lse=stats.lse, sink_tokens=SINK_TOKENS
                )
                sink, visible, top = pair.sink_mass[real], pair.sink_visible[real], pair.max_logit[real]
            for h, moments in enumerate(heads):
                moments.add(
                    entropy[:, h],
                    normalized[:, h],
                    mass[:, h],
                    linked,
                    uniform,
                    None if sink is None else sink[:, h],
                    visible,
                    None if top is None else top[:, h],
                )
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
    "COLLAPSE_RATIO",
    "FLAG_TEXT",
    "FOCUSED_BELOW",
    "INTERPRETATION",
    "SINK_TOKENS",
    "UNIFORM_ABOVE",
    "AttentionMap",
    "EntropyAccumulator",
    "EntropyReport",
    "EntropyStats",
    "HeadChange",
    "LayerEntropy",
    "collapse_warnings",
    "compare_reports",
    "attention_map",
    "capture_attention",
    "entropy_flag",
    "entropy_report",
    "level_name",
]
