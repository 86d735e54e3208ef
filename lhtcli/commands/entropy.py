"""``lht entropy``: attention entropy per layer (and per head)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lhtcli.commands._common import (
    BatchesOpt,
    CheckpointOpt,
    ConfigOpt,
    DeviceOpt,
    DocumentOpt,
    JsonOpt,
    SetOpt,
    complete_path,
)

EPILOG = """\
examples:

  lht entropy --checkpoint checkpoints/lht_default/last.ckpt
  lht entropy --checkpoint checkpoints/lht_default/last.ckpt --per-head --batches 4
  lht entropy checkpoints/lht_default/checkpoint-1000.ckpt checkpoints/lht_default/last.ckpt --per-head
  lht entropy --config configs/cpu_small.yaml --json > entropy.json
  lht entropy --checkpoint checkpoints/lht_default/last.ckpt --output entropy.png
"""


def entropy(
    checkpoints: Annotated[
        list[Path] | None,
        typer.Argument(
            help="One or two .ckpt files (instead of --checkpoint); two are compared per layer and head, "
            "A then B, on the same text.",
            show_default=False,
            autocompletion=complete_path,
        ),
    ] = None,
    checkpoint: CheckpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    document: DocumentOpt = None,
    batches: BatchesOpt = 1,
    per_head: Annotated[
        bool, typer.Option("--per-head", help="One row per head instead of per layer.")
    ] = False,
    json_: JsonOpt = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Also save an entropy chart as PNG.",
            show_default=False,
            dir_okay=False,
            autocompletion=complete_path,
        ),
    ] = None,
    device: DeviceOpt = None,
) -> None:
    """Tabulate attention health per layer: entropy (nats and normalised), hierarchy usage, sinks, logits.

    Health is judged on normalised entropy (entropy / log #allowed keys): alarms fire when a layer or
    head focuses on about one key (possible collapse) or is near-uniform, never on absolute nats.

    Two checkpoints (lht entropy A.ckpt B.ckpt) show what changed per layer and head, and flag a
    collapse: normalised entropy falling to less than half.
    """
    import json

    from rich.console import Console

    from lhtcli.diagnostics.attention_stats import EntropyAccumulator, capture_attention
    from lhtcli.diagnostics.loading import checkpoint_paths, load_model, read_document, text_source
    from lhtcli.render.figures import entropy_figure, save_figure
    from lhtcli.render.tables import entropy_table, hierarchy_table

    console = Console(stderr=json_)
    paths = checkpoint_paths(checkpoint, checkpoints)
    if len(paths) == 2:
        _compare(paths, config, set_, document, batches, per_head, json_, device, console, output)
        return
    doc = read_document(document)[1] if document is not None else None
    loaded = load_model(paths[0] if paths else None, config, set_, device.value if device else None, document=doc)
    source = text_source(loaded, document, batches, masked=False)
    stats = EntropyAccumulator(loaded.windows)
    for batch in source.batches:
        batch = batch.to(loaded.device)
        stats.add(capture_attention(loaded.model, batch.input_ids, batch.positions), batch.positions)
    report = stats.report()
    path = save_figure(entropy_figure(report), output) if output is not None else None
    warnings = report.warnings(random_weights=loaded.checkpoint is None)

    if json_:
        data = {
            "model": loaded.source,
            "step": loaded.step,
            "text": source.description,
            "batches": len(source.batches),
            "figure": str(path) if path else None,
        }
        data.update(report.to_json(per_head=True))
        data["warnings"] = warnings
        data["flagged_heads"] = [{"layer": lay, "head": h, "flag": f} for lay, h, f in report.flagged_heads()]
        typer.echo(json.dumps(data))
        return
    console.print(f"model: {loaded.source}")
    tokens = sum(int(b.positions.real_mask.sum()) for b in source.batches)
    console.print(f"text: {source.description} ({tokens:,} tokens)")
    console.print(entropy_table(report, per_head=per_head))
    console.print(hierarchy_table(report, per_head=per_head))
    for line in warnings:
        style = "red" if "collapse" in line else "yellow"
        console.print(f"[{style}]⚠ {line}[/{style}]")
    heads = [f"layer {lay} head {h} ({flag})" for lay, h, flag in report.flagged_heads()]
    if heads:
        console.print(
            f"[dim]marked heads (▼/▲ in --per-head; a specialised head can be healthy): {', '.join(heads)}[/dim]"
        )
    if not warnings:
        console.print("[green]✓[/green] no layer is focused on one key or near-uniform")
    if path is not None:
        console.print(f"[green]✓[/green] entropy chart saved to {path}")


def _compare(paths, config, set_, document, batches, per_head, json_, device, console, output) -> None:
    """``lht entropy A B``: both reports on A's text (B's tokenizer must match), then per layer/head deltas."""
    import json

    from lhtcli.diagnostics.attention_stats import (
        EntropyAccumulator,
        capture_attention,
        collapse_warnings,
        compare_reports,
    )
    from lhtcli.diagnostics.loading import load_pair, read_document, text_source
    from lhtcli.render.tables import comparison_table

    doc = read_document(document)[1] if document is not None else None
    models = load_pair(paths, config, set_, device.value if device else None, doc)
    source = text_source(models[0], document, batches, masked=False)
    reports = []
    for loaded in models:
        acc = EntropyAccumulator(loaded.windows)
        for batch in source.batches:
            batch = batch.to(loaded.device)
            acc.add(capture_attention(loaded.model, batch.input_ids, batch.positions), batch.positions)
        reports.append(acc.report())
    changes = compare_reports(reports[0], reports[1])
    labels = (f"A (step {models[0].step})", f"B (step {models[1].step})")
    warnings = collapse_warnings(changes, labels[0], labels[1])
    warnings += [f"B: {line}" for line in reports[1].warnings()]
    path = None
    if output is not None:
        from lhtcli.render.figures import entropy_comparison_figure, save_figure

        path = save_figure(entropy_comparison_figure(reports[0], reports[1], labels), output)
    if json_:
        data = {
            "a": {"model": models[0].source, "step": models[0].step, **reports[0].to_json(per_head=True)},
            "b": {"model": models[1].source, "step": models[1].step, **reports[1].to_json(per_head=True)},
            "text": source.description,
            "batches": len(source.batches),
            "changes": [c.to_json() for c in changes],
            "warnings": warnings,
            "figure": str(path) if path else None,
        }
        typer.echo(json.dumps(data))
        return
    console.print(f"A: {models[0].source}")
    console.print(f"B: {models[1].source}")
    console.print(f"text: {source.description}")
    console.print(comparison_table(changes, labels, per_head=per_head))
    for line in warnings:
        console.print(f"[red]⚠ {line}[/red]", highlight=False)
    if not warnings:
        console.print("[green]✓[/green] no collapse between A and B, and no alarm on B")
    if path is not None:
        console.print(f"[green]✓[/green] comparison chart saved to {path}")
