"""``lht demo``: a seconds-long tour of hierarchical positions and ML-SWA on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lhtcli.commands._common import JsonOpt

EPILOG = """\
examples:

  lht demo
  lht demo --output-dir /tmp/lht-demo --seed 1
  lht demo --json
"""

DEMO_MODEL = {
    "d_model": 64,
    "n_heads": 4,
    "num_layers": 2,
    "d_ff": 128,
    "dropout": 0.0,
    "max_seq_len": 1024,
    "mlswa": {"num_levels": 3, "window_size_per_level": [12, 3, 2], "layer_max_level": [1, 2]},
}
HEATMAP_TOKENS = 60
MASK_TOKENS = 80


def demo(
    output_dir: Annotated[
        Path,
        typer.Option("--output-dir", help="Folder for the demo's figures.", file_okay=False),
    ] = Path("lht-demo"),
    seed: Annotated[int, typer.Option("--seed", help="Random seed for the small model.")] = 42,
    json_: JsonOpt = False,
) -> None:
    """Show a sample document, its hierarchical positions, the ML-SWA mask, a heatmap and entropies.

    Needs no data, checkpoint or GPU; takes seconds.
    """
    import json
    import time

    started = time.perf_counter()
    import torch
    from rich.console import Console

    from lhtcli.config import LHTConfig
    from lhtcli.core.positions import build_sequences
    from lhtcli.diagnostics.attention_stats import EntropyAccumulator, attention_map, capture_attention
    from lhtcli.diagnostics.loading import sample_tokenizer
    from lhtcli.diagnostics.reach import default_sources, reachability
    from lhtcli.diagnostics.sample_document import SAMPLE_TITLE, sample_document
    from lhtcli.model import LHTEncoder, describe_size
    from lhtcli.render.figures import attention_heatmap, entropy_figure, mask_figure, reach_figure, save_figure
    from lhtcli.render.tables import entropy_table, positions_table, reach_table

    console = Console(stderr=json_)
    cfg = LHTConfig.model_validate({"seed": seed, "device": "cpu", "model": DEMO_MODEL})
    doc = sample_document()
    tokenizer = sample_tokenizer()
    sequence = build_sequences(tokenizer.encode_document(doc), cfg.model.max_seq_len, tokenizer.doc_id)[0]
    tokens = [tokenizer.id_to_token(i) for i in sequence.input_ids]
    positions = sequence.positions.batched()
    input_ids = torch.tensor([sequence.input_ids])
    torch.manual_seed(seed)
    model = LHTEncoder(cfg.model.model_copy(update={"vocab_size": tokenizer.vocab_size})).eval()
    windows = list(cfg.model.mlswa.window_size_per_level)

    captures = capture_attention(model, input_ids, positions)
    stats = EntropyAccumulator(windows)
    stats.add(captures, positions)
    report = stats.report()
    top = captures[-1]
    amap = attention_map(top, positions, windows, tokens, max_tokens=HEATMAP_TOKENS)
    sources = default_sources(positions)
    labels = ["[DOC]" if s == 0 and positions.has_doc_token else tokens[s] for s in sources]
    reach = reachability(positions, windows, cfg.model.max_levels(), sources, labels)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "mask": save_figure(
            mask_figure(positions, windows, tokens=tokens, max_tokens=MASK_TOKENS),
            output_dir / "mlswa_mask.png",
        ),
        "heatmap": save_figure(
            attention_heatmap(amap, color_by_level=True), output_dir / "attention_heatmap.png"
        ),
        "entropy": save_figure(entropy_figure(report), output_dir / "entropy.png"),
        "reachability": save_figure(reach_figure(reach), output_dir / "reachability.png"),
    }
    seconds = time.perf_counter() - started
    num_sentences = sum(len(section) for section in doc)
    enums = [e[0].tolist() for e in positions.level_enums]

    if json_:
        typer.echo(
            json.dumps(
                {
                    "document": {
                        "title": SAMPLE_TITLE,
                        "sections": len(doc),
                        "sentences": num_sentences,
                        "tokens": len(tokens),
                    },
                    "tokens": tokens,
                    "positions": {"tokens": enums[0], "sentences": enums[1], "sections": enums[2]},
                    "windows": windows,
                    "layer_max_level": cfg.model.max_levels(),
                    "model": {
                        "parameters": model.num_parameters(),
                        "layers": cfg.model.num_layers,
                        "heads": cfg.model.n_heads,
                        "d_model": cfg.model.d_model,
                        "seed": seed,
                    },
                    "heatmap": amap.to_json(),
                    "entropy": report.to_json(per_head=False),
                    "reachability": reach.to_json(),
                    "files": {k: str(v) for k, v in files.items()},
                    "seconds": seconds,
                }
            )
        )
        return
    console.rule("[bold]lht demo[/bold]: hierarchical positions and ML-SWA attention")
    console.print(
        f'Sample document "{SAMPLE_TITLE}": {len(doc)} sections, {num_sentences} sentences, '
        f"{len(tokens)} tokens (with the leading [DOC] = {tokens[0]})."
    )
    console.print(positions_table(positions, tokens, max_tokens=40))
    console.print(
        f"ML-SWA windows {windows} (tokens, sentences, sections): a token sees tokens within {windows[0]} "
        f"positions; a sentence start also sees the starts of the {windows[1]} nearest sentences on each "
        f"side; a section start the {windows[2]} nearest section starts; [DOC] sees every section start."
    )
    console.print(
        f"Model: {describe_size(model.num_parameters())} parameters, {cfg.model.num_layers} layers "
        f"(highest level per layer {cfg.model.max_levels()}), {cfg.model.n_heads} heads, "
        f"random weights (seed {seed})."
    )
    console.print(entropy_table(report, title="Attention entropy (random weights: close to uniform)"))
    console.print(f"[green]✓[/green] ML-SWA mask (first {MASK_TOKENS} tokens): {files['mask']}")
    console.print(
        f"[green]✓[/green] attention heatmap, layer {top.layer}, first {HEATMAP_TOKENS} tokens, "
        f"cells coloured by the level that allows them: {files['heatmap']}"
    )
    console.print(f"[green]✓[/green] entropy chart: {files['entropy']}")
    console.print(reach_table(reach, title="How far information can travel (from the mask alone)"))
    console.print(f"[green]✓[/green] reachability chart: {files['reachability']}")
    console.print(
        f"done in {seconds:.1f} s. Next: [bold]lht train[/bold], then "
        "[bold]lht visualize --checkpoint checkpoints/lht_default/last.ckpt[/bold]"
    )
