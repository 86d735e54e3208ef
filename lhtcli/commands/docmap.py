"""``lht map``: a whole-document attention map, pooled to sentences and sections, at any length."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from lhtcli.commands._common import (
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

  lht map --checkpoint checkpoints/lht_default/last.ckpt --document paper.md
  lht map --checkpoint checkpoints/lht_default/last.ckpt --layer all --unit sections
  lht map --checkpoint checkpoints/lht_default/last.ckpt --document paper.md --start 4000 --span 600
  lht map --config configs/cpu_small.yaml --set model.max_seq_len=16384 --document long.txt --json
"""

TOKEN_UNITS_UP_TO = 64  # a span this short is drawn token by token, with the token strings


class Unit(StrEnum):
    auto = "auto"
    sentences = "sentences"
    sections = "sections"
    both = "both"
    tokens = "tokens"


def docmap(
    checkpoint: CheckpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    document: DocumentOpt = None,
    layer: Annotated[
        str,
        typer.Option("--layer", help="Layer index, 'last' or 'all'."),
    ] = "last",
    head: Annotated[
        int | None,
        typer.Option("--head", min=0, help="One head's attention.", show_default="the mean over heads"),
    ] = None,
    unit: Annotated[
        Unit,
        typer.Option(
            "--unit",
            help="What to pool to; auto = sentences and sections, or tokens when the span is at most "
            f"{TOKEN_UNITS_UP_TO} tokens.",
        ),
    ] = Unit.auto,
    start: Annotated[int, typer.Option("--start", min=0, help="First document token shown.")] = 0,
    span: Annotated[
        int | None,
        typer.Option("--span", min=1, help="How many tokens from --start.", show_default="to the end"),
    ] = None,
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Where to save the PNG.", dir_okay=False, autocompletion=complete_path
        ),
    ] = Path("attention_map.png"),
    json_: JsonOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Map a whole document's attention: sentence x sentence and section x section, exactly.

    Pools the exact attention probabilities of every token (same masked softmax as the model) over
    sentences and sections, in memory linear in the document length: a 16k-token document takes
    seconds on a CPU. --start/--span zoom into a token range (token indices count every sequence's
    [DOC]); short spans are drawn token by token with the tokens on the axes.
    """
    import json
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lhtcli.diagnostics.docmap import DocumentLayout, document_maps
    from lhtcli.diagnostics.loading import document_sequences, load_model, read_document
    from lhtcli.diagnostics.predictions import token_namer
    from lhtcli.errors import LHTError
    from lhtcli.render.figures import document_map_figure, save_figure
    from lhtcli.render.tables import document_map_table

    console = Console(stderr=json_)
    started = time.perf_counter()
    description, doc = read_document(document)
    loaded = load_model(checkpoint, config, set_, device.value if device else None, document=doc)
    num_layers, num_heads = loaded.model.cfg.num_layers, loaded.model.cfg.n_heads
    chosen = layer.strip().lower()
    if chosen == "all":
        layers = list(range(num_layers))
    elif chosen == "last":
        layers = [num_layers - 1]
    elif chosen.isdigit() and int(chosen) < num_layers:
        layers = [int(chosen)]
    else:
        raise LHTError(f"--layer {layer}: give a layer index 0-{num_layers - 1}, 'last' or 'all'")
    if head is not None and head >= num_heads:
        raise LHTError(f"--head {head}: the model has {num_heads} heads (0-{num_heads - 1})")

    layout = DocumentLayout.build(document_sequences(loaded, doc), token_namer(loaded.tokenizer))
    if start >= layout.num_tokens:
        raise LHTError(f"--start {start}: the document has only {layout.num_tokens} tokens (0-{layout.num_tokens - 1})")
    stop = layout.num_tokens if span is None else min(layout.num_tokens, start + span)
    if unit == Unit.auto:
        units = ["tokens"] if stop - start <= TOKEN_UNITS_UP_TO else ["sentences", "sections"]
    elif unit == Unit.both:
        units = ["sentences", "sections"]
    else:
        units = [unit.value]
    if "tokens" in units and stop - start > 2048:
        raise LHTError(f"--unit tokens draws one cell per token pair: give --span of at most 2048 (got {stop - start})")

    chosen_seqs = sum(
        1 for seq, off in zip(layout.sequences, layout.offsets, strict=True)
        if off < stop and off + len(seq.input_ids) > start
    )
    with Progress(
        TextColumn("[bold]pooling attention[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=json_,
    ) as progress:
        task = progress.add_task("map", total=chosen_seqs)
        maps = document_maps(
            loaded.model,
            layout,
            loaded.tokenizer.pad_id,
            units,
            layers,
            start=start,
            stop=stop,
            head=head,
            batch_size=loaded.config.training.batch_size,
            on_batch=lambda count: progress.advance(task, count),
        )
    ordered = [maps[(lay, u)] for lay in layers for u in units]
    who = "mean over heads" if head is None else f"head {head}"
    path = save_figure(
        document_map_figure(ordered, title=f"{description}: {layout.num_tokens:,} tokens, {who}"), output
    )
    seconds = time.perf_counter() - started

    if json_:
        typer.echo(
            json.dumps(
                {
                    "model": loaded.source,
                    "step": loaded.step,
                    "text": description,
                    "num_tokens": layout.num_tokens,
                    "num_sequences": len(layout.sequences),
                    "start": start,
                    "stop": stop,
                    "figure": str(path),
                    "seconds": seconds,
                    "maps": [m.to_json() for m in ordered],
                }
            )
        )
        return
    console.print(f"model: {loaded.source}")
    console.print(
        f"text: {description} ({layout.num_tokens:,} tokens in {len(layout.sequences)} sequence(s) of at most "
        f"{loaded.model.cfg.max_seq_len}); shown: tokens {start}-{stop - 1}"
    )
    console.print(document_map_table(ordered))
    console.print(f"[green]✓[/green] attention map ({', '.join(units)}; {who}) saved to {path} in {seconds:.1f} s")
