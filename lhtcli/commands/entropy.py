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
  lht entropy --config configs/cpu_small.yaml --json > entropy.json
  lht entropy --checkpoint checkpoints/lht_default/last.ckpt --output entropy.png
"""


def entropy(
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
    """Tabulate attention entropy per layer: mean, std, min, max and normalised entropy.

    Flags layers whose attention looks collapsed (very low entropy) or diffuse (very high).

    Normalised entropy divides by log(#allowed keys): the fair comparison across ML-SWA rows.
    """
    import json

    from rich.console import Console

    from lhtcli.diagnostics.attention_stats import EntropyAccumulator, capture_attention
    from lhtcli.diagnostics.loading import load_model, read_document, text_source
    from lhtcli.render.figures import entropy_figure, save_figure
    from lhtcli.render.tables import entropy_table

    console = Console(stderr=json_)
    doc = read_document(document)[1] if document is not None else None
    loaded = load_model(checkpoint, config, set_, device.value if device else None, document=doc)
    source = text_source(loaded, document, batches, masked=False)
    stats = EntropyAccumulator(loaded.windows)
    for batch in source.batches:
        batch = batch.to(loaded.device)
        stats.add(capture_attention(loaded.model, batch.input_ids, batch.positions), batch.positions)
    report = stats.report()
    path = save_figure(entropy_figure(report), output) if output is not None else None

    if json_:
        data = {
            "model": loaded.source,
            "step": loaded.step,
            "text": source.description,
            "batches": len(source.batches),
            "figure": str(path) if path else None,
        }
        data.update(report.to_json(per_head=True))
        typer.echo(json.dumps(data))
        return
    console.print(f"model: {loaded.source}")
    tokens = sum(int(b.positions.real_mask.sum()) for b in source.batches)
    console.print(f"text: {source.description} ({tokens:,} tokens)")
    console.print(entropy_table(report, per_head=per_head))
    for line in report.warnings():
        style = "red" if "collapse" in line else "yellow"
        console.print(f"[{style}]⚠ {line}[/{style}]")
    if path is not None:
        console.print(f"[green]✓[/green] entropy chart saved to {path}")
