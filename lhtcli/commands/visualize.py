"""``lht visualize``: an attention heatmap of one document."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lhtcli.commands._common import (
    CheckpointOpt,
    ConfigOpt,
    DeviceOpt,
    DocumentOpt,
    JsonOpt,
    LayerOpt,
    LogTo,
    SetOpt,
    complete_path,
    layer_index,
)

EPILOG = """\
examples:

  lht visualize --checkpoint checkpoints/lht_default/last.ckpt
  lht visualize --config configs/cpu_small.yaml --layer 3 --head 0 --max-tokens 40 -o layer3.png
  lht visualize --checkpoint checkpoints/lht_default/last.ckpt --document paper.md --color-by-level
  lht visualize --checkpoint checkpoints/lht_default/last.ckpt --layer all --json
  lht visualize --checkpoint checkpoints/lht_default/last.ckpt --reach-from 0 --reach-from 200
"""


def visualize(
    checkpoint: CheckpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    document: DocumentOpt = None,
    layer: LayerOpt = "0",
    head: Annotated[
        int | None,
        typer.Option("--head", min=0, help="One head's attention.", show_default="the mean over heads"),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=2, help="Queries and keys shown (the first N from --start).")
    ] = 60,
    start: Annotated[int, typer.Option("--start", min=0, help="First token shown.")] = 0,
    color_by_level: Annotated[
        bool,
        typer.Option("--color-by-level", help="Colour each cell by the hierarchy level that allows it."),
    ] = False,
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Where to save the PNG.", dir_okay=False, autocompletion=complete_path
        ),
    ] = Path("attention_visualization.png"),
    log_to: Annotated[
        LogTo | None,
        typer.Option(
            "--log-to",
            help="Also log the figure to this backend (under the config's run).",
            show_default=False,
        ),
    ] = None,
    reach_from: Annotated[
        list[int] | None,
        typer.Option(
            "--reach-from",
            min=0,
            help="Token whose reach through the mask (after 1..L layers) is tabulated (repeatable).",
            show_default="[DOC], the middle and the last token",
        ),
    ] = None,
    json_: JsonOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Draw one layer's attention over a document as a heatmap.

    Tokens on both axes, sentence and section boundaries drawn, masked-out pairs distinct from weak attention.

    Also tabulates reachability: how many tokens information from [DOC] or --reach-from tokens can reach
    after 1, 2, ... layers through the mask (each layer's max level), next to a token window alone.

    Works on a trained --checkpoint, or on random weights from --config. For a whole document, see lht map.
    """
    import json

    from rich.console import Console

    from lhtcli.diagnostics.attention_stats import EntropyAccumulator, attention_map, capture_attention
    from lhtcli.diagnostics.loading import load_model, read_document, text_source
    from lhtcli.diagnostics.reach import default_sources, reachability
    from lhtcli.errors import LHTError
    from lhtcli.render.figures import attention_heatmap, close_figure, save_figure
    from lhtcli.render.tables import entropy_table, reach_table

    console = Console(stderr=json_)
    chosen_layer = layer_index(layer)
    doc = read_document(document)[1] if document is not None else None
    loaded = load_model(checkpoint, config, set_, device.value if device else None, document=doc)
    num_layers, num_heads = loaded.model.cfg.num_layers, loaded.model.cfg.n_heads
    if chosen_layer is not None and chosen_layer >= num_layers:
        raise LHTError(
            f"--layer {chosen_layer}: the model has {num_layers} layers (0-{num_layers - 1}) or use 'all'"
        )
    if head is not None and head >= num_heads:
        raise LHTError(f"--head {head}: the model has {num_heads} heads (0-{num_heads - 1})")

    source = text_source(loaded, document, 1, masked=False)
    batch = source.batches[0].to(loaded.device)
    length = int(batch.positions.real_mask[0].sum())
    if start >= length:
        raise LHTError(f"--start {start}: the first sequence has only {length} tokens")
    first = batch.positions.batched()[0:1].to("cpu")
    sources = list(reach_from) if reach_from else default_sources(first)
    if any(s >= length for s in sources):
        raise LHTError(f"--reach-from: the first sequence has only {length} tokens (0-{length - 1})")
    reach = reachability(
        first, loaded.windows, loaded.model.cfg.max_levels(), sources,
        ["[DOC]" if s == 0 and first.has_doc_token else source.tokens[0][s] for s in sources],
    )
    captures = capture_attention(loaded.model, batch.input_ids, batch.positions)
    layers = range(num_layers) if chosen_layer is None else [chosen_layer]
    maps = [
        attention_map(
            captures[i],
            batch.positions,
            loaded.windows,
            source.tokens[0],
            start=start,
            max_tokens=max_tokens,
            head=head,
        )
        for i in layers
    ]
    subject = maps if chosen_layer is None else maps[0]
    path = save_figure(attention_heatmap(subject, color_by_level=color_by_level), output)

    stats = EntropyAccumulator(loaded.windows)
    stats.add(captures, batch.positions)
    report = stats.report()

    if log_to is not None:
        from lhtcli.loggers import create_logger

        logger = create_logger(
            loaded.config,
            backend=log_to.value,
            on_warning=lambda msg: console.print(f"[yellow]⚠ {msg}[/yellow]"),
        )
        try:
            for amap in maps:
                fig = attention_heatmap(amap, color_by_level=color_by_level)
                try:
                    logger.log_figure(f"attention/layer_{amap.layer}", fig, loaded.step)
                finally:
                    close_figure(fig)
            logger.log_scalars(report.scalars(), loaded.step)
        finally:
            logger.close()

    shown = f"tokens {start}-{start + maps[0].probs.shape[0] - 1}"
    heads = "mean over heads" if head is None else f"head {head}"
    if json_:
        typer.echo(
            json.dumps(
                {
                    "figure": str(path),
                    "model": loaded.source,
                    "step": loaded.step,
                    "text": source.description,
                    "layer": "all" if chosen_layer is None else chosen_layer,
                    "head": head,
                    "maps": [m.to_json() for m in maps],
                    "entropy": report.to_json(per_head=False),
                    "reachability": reach.to_json(),
                    "logged_to": log_to.value if log_to is not None else None,
                }
            )
        )
        return
    console.print(f"model: {loaded.source}")
    console.print(f"text: {source.description}")
    which = "every layer" if chosen_layer is None else f"layer {chosen_layer}"
    console.print(f"[green]✓[/green] attention heatmap of {which} ({heads}, {shown}) saved to {path}")
    if log_to is not None:
        where = loaded.config.run_dir() if log_to.value == "tensorboard" else "W&B"
        console.print(f"[green]✓[/green] logged to {log_to.value} ({where}) at step {loaded.step}")
    console.print(entropy_table(report, title="Attention entropy of this batch"))
    console.print(reach_table(reach, title="Reachability in the first sequence"))
