"""Rich tables of the diagnostics: entropy, gradients, MLM predictions, hierarchical positions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from lhtcli.core.positions import HierarchicalPositions
    from lhtcli.diagnostics.attention_stats import EntropyReport, EntropyStats, HeadChange
    from lhtcli.diagnostics.docmap import DocumentMap
    from lhtcli.diagnostics.gradients import GradientReport
    from lhtcli.diagnostics.predictions import Prediction
    from lhtcli.diagnostics.reach import Reachability

FOCUSED_STYLE = "bold red"
DIFFUSE_STYLE = "bold yellow"
VANISHING_STYLE = "bold red"
SHORT_LEVELS = ("tok", "sent", "sec")
EXPLODING_STYLE = "bold dark_orange"


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _flagged(stats: EntropyStats) -> Text:
    """The normalised mean, marked when it is flagged (health is judged on it, not on nats)."""
    flag = stats.flag
    if flag == "focused":
        return Text(f"{_num(stats.normalized_mean)} ▼", style=FOCUSED_STYLE)
    if flag == "uniform":
        return Text(f"{_num(stats.normalized_mean)} ▲", style=DIFFUSE_STYLE)
    return Text(_num(stats.normalized_mean))


def entropy_legend() -> Text:
    from lhtcli.diagnostics.attention_stats import FOCUSED_BELOW, UNIFORM_ABOVE

    legend = Text("Mean/Std/Min/Max: entropy in nats over real queries; Norm = entropy / log(#allowed keys), 0..1 ")
    legend.append("(health is judged on it): ")
    legend.append(f"▼ < {FOCUSED_BELOW:g} focused (possible collapse)", style=FOCUSED_STYLE)
    legend.append(", ")
    legend.append(f"▲ > {UNIFORM_ABOVE:g} near-uniform", style=DIFFUSE_STYLE)
    legend.append(
        "; tok/sent/sec % = share of attention through the token-window, sentence and section ([DOC]) links"
    )
    return legend


def _entropy_cells(stats: EntropyStats, num_levels: int) -> list[Text | str]:
    cells: list[Text | str] = [
        _num(stats.mean),
        _num(stats.std),
        _num(stats.min),
        _num(stats.max),
        _flagged(stats),
    ]
    cells += [f"{100 * m:.1f}%" for m in stats.level_mass[:num_levels]]
    return cells


def entropy_table(report: EntropyReport, per_head: bool = False, title: str | None = None) -> Table:
    """Layer rows (or layer x head rows with ``per_head``): mean, std, min, max, normalised mean and
    per-level mass; flagged normalised means are coloured, with the legend as the caption."""
    from lhtcli.diagnostics.attention_stats import level_name

    # Every column must stay readable in an 80-column terminal, the per-head layout included.
    table = Table(title=title or "Attention entropy", caption=entropy_legend(), caption_justify="left",
                  pad_edge=False, collapse_padding=True)
    table.add_column("Layer", justify="right", no_wrap=True, min_width=5)
    if per_head:
        table.add_column("Head", justify="right", no_wrap=True, min_width=4)
    table.add_column("Lvl", justify="right", no_wrap=True)
    for name in ("Mean", "Std", "Min", "Max", "Norm"):
        table.add_column(name, justify="right", no_wrap=True)
    for level in range(report.num_levels):
        label = SHORT_LEVELS[level] if level < len(SHORT_LEVELS) else level_name(level)
        table.add_column(f"{label} %", justify="right", no_wrap=True)
    for layer in report.layers:
        levels = f"≤ {layer.max_level}"
        if per_head:
            for h, stats in enumerate(layer.heads):
                table.add_row(
                    str(layer.layer),
                    str(h),
                    levels,
                    *_entropy_cells(stats, report.num_levels),
                    end_section=h == len(layer.heads) - 1,
                )
        else:
            table.add_row(str(layer.layer), levels, *_entropy_cells(layer.stats, report.num_levels))
    lead = ["all", ""] if per_head else ["all"]
    table.add_row(*lead, "", *_entropy_cells(report.overall, report.num_levels), style="bold")
    return table


def hierarchy_table(report: EntropyReport, per_head: bool = False, title: str | None = None) -> Table:
    """Per layer (and head): is the hierarchy used, where attention sinks, how large the logits grow.

    For each level >= 1: the share of real queries that have such links, and of those queries the
    mean share of attention that goes through them."""
    from lhtcli.diagnostics.attention_stats import SINK_TOKENS, level_name

    caption = (
        "links % = real queries that have links of that level (sentence starts; section starts and [DOC]); "
        "used % = of those queries, the share of attention through those links (in brackets: the share uniform "
        "attention over the same keys would give); "
        f"Sink % = attention on the first {SINK_TOKENS} tokens ([DOC] included) of queries that can see them; "
        "Logit = largest q.k/sqrt(d) over allowed pairs"
    )
    table = Table(title=title or "Hierarchy usage and attention sinks", caption=caption, caption_justify="left",
                  pad_edge=False, collapse_padding=True)
    table.add_column("Layer", justify="right", no_wrap=True, min_width=5)
    if per_head:
        table.add_column("Head", justify="right", no_wrap=True, min_width=4)
    table.add_column("Lvl", justify="right", no_wrap=True)
    for level in range(1, report.num_levels):
        label = SHORT_LEVELS[level] if level < len(SHORT_LEVELS) else level_name(level)
        table.add_column(f"{label} links", justify="right", no_wrap=True)
        table.add_column(f"{label} used", justify="right", no_wrap=True)
    table.add_column("Sink %", justify="right", no_wrap=True)
    table.add_column("Logit", justify="right", no_wrap=True)

    def cells(stats: EntropyStats) -> list[str]:
        out = []
        for level in range(1, report.num_levels):
            linked = stats.linked_queries[level] if level < len(stats.linked_queries) else 0
            usage = stats.hierarchy_usage[level] if level < len(stats.hierarchy_usage) else None
            base = stats.hierarchy_uniform[level] if level < len(stats.hierarchy_uniform) else None
            share = linked / stats.num_queries if stats.num_queries else None
            used = _pct(usage) if usage is None or base is None else f"{_pct(usage)} ({100 * base:.0f})"
            out += [_pct(share), used]
        return [*out, _pct(stats.sink_share), _num(stats.max_logit, 2)]

    for layer in report.layers:
        levels = f"≤ {layer.max_level}"
        if per_head:
            for h, stats in enumerate(layer.heads):
                table.add_row(str(layer.layer), str(h), levels, *cells(stats), end_section=h == len(layer.heads) - 1)
        else:
            table.add_row(str(layer.layer), levels, *cells(layer.stats))
    lead = ["all", ""] if per_head else ["all"]
    table.add_row(*lead, "", *cells(report.overall), style="bold")
    return table


def _delta(value: float | None, digits: int = 3, percent: bool = False) -> Text:
    if value is None:
        return Text("–")
    shown = f"{100 * value:+.1f}" if percent else f"{value:+.{digits}f}"
    return Text(shown, style="red" if value < 0 else ("green" if value > 0 else ""))


def comparison_table(
    changes: Sequence[HeadChange], labels: tuple[str, str], per_head: bool = False, title: str | None = None
) -> Table:
    """Per layer (and head): normalised entropy before -> after and its change, sink and logit deltas,
    hierarchy usage of the top level before -> after; collapsed rows in red."""
    a, b = labels
    table = Table(
        title=title or f"Attention change: {a} -> {b}",
        caption=f"Norm = normalised entropy; Δ = {b} minus {a}; Δ sink in percentage points; "
        "used = share of attention through the highest level's links (queries that have them); "
        "▼▼ = collapse (a fall to less than half)",
        caption_justify="left",
        pad_edge=False,
        collapse_padding=True,
    )
    for name in ("Layer", "Head", "Norm A", "Norm B", "Δ Norm", "Δ nats", "Δ sink", "Δ logit", "used A→B"):
        table.add_column(name, justify="right", no_wrap=True)
    for c in changes:
        if c.head is not None and not per_head:
            continue
        style = FOCUSED_STYLE if c.collapsed else ""
        norm_b = Text(_num(c.after.normalized_mean) + (" ▼▼" if c.collapsed else ""), style=style)
        top_b = next((u for u in reversed(c.after.hierarchy_usage[1:]) if u is not None), None)
        top_a = next((u for u in reversed(c.before.hierarchy_usage[1:]) if u is not None), None)
        table.add_row(
            str(c.layer),
            "all" if c.head is None else str(c.head),
            _num(c.before.normalized_mean),
            norm_b,
            _delta(c.delta("normalized_mean")),
            _delta(c.delta("mean")),
            _delta(c.delta("sink_share"), percent=True),
            _delta(c.delta("max_logit"), digits=2),
            f"{_pct(top_a)}→{_pct(top_b)}",
            end_section=c.head is None and per_head,
        )
    return table


def gradient_table(report: GradientReport, per_parameter: bool = False, title: str | None = None) -> Table:
    """Gradient L2 norms per layer and block (or per parameter); problems named in red/orange."""
    from lhtcli.diagnostics.gradients import EXPLODING_ABOVE, VANISHING_BELOW

    total = _num(report.total_norm, 4) if math.isfinite(report.total_norm) else str(report.total_norm)
    health = "[green]healthy[/green]" if report.healthy else "[bold red]unhealthy[/bold red]"
    caption = (
        f"total gradient norm {total} ({health}); vanishing < {VANISHING_BELOW:g} [bold red]red[/bold red], "
        f"exploding > {EXPLODING_ABOVE:g} [bold dark_orange]orange[/bold dark_orange]"
    )
    table = Table(title=title or "Gradient norms", caption=caption, caption_justify="left")
    table.add_column("Layer", justify="right")
    table.add_column("Block")
    if per_parameter:
        table.add_column("Parameter")
    table.add_column("L2 norm", justify="right")
    table.add_column("Status")
    style_of = {
        "vanishing": VANISHING_STYLE,
        "exploding": EXPLODING_STYLE,
        "nonfinite": VANISHING_STYLE,
        "missing": VANISHING_STYLE,
    }
    label_of = {
        "vanishing": "vanishing",
        "exploding": "exploding",
        "nonfinite": "NaN/Inf",
        "missing": "no gradient",
    }
    if per_parameter:
        for p in report.params:
            status = p.status
            norm = "–" if p.norm is None else (f"{p.norm:.3e}" if math.isfinite(p.norm) else str(p.norm))
            cell = (
                Text("ok", style="green")
                if status == "ok"
                else Text(label_of[status], style=style_of[status])
            )
            table.add_row("" if p.layer is None else str(p.layer), p.kind, p.name, norm, cell)
        return table
    statuses = {p.name: p.status for p in report.params}
    for group in report.groups():
        if not group.problems:
            cell = Text("ok", style="green")
        else:
            cell = Text()
            for i, name in enumerate(group.problems):
                status = statuses[name]
                if i:
                    cell.append("\n")
                cell.append(f"{label_of[status]}: {name}", style=style_of[status])
        norm_style = ""
        if group.norm > EXPLODING_ABOVE:
            norm_style = EXPLODING_STYLE
        elif group.norm < VANISHING_BELOW:
            norm_style = VANISHING_STYLE
        layer = "" if group.layer is None else str(group.layer)
        table.add_row(layer, group.kind, Text(f"{group.norm:.3e}", style=norm_style), cell)
    return table


def gradient_comparison_table(rows: Sequence[dict], labels: tuple[str, str], title: str | None = None) -> Table:
    """Per group: gradient norm in A and B and the ratio B/A (a ratio far from 1 is highlighted)."""
    a, b = labels
    table = Table(title=title or f"Gradient norms: {a} -> {b}",
                  caption="ratio = B / A; below 0.1 red (shrinking), above 10 orange (growing)",
                  caption_justify="left")
    for name in ("Group", "Norm A", "Norm B", "Ratio", "Status B"):
        table.add_column(name, justify="left" if name in ("Group", "Status B") else "right")
    for row in rows:
        ratio = row["ratio"]
        style = "" if ratio is None else (VANISHING_STYLE if ratio < 0.1 else (EXPLODING_STYLE if ratio > 10 else ""))
        status = Text("ok", style="green") if not row["problems_after"] else Text(
            ", ".join(row["problems_after"]), style=VANISHING_STYLE)
        table.add_row(
            row["label"],
            "–" if row["before"] is None else f"{row['before']:.3e}",
            f"{row['after']:.3e}",
            Text("–" if ratio is None else f"{ratio:.2f}x", style=style),
            status,
        )
    return table


def prediction_table(predictions: Sequence[Prediction], title: str | None = None) -> Table:
    """Columns ``Sample, Position, Original, Masked, Top-5 Predictions, Correct``."""
    from lhtcli.diagnostics.predictions import PREDICTION_COLUMNS

    table = Table(title=title or "MLM predictions at masked positions")
    for name in PREDICTION_COLUMNS:
        justify = "right" if name in ("Sample", "Position") else ("center" if name == "Correct" else "left")
        table.add_column(name, justify=justify, overflow="fold")
    for p in predictions:
        row: list[str | Text] = list(p.row())
        row[-1] = Text(row[-1], style="green" if p.correct else "red")
        table.add_row(*row)
    return table


def positions_table(
    positions: HierarchicalPositions,
    tokens: Sequence[str] | None = None,
    *,
    sample: int = 0,
    max_tokens: int = 40,
    title: str | None = None,
) -> Table:
    """One row per token: its enumeration per level; sentence starts bold, section starts highlighted."""
    one = positions.batched()[sample]
    enums = [e.tolist() for e in one.level_enums]
    length = min(sum(1 for v in enums[0] if v), max_tokens)
    names = ["L0 tokens", "L1 sentences", "L2 sections"]
    table = Table(
        title=title or "Hierarchical position vectors",
        caption="level l > 0 is the ordinal at the first token of each sentence/section, 0 elsewhere; "
        "[DOC] is global at the top level",
        caption_justify="left",
    )
    table.add_column("#", justify="right")
    table.add_column("Token")
    for level in range(len(enums)):
        table.add_column(names[level] if level < len(names) else f"level {level}", justify="right")
    for i in range(length):
        token = str(tokens[i]) if tokens is not None and i < len(tokens) else ""
        section_start = len(enums) > 2 and enums[2][i] != 0
        sentence_start = len(enums) > 1 and enums[1][i] != 0
        style = "bold black on bright_yellow" if section_start else ("bold" if sentence_start else "")
        if i == 0 and one.has_doc_token:
            style = "bold magenta"
        cells = [str(i), token]
        for level, values in enumerate(enums):
            value = values[i]
            cells.append(
                "*" if level == len(enums) - 1 and level > 0 and i == 0 and one.has_doc_token else str(value)
            )
        table.add_row(*cells, style=style)
    if length < sum(1 for v in enums[0] if v):
        table.add_row("…", f"({sum(1 for v in enums[0] if v) - length} more tokens)", *[""] * len(enums))
    return table


def reach_table(reach: Reachability, title: str | None = None) -> Table:
    """After each layer: how many tokens information from each source can have reached (and, in
    brackets, how many a token window alone would reach)."""
    table = Table(
        title=title or "Reachability through the ML-SWA mask",
        caption=f"tokens (of {reach.num_tokens}) that information from the source can reach after k layers, "
        "from the mask graph with each layer's max level; (window) = with the token window alone",
        caption_justify="left",
    )
    table.add_column("After", justify="right")
    table.add_column("Lvl", justify="right")
    for label, source in zip(reach.labels, reach.sources, strict=True):
        table.add_column(f"from {source} {_short_label(label)}", justify="right")
    counts = reach.counts().tolist()
    window = reach.window_only.tolist()
    for k, level in enumerate(reach.layers):
        cells = []
        for s in range(len(reach.sources)):
            full = counts[s][k] >= reach.num_tokens
            text = Text(f"{counts[s][k]:,}", style="green" if full else "")
            text.append(f" ({window[s][k]:,})", style="dim")
            cells.append(text)
        table.add_row(f"{k + 1} layer{'s' if k else ''}", f"≤ {level}", *cells)
    return table


def _short_label(label: str, width: int = 10) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def document_map_table(maps: Sequence[DocumentMap], title: str | None = None) -> Table:
    """Per layer and unit: where a token's attention goes (own unit, adjacent, farther, [DOC]) and the
    strongest long-range link."""
    table = Table(
        title=title or "Where attention goes in the document",
        caption="token-weighted shares of attention: own sentence/section, the adjacent ones, farther ones, "
        "the [DOC] node(s); top link = strongest attention between units at least 2 apart",
        caption_justify="left",
    )
    for name in ("Layer", "Unit", "Units", "Own", "Adjacent", "Farther", "[DOC]"):
        table.add_column(name, justify="right" if name not in ("Unit",) else "left", no_wrap=True)
    table.add_column("Top long-range link", overflow="fold")
    for m in maps:
        share = m.summary()
        links = m.top_links(1)
        top = "–" if not links else (
            f"{_short_label(m.labels[links[0][0]], 16)} → {_short_label(m.labels[links[0][1]], 16)} "
            f"({100 * links[0][2]:.2f}%)"
        )
        table.add_row(
            str(m.layer),
            m.unit,
            str(len(m.labels)),
            _pct(share["own"]),
            _pct(share["adjacent"]),
            _pct(share["farther"]),
            _pct(share["doc"]),
            top,
        )
    return table


__all__ = [
    "comparison_table",
    "document_map_table",
    "entropy_legend",
    "entropy_table",
    "gradient_comparison_table",
    "gradient_table",
    "hierarchy_table",
    "positions_table",
    "prediction_table",
    "reach_table",
]
