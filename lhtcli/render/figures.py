"""Matplotlib figures of the diagnostics (Agg backend, imported lazily).

Figures are built as ``matplotlib.figure.Figure`` objects on an Agg canvas, never through pyplot's
global figure manager, so nothing stays open: hand a figure to a logger (``log_figure``) or write it
with :func:`save_figure`, which also closes it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lhtcli.errors import LHTError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lhtcli.core.positions import HierarchicalPositions
    from lhtcli.diagnostics.attention_stats import AttentionMap, EntropyReport
    from lhtcli.diagnostics.docmap import DocumentMap
    from lhtcli.diagnostics.gradients import GradientReport
    from lhtcli.diagnostics.reach import Reachability

MASKED_COLOR = "#b0b0b0"  # masked-out pairs: grey, distinct from the near-white of weak attention
MASKED_HATCH = "////"
LEVEL_COLORMAPS = ("Blues", "Greens", "Oranges", "Purples")  # tokens, sentences, sections, [DOC]
LEVEL_LABELS = ("token window", "sentence link", "section link", "[DOC] link")
LEVEL_SOLID = ("#6baed6", "#74c476", "#fd8d3c", "#9e9ac8")
SENTENCE_LINE = {"color": "#252525", "linewidth": 0.6, "linestyle": "--", "alpha": 0.7}
SECTION_LINE = {"color": "#d7301f", "linewidth": 1.4, "linestyle": "-", "alpha": 0.9}
GRAD_COLORS = {"ok": "#1f77b4", "vanishing": "#d62728", "exploding": "#ff7f0e"}


def _ensure_pyplot() -> None:
    """Import pyplot on the Agg backend unless the process already chose one.

    Our figures never go through pyplot, but W&B's ``wandb.Image(figure)`` looks up
    ``matplotlib.pyplot`` and fails when it has not been imported.
    """
    import sys

    if "matplotlib.pyplot" in sys.modules:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def new_figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas (no pyplot state, safe in threads and headless runs)."""
    _ensure_pyplot()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def close_figure(fig: Figure) -> None:
    """Release a figure (and close it in pyplot too, should pyplot have adopted it)."""
    import sys

    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    fig.clear()


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as an image (format from the suffix, PNG by default) and close it."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    try:  # into a temporary file first: a failed write never damages an existing image
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fig.savefig(temporary, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as exc:
        raise LHTError(f"cannot write the figure to {path} ({exc.strerror or exc}); choose another --output") from None
    finally:
        close_figure(fig)
    return path


def _token_ticks(ax: Any, tokens: Sequence[str], fontsize: float) -> None:
    n = len(tokens)
    step = max(1, math.ceil(n / 80))  # keep labels legible beyond ~80 tokens
    ticks = list(range(0, n, step))
    labels = [_short(tokens[i]) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.tick_params(length=0)


def _short(token: str, width: int = 12) -> str:
    return token if len(token) <= width else token[: width - 1] + "…"


def _boundaries(ax: Any, sentence_starts: Sequence[int], section_starts: Sequence[int], size: int) -> None:
    sections = set(section_starts)
    for s in sentence_starts:
        if s > 0 and s not in sections:
            ax.axvline(s - 0.5, **SENTENCE_LINE)
            ax.axhline(s - 0.5, **SENTENCE_LINE)
    for s in sections:
        if s > 0:
            ax.axvline(s - 0.5, **SECTION_LINE)
            ax.axhline(s - 0.5, **SECTION_LINE)
    ax.set_xlim(-0.5, size - 0.5)
    ax.set_ylim(size - 0.5, -0.5)


def _hatch_masked(ax: Any, masked: Any) -> None:
    """Grey hatching over the masked cells (one contour patch, cheap at any size).

    The mask is upsampled so that the contour follows the cell edges instead of cutting corners.
    """
    import numpy as np

    if not masked.any():
        return
    factor = 8
    grid = np.kron(masked.astype(float), np.ones((factor, factor)))
    ys = np.arange(grid.shape[0]) / factor - 0.5 + 0.5 / factor
    xs = np.arange(grid.shape[1]) / factor - 0.5 + 0.5 / factor
    ax.contourf(xs, ys, grid, levels=[0.5, 1.5], colors="none", hatches=[MASKED_HATCH])


def _draw_map(ax: Any, amap: AttentionMap, color_by_level: bool, vmax: float, labels: bool) -> Any:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import PowerNorm, to_rgba

    probs = amap.probs.numpy().astype(float)
    levels = amap.levels.numpy().astype(int)
    masked = levels < 0
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=max(vmax, 1e-12))
    if color_by_level:
        rgba = np.zeros((*probs.shape, 4))
        for code, cmap_name in enumerate(LEVEL_COLORMAPS):
            where = levels == code
            if where.any():
                # start the ramp above white so a weak link still shows its level's hue
                rgba[where] = colormaps[cmap_name](0.15 + 0.85 * norm(probs[where]))
        rgba[masked] = to_rgba(MASKED_COLOR)
        image = ax.imshow(rgba, interpolation="nearest", aspect="equal")
    else:
        cmap = colormaps["Blues"].with_extremes(bad=MASKED_COLOR)
        image = ax.imshow(
            np.ma.masked_array(probs, masked), cmap=cmap, norm=norm, interpolation="nearest", aspect="equal"
        )
    _hatch_masked(ax, masked)
    _boundaries(ax, amap.sentence_starts, amap.section_starts, probs.shape[0])
    if labels:
        _token_ticks(ax, amap.tokens, fontsize=6 if len(amap.tokens) <= 60 else 5)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return image


def _legend_handles(amaps: Sequence[AttentionMap], color_by_level: bool) -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(facecolor=MASKED_COLOR, hatch=MASKED_HATCH, label="masked (not allowed)")]
    if color_by_level:
        present = set()
        for amap in amaps:
            present |= {int(c) for c in amap.levels.unique().tolist() if c >= 0}
        handles += [
            Patch(facecolor=LEVEL_SOLID[c], label=f"allowed by {LEVEL_LABELS[c]}") for c in sorted(present)
        ]
    handles.append(Line2D([], [], label="sentence start", **SENTENCE_LINE))
    handles.append(Line2D([], [], label="section start", **SECTION_LINE))
    return handles


def attention_heatmap(
    maps: AttentionMap | Sequence[AttentionMap],
    *,
    color_by_level: bool = False,
    title: str | None = None,
) -> Figure:
    """Heatmap of exact attention (queries on rows, keys on columns; darker = stronger).

    One :class:`AttentionMap` gives one panel with token labels; a sequence of maps (e.g. every
    layer) gives a grid sharing one colour scale. Masked-out pairs are grey and hatched, weak
    attention is near white. ``color_by_level`` colours each allowed pair by the lowest level that
    allows it (token window / sentence / section / [DOC]) with a legend.
    """
    grid = not hasattr(maps, "probs")
    amaps: list[AttentionMap] = list(maps) if grid else [maps]  # type: ignore[arg-type]
    if not amaps:
        raise ValueError("no attention maps to draw")
    vmax = max(float(m.probs.max()) for m in amaps)
    size = amaps[0].probs.shape[0]
    head = "mean over heads" if amaps[0].head is None else f"head {amaps[0].head}"
    if len(amaps) == 1:
        side = min(max(5.0, 0.16 * size + 2.5), 14.0)
        fig = new_figure(side + 1.6, side)
        ax = fig.add_subplot(1, 1, 1)
        image = _draw_map(ax, amaps[0], color_by_level, vmax, labels=True)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        axes = [ax]
        ax.set_title(title or f"Layer {amaps[0].layer} attention ({head})", fontsize=10)
    else:
        cols = min(4, len(amaps))
        rows = math.ceil(len(amaps) / cols)
        panel = 3.2 if size > 30 else 2.6
        fig = new_figure(panel * cols + 1.6, panel * rows + 0.8)
        axes = []
        for i, amap in enumerate(amaps):
            ax = fig.add_subplot(rows, cols, i + 1)
            image = _draw_map(ax, amap, color_by_level, vmax, labels=False)
            ax.set_title(f"layer {amap.layer} (levels ≤ {amap.max_level})", fontsize=8)
            axes.append(ax)
        fig.suptitle(
            title or f"Attention per layer ({head}), tokens {amaps[0].start}-{amaps[0].start + size - 1}",
            fontsize=10,
        )
    if not color_by_level:
        fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    fig.legend(
        handles=_legend_handles(amaps, color_by_level),
        loc="outside lower center",
        ncol=3 if color_by_level else 4,
        fontsize=7,
        frameon=False,
    )
    return fig


def mask_figure(
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None = None,
    tokens: Sequence[str] | None = None,
    *,
    sample: int = 0,
    max_tokens: int = 80,
    title: str | None = None,
) -> Figure:
    """The ML-SWA mask of one sequence, each allowed pair coloured by the level that allows it."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from lhtcli.core.mask import pair_level_map

    one = positions.batched()[sample : sample + 1]
    length = min(int(one.real_mask.sum()), max_tokens)
    levels = pair_level_map(one, window_size_per_level, max_level)[0, :length, :length].numpy().astype(int)
    cmap = ListedColormap(["#ffffff", *LEVEL_SOLID])
    side = min(max(5.0, 0.13 * length + 2.5), 13.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(levels + 1, cmap=cmap, vmin=0, vmax=len(LEVEL_SOLID), interpolation="nearest")
    enums = [e[0, :length].tolist() for e in one.level_enums]
    sentences = [i for i, v in enumerate(enums[1]) if v] if len(enums) > 1 else []
    sections = [i for i, v in enumerate(enums[2]) if v] if len(enums) > 2 else []
    _boundaries(ax, sentences, sections, length)
    shown = [str(t) for t in tokens[:length]] if tokens is not None else [str(i) for i in range(length)]
    _token_ticks(ax, shown, fontsize=5 if length > 60 else 6)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    windows = list(window_size_per_level)
    ax.set_title(
        title or f"ML-SWA mask, windows {windows} ({int((levels >= 0).sum())} allowed pairs)", fontsize=10
    )
    present = sorted({int(c) for c in np.unique(levels) if c >= 0})
    handles = [Patch(facecolor="#ffffff", edgecolor="#999999", label="masked")]
    handles += [Patch(facecolor=LEVEL_SOLID[c], label=LEVEL_LABELS[c]) for c in present]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
    return fig


def _param_label(name: str) -> str:
    """The name without its ``blocks.N.`` prefix (the layer is the group label above the bars)."""
    import re

    return re.sub(r"^(?:blocks|layers|h)\.\d+\.", "", name)


def _flow_group(p: Any) -> str:
    if p.layer is not None:
        return f"layer {p.layer}"
    return "embeddings" if p.kind == "embeddings" else "output"


def gradient_flow_figure(report: GradientReport, title: str | None = None) -> Figure:
    """Log-scale gradient L2 norm per parameter, grouped: embeddings, each layer, output (final norm, head).

    Blue: normal; red: vanishing (< 1e-5); orange: exploding (> 10). Zero, missing and non-finite
    gradients are drawn at a floor value with a marker instead of being dropped.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from lhtcli.diagnostics.gradients import EXPLODING_ABOVE, VANISHING_BELOW

    params = report.flow()
    if not params:
        raise ValueError("no parameters to draw")
    positive = [p.norm for p in params if p.norm is not None and math.isfinite(p.norm) and p.norm > 0]
    floor = min([VANISHING_BELOW / 100, *(v / 10 for v in positive)])
    top = max([EXPLODING_ABOVE * 10, *(v * 3 for v in positive)])
    longest = max(len(_param_label(p.name)) for p in params)
    # bars wide enough for a 7-point label each, and room below the axis for the longest one
    fig = new_figure(min(max(6.0, 0.2 * len(params) + 2.0), 40.0), 3.6 + 0.075 * longest)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(params)))
    heights, colors, markers = [], [], []
    for x, p in zip(xs, params, strict=True):
        status = p.status
        if status in ("missing", "nonfinite") or (p.norm is not None and p.norm <= 0):
            heights.append(floor)
            colors.append(GRAD_COLORS["vanishing"] if status != "nonfinite" else "#000000")
            markers.append((x, status if status != "ok" else "vanishing"))
        else:
            heights.append(p.norm)
            colors.append(GRAD_COLORS.get(status, GRAD_COLORS["ok"]))
    base = floor * 0.5  # bars start at the bottom of the axis (log scale has no zero)
    ax.bar(xs, [h - base for h in heights], color=colors, width=0.8, bottom=base)
    ax.set_yscale("log")
    ax.set_ylim(base, top)
    symbols = {
        "missing": ("x", "no gradient"),
        "vanishing": ("v", "zero gradient"),
        "nonfinite": ("*", "NaN/Inf"),
    }
    for x, kind in markers:
        marker, _ = symbols.get(kind, ("v", ""))
        ax.plot([x], [floor], marker=marker, color="#000000", markersize=6, linestyle="none")
    ax.axhline(VANISHING_BELOW, color=GRAD_COLORS["vanishing"], linestyle=":", linewidth=1)
    ax.axhline(EXPLODING_ABOVE, color=GRAD_COLORS["exploding"], linestyle=":", linewidth=1)
    # group separators and labels per layer
    groups: list[tuple[str, int, int]] = []
    for x, p in zip(xs, params, strict=True):
        key = _flow_group(p)
        if groups and groups[-1][0] == key:
            groups[-1] = (key, groups[-1][1], x)
        else:
            groups.append((key, x, x))
    for i, (key, first, last) in enumerate(groups):
        if i:
            ax.axvline(first - 0.5, color="#999999", linewidth=0.6)
        ax.text(
            (first + last) / 2,
            1.01,
            key,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(xs, [_param_label(p.name) for p in params], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(params) - 0.4)
    ax.set_ylabel("gradient L2 norm (log)")
    ax.set_title(title or f"Gradient flow (total norm {report.total_norm:.3g})", fontsize=10, pad=14)
    handles = [
        Patch(color=GRAD_COLORS["ok"], label="normal"),
        Patch(color=GRAD_COLORS["vanishing"], label=f"vanishing (< {VANISHING_BELOW:g})"),
        Patch(color=GRAD_COLORS["exploding"], label=f"exploding (> {EXPLODING_ABOVE:g})"),
    ]
    used = {kind for _, kind in markers}
    handles += [
        Line2D([], [], marker=symbols[k][0], color="#000000", linestyle="none", label=symbols[k][1])
        for k in ("vanishing", "missing", "nonfinite")
        if k in used
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    return fig


def entropy_figure(report: EntropyReport, title: str | None = None) -> Figure:
    """Mean entropy (± std, min-max range) and normalised entropy per layer (with the health thresholds),
    each head as a dot."""
    from lhtcli.diagnostics.attention_stats import FOCUSED_BELOW, UNIFORM_ABOVE

    layers = [layer.layer for layer in report.layers]
    fig = new_figure(max(6.0, 0.6 * len(layers) + 5.0), 3.8)
    ax_raw = fig.add_subplot(1, 2, 1)
    ax_norm = fig.add_subplot(1, 2, 2)
    means = [layer.stats.mean for layer in report.layers]
    stds = [layer.stats.std for layer in report.layers]
    ax_raw.bar(layers, means, yerr=stds, color="#9ecae1", edgecolor="#3182bd", capsize=3, label="mean ± std")
    ax_raw.vlines(
        layers,
        [layer.stats.min for layer in report.layers],
        [layer.stats.max for layer in report.layers],
        color="#636363",
        linewidth=0.8,
        label="min-max",
    )
    for layer in report.layers:
        ax_raw.scatter(
            [layer.layer] * len(layer.heads), [h.mean for h in layer.heads], s=10, color="#08519c", zorder=3
        )
    ax_raw.set_xlabel("layer")
    ax_raw.set_ylabel("entropy (nats)")
    ax_raw.set_title("Attention entropy", fontsize=10)
    ax_raw.legend(fontsize=6)
    norm_means = [layer.stats.normalized_mean for layer in report.layers]
    ax_norm.bar(
        layers, [v if v is not None else 0.0 for v in norm_means], color="#c7e9c0", edgecolor="#31a354"
    )
    for layer in report.layers:
        values = [h.normalized_mean for h in layer.heads if h.normalized_mean is not None]
        ax_norm.scatter([layer.layer] * len(values), values, s=10, color="#006d2c", zorder=3)
    # health is judged on the normalised entropy: its thresholds belong on this panel
    ax_norm.axhline(FOCUSED_BELOW, color=GRAD_COLORS["vanishing"], linestyle=":", linewidth=1,
                    label=f"< {FOCUSED_BELOW:g} focused")
    ax_norm.axhline(UNIFORM_ABOVE, color=GRAD_COLORS["exploding"], linestyle=":", linewidth=1,
                    label=f"> {UNIFORM_ABOVE:g} near-uniform")
    ax_norm.legend(fontsize=6, loc="lower right")
    ax_norm.set_ylim(0, 1.05)
    ax_norm.set_xlabel("layer")
    ax_norm.set_ylabel("entropy / log(#allowed keys)")
    ax_norm.set_title("Normalised entropy (dots: heads)", fontsize=10)
    for ax in (ax_raw, ax_norm):
        ax.set_xticks(layers)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def entropy_comparison_figure(
    before: EntropyReport, after: EntropyReport, labels: tuple[str, str], title: str | None = None
) -> Figure:
    """Two checkpoints side by side per layer: normalised entropy (bars, heads as dots) and hierarchy usage
    of the highest level with links (of the queries that have such links, the share through them)."""
    from lhtcli.diagnostics.attention_stats import FOCUSED_BELOW, UNIFORM_ABOVE

    fig = new_figure(max(7.0, 1.2 * len(after.layers) + 4.0), 3.8)
    ax_norm = fig.add_subplot(1, 2, 1)
    ax_use = fig.add_subplot(1, 2, 2)
    colors = ("#9ecae1", "#fd8d3c")
    width = 0.38
    for i, (report, label) in enumerate(((before, labels[0]), (after, labels[1]))):
        xs = [layer.layer + (i - 0.5) * width for layer in report.layers]
        norm = [layer.stats.normalized_mean or 0.0 for layer in report.layers]
        ax_norm.bar(xs, norm, width=width, color=colors[i], edgecolor="#555555", label=label)
        for x, layer in zip(xs, report.layers, strict=True):
            heads = [h.normalized_mean for h in layer.heads if h.normalized_mean is not None]
            ax_norm.scatter([x] * len(heads), heads, s=8, color="#222222", zorder=3)
        usage = []
        for layer in report.layers:
            used = [u for u in layer.stats.hierarchy_usage[1:] if u is not None]
            usage.append(100 * used[-1] if used else 0.0)
        ax_use.bar(xs, usage, width=width, color=colors[i], edgecolor="#555555", label=label)
    ax_norm.axhline(FOCUSED_BELOW, color=GRAD_COLORS["vanishing"], linestyle=":", linewidth=1)
    ax_norm.axhline(UNIFORM_ABOVE, color=GRAD_COLORS["exploding"], linestyle=":", linewidth=1)
    ax_norm.set_ylim(0, 1.05)
    ax_norm.set_ylabel("entropy / log(#allowed keys)")
    ax_norm.set_title("Normalised entropy (dots: heads)", fontsize=10)
    ax_use.set_ylabel("% of linked queries' attention")
    ax_use.set_title("Hierarchy usage (highest level with links)", fontsize=10)
    for ax in (ax_norm, ax_use):
        ax.set_xlabel("layer")
        ax.set_xticks([layer.layer for layer in after.layers])
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


MAP_LABELS_UP_TO = 60  # units whose labels are written on the axes; beyond, every k-th ordinal


def _draw_document_map(ax: Any, dmap: DocumentMap) -> Any:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    values = dmap.matrix.numpy()
    positive = values[values > 0]
    vmin = max(float(positive.min()) if positive.size else 1e-6, 1e-5)
    vmax = max(float(values.max()), vmin * 10)
    cmap = colormaps["magma_r"].with_extremes(bad=MASKED_COLOR)  # no allowed pair between the two units
    shown = np.ma.masked_where(values <= 0, values)
    image = ax.imshow(shown, cmap=cmap, norm=LogNorm(vmin=vmin, vmax=vmax), interpolation="nearest",
                      aspect="equal")
    u = values.shape[0]
    if u <= MAP_LABELS_UP_TO:
        labels = [_short(label, 18) for label in dmap.labels]
        size = 7 if u <= 30 else 5
        ax.set_xticks(range(u), labels, rotation=90, fontsize=size)
        ax.set_yticks(range(u), labels, fontsize=size)
    else:
        step = max(1, math.ceil(u / 20))
        ticks = list(range(0, u, step))
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=6)
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=6)
    ax.tick_params(length=0)
    for p in dmap.sequence_breaks:
        if p > 0:
            ax.axvline(p - 0.5, **SECTION_LINE)
            ax.axhline(p - 0.5, **SECTION_LINE)
    who = "mean over heads" if dmap.head is None else f"head {dmap.head}"
    unit = dmap.unit if dmap.unit != "tokens" else "tokens"
    ax.set_title(
        f"Layer {dmap.layer}: {unit} x {unit} ({who})\ntokens {dmap.start}-{dmap.stop - 1}, {u} units",
        fontsize=9,
    )
    ax.set_xlabel(f"key {unit[:-1]}", fontsize=8)
    ax.set_ylabel(f"query {unit[:-1]}", fontsize=8)
    return image


def document_map_figure(maps: Sequence[DocumentMap], title: str | None = None) -> Figure:
    """Pooled attention maps, one panel per (layer, unit), rows = layers; log colour scale (the diagonal
    dominates), grey = no allowed pair, red lines = where the model's sequences split the document."""
    layers = sorted({m.layer for m in maps})
    units = list(dict.fromkeys(m.unit for m in maps))
    by_key = {(m.layer, m.unit): m for m in maps}
    fig = new_figure(5.2 * len(units) + 0.6, 4.8 * len(layers))
    for r, layer in enumerate(layers):
        for c, unit in enumerate(units):
            ax = fig.add_subplot(len(layers), len(units), r * len(units) + c + 1)
            dmap = by_key.get((layer, unit))
            if dmap is None:
                ax.axis("off")
                continue
            image = _draw_document_map(ax, dmap)
            fig.colorbar(image, ax=ax, shrink=0.8, label="mean attention of a query token (log)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def reach_figure(reach: Reachability, title: str | None = None) -> Figure:
    """For each source, after layer k (rows): the tokens its information can have reached (dark)."""
    import numpy as np

    sources = reach.sources
    fig = new_figure(9.0, 1.2 + 1.1 * len(sources) * max(1, len(reach.layers)) ** 0.5)
    for i, source in enumerate(sources):
        ax = fig.add_subplot(len(sources), 1, i + 1)
        grid = np.array([[1.0 if r else 0.0 for r in row] for row in reach.reached[i]])
        ax.imshow(grid, cmap="Blues", vmin=0, vmax=1.2, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(reach.layers)), [f"after {k + 1}" for k in range(len(reach.layers))], fontsize=6)
        ax.set_title(f"from token {source} ({reach.labels[i]})", fontsize=8)
        ax.set_xlabel("token", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title or "Reachability: which tokens information from a source can reach after k layers",
                 fontsize=9)
    return fig


__all__ = [
    "attention_heatmap",
    "close_figure",
    "document_map_figure",
    "entropy_comparison_figure",
    "reach_figure",
    "entropy_figure",
    "gradient_flow_figure",
    "mask_figure",
    "new_figure",
    "save_figure",
]
