"""Gradient health: per-parameter L2 norms grouped per layer and block kind (DESIGN.md section 5).

Call :func:`gradient_report` after ``backward()`` and before gradient clipping. A parameter is
*vanishing* below 1e-5, *exploding* above 10, *non-finite* when its gradient holds NaN or Inf, and
*missing* when it requires a gradient but got none. The report is healthy when none of these occur.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

VANISHING_BELOW = 1e-5
EXPLODING_ABOVE = 10.0
BLOCK_KINDS = ("embeddings", "attention", "mlp", "norms", "head")

_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)\.")


def classify_parameter(name: str) -> tuple[int | None, str]:
    """(layer index or None, block kind) of a parameter name of :class:`~lhtcli.model.LHTEncoder`."""
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match else None
    lowered = name.lower()
    if "embedding" in lowered:
        kind = "embeddings"
    elif lowered.startswith(("mlm_head", "head", "lm_head")):
        kind = "head"
    elif "attn" in lowered or "attention" in lowered:
        kind = "attention"
    elif "mlp" in lowered or "ffn" in lowered:
        kind = "mlp"
    elif "norm" in lowered or re.search(r"(^|\.)ln", lowered):
        kind = "norms"
    else:
        kind = "head" if layer is None else "mlp"
    return layer, kind


@dataclass
class ParamGradient:
    name: str
    layer: int | None
    kind: str
    numel: int
    norm: float | None  # None = no gradient; NaN/Inf kept as such

    @property
    def status(self) -> str:
        """ok | vanishing | exploding | nonfinite | missing."""
        if self.norm is None:
            return "missing"
        if not math.isfinite(self.norm):
            return "nonfinite"
        if self.norm < VANISHING_BELOW:
            return "vanishing"
        if self.norm > EXPLODING_ABOVE:
            return "exploding"
        return "ok"

    def to_json(self) -> dict[str, Any]:
        norm = self.norm
        shown: float | str | None = norm if norm is None or math.isfinite(norm) else str(norm)
        return {
            "name": self.name,
            "layer": self.layer,
            "kind": self.kind,
            "numel": self.numel,
            "norm": shown,
            "status": self.status,
        }


@dataclass
class GroupGradient:
    layer: int | None  # None: outside the blocks (embeddings, final norm, head)
    kind: str
    norm: float  # L2 norm over the group's finite gradients
    params: list[str]
    problems: list[str]  # names of its parameters that are not "ok"

    @property
    def label(self) -> str:
        return f"layer {self.layer} {self.kind}" if self.layer is not None else self.kind


@dataclass
class GradientReport:
    params: list[ParamGradient]
    total_norm: float  # over every finite gradient (NaN when any gradient is non-finite)

    def _names(self, status: str) -> list[str]:
        return [p.name for p in self.params if p.status == status]

    @property
    def vanishing(self) -> list[str]:
        return self._names("vanishing")

    @property
    def exploding(self) -> list[str]:
        return self._names("exploding")

    @property
    def nonfinite(self) -> list[str]:
        return self._names("nonfinite")

    @property
    def missing(self) -> list[str]:
        return self._names("missing")

    @property
    def healthy(self) -> bool:
        return all(p.status == "ok" for p in self.params)

    def groups(self) -> list[GroupGradient]:
        """Per layer and block kind: embeddings first, then each layer's blocks, then norms/head."""
        buckets: dict[tuple[int | None, str], list[ParamGradient]] = {}
        for p in self.params:
            buckets.setdefault((p.layer, p.kind), []).append(p)

        def order(key: tuple[int | None, str]) -> tuple[int, int, int]:
            layer, kind = key
            if layer is None:
                return (
                    0 if kind == "embeddings" else 2,
                    0,
                    BLOCK_KINDS.index(kind) if kind in BLOCK_KINDS else 9,
                )
            return (1, layer, BLOCK_KINDS.index(kind) if kind in BLOCK_KINDS else 9)

        groups = []
        for key in sorted(buckets, key=order):
            members = buckets[key]
            sq = sum(p.norm**2 for p in members if p.norm is not None and math.isfinite(p.norm))
            problems = [p.name for p in members if p.status != "ok"]
            groups.append(GroupGradient(key[0], key[1], math.sqrt(sq), [p.name for p in members], problems))
        return groups

    def flow(self) -> list[ParamGradient]:
        """The parameters a gradient-flow chart shows, embeddings first (their own group), then the
        blocks in model order, then the final norm and head."""
        def order(p: ParamGradient) -> int:
            if p.layer is not None:
                return 1
            return 0 if p.kind == "embeddings" else 2

        return sorted(self.params, key=order)  # stable: model order within each part

    def warnings(self) -> list[str]:
        lines = []
        if self.nonfinite:
            lines.append("NaN/Inf gradients in: " + ", ".join(self.nonfinite))
        if self.missing:
            lines.append("no gradient for: " + ", ".join(self.missing))
        if self.exploding:
            lines.append(f"exploding gradients (norm > {EXPLODING_ABOVE:g}) in: " + ", ".join(self.exploding))
        if self.vanishing:
            lines.append(f"vanishing gradients (norm < {VANISHING_BELOW:g}) in: " + ", ".join(self.vanishing))
        return lines

    def to_json(self) -> dict[str, Any]:
        """``healthy, total_norm, thresholds, vanishing, exploding, nonfinite, missing, groups, params``."""
        total = self.total_norm if math.isfinite(self.total_norm) else str(self.total_norm)
        return {
            "healthy": self.healthy,
            "total_norm": total,
            "thresholds": {"vanishing_below": VANISHING_BELOW, "exploding_above": EXPLODING_ABOVE},
            "vanishing": self.vanishing,
            "exploding": self.exploding,
            "nonfinite": self.nonfinite,
            "missing": self.missing,
            "groups": [
                {"layer": g.layer, "kind": g.kind, "norm": g.norm, "params": g.params, "problems": g.problems}
                for g in self.groups()
            ],
            "params": [p.to_json() for p in self.params],
        }


def parameter_gradient_norms(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
) -> list[ParamGradient]:
    """L2 norm of each trainable parameter's gradient (None where there is none)."""
    result = []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        layer, kind = classify_parameter(name)
        norm = None
        if param.grad is not None:
            norm = float(param.grad.detach().double().norm())
        result.append(ParamGradient(name, layer, kind, param.numel(), norm))
    return result


def gradient_report(model: torch.nn.Module) -> GradientReport:
    """Gradient norms of ``model``'s parameters (call after backward, before clipping)."""
    params = parameter_gradient_norms(model.named_parameters())
    norms = [p.norm for p in params if p.norm is not None]
    total = math.sqrt(sum(n * n for n in norms)) if norms else 0.0
    return GradientReport(params, total)


def report_from_norms(norms: dict[str, float | None]) -> GradientReport:
    """Rebuild a report from ``{name: norm}`` (what ``TrainingVisualizer.gradient_norms`` returns)."""
    params = []
    for name, norm in norms.items():
        layer, kind = classify_parameter(name)
        params.append(ParamGradient(name, layer, kind, 0, norm))
    finite = [n for n in norms.values() if n is not None]
    total = math.sqrt(sum(n * n for n in finite)) if finite else 0.0
    return GradientReport(params, total)


def compare_gradients(before: GradientReport, after: GradientReport) -> list[dict[str, Any]]:
    """Per group (embeddings, each layer's blocks, output): the L2 norm in both reports and their ratio,
    in the order of ``after``'s groups; a group missing from one report has None there."""
    earlier = {(g.layer, g.kind): g for g in before.groups()}
    rows = []
    for g in after.groups():
        old = earlier.get((g.layer, g.kind))
        a = old.norm if old is not None else None
        ratio = g.norm / a if a else None
        rows.append({"layer": g.layer, "kind": g.kind, "label": g.label, "before": a, "after": g.norm,
                     "ratio": ratio, "problems_after": g.problems})
    return rows


def attention_gradcheck(seed: int = 0) -> list[dict[str, Any]]:
    """Autograd vs finite differences of the exact ML-SWA attention, float64, tiny shapes.

    One case per ``max_level`` (0, 1, 2) on a padded batch with ``[DOC]``: ``torch.autograd.gradcheck``
    over q, k and v (fast mode: random projections), plus the largest relative error of a few
    random directional derivatives.
    Returns ``[{"name", "passed", "max_rel_error"}]``.
    """
    from lhtcli.core.attention import build_mlswa_plan, compact_attention
    from lhtcli.core.positions import HierarchicalPositions, positions_from_lengths

    positions = HierarchicalPositions.batch(
        [positions_from_lengths([[2, 3], [1, 2]]), positions_from_lengths([[3], [2]])]
    )
    windows = [2, 1, 1]
    gen = torch.Generator().manual_seed(seed)
    batch, heads, n, dim = positions.batch_size, 2, positions.seq_len, 3
    results = []
    for max_level in range(len(windows)):
        plan = build_mlswa_plan(positions, windows, max_level)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan=plan) -> torch.Tensor:
            return compact_attention(q, k, v, plan).out

        inputs = tuple(
            torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64).requires_grad_()
            for _ in range(3)
        )
        passed = bool(
            torch.autograd.gradcheck(
                attend, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False, fast_mode=True
            )
        )
        weights = torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64)
        worst = 0.0
        for _ in range(3):
            direction = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in inputs]
            grads = torch.autograd.grad((attend(*inputs) * weights).sum(), inputs)
            analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
            eps = 1e-6
            with torch.no_grad():
                plus = attend(*(t + eps * d for t, d in zip(inputs, direction, strict=True)))
                minus = attend(*(t - eps * d for t, d in zip(inputs, direction, strict=True)))
                numeric = float(((plus - minus) * weights).sum()) / (2 * eps)
            worst = max(worst, abs(analytic - numeric) / max(abs(numeric), 1e-12))
        results.append(
            {
                "name": f"ML-SWA attention, max_level {max_level} "
                f"(B={batch}, H={heads}, N={n}, D={dim}, float64)",
                "passed": passed and worst < 1e-5,
                "max_rel_error": worst,
            }
        )
    return results


__all__ = [
    "EXPLODING_ABOVE",
    "VANISHING_BELOW",
    "GradientReport",
    "GroupGradient",
    "ParamGradient",
    "attention_gradcheck",
    "classify_parameter",
    "compare_gradients",
    "gradient_report",
    "parameter_gradient_norms",
    "report_from_norms",
]
