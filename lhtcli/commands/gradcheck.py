"""``lht gradcheck``: gradient norms per layer, with vanishing/exploding warnings."""

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

  lht gradcheck --checkpoint checkpoints/lht_default/last.ckpt
  lht gradcheck --config configs/cpu_small.yaml --batches 2 --strict
  lht gradcheck --config configs/cpu_small.yaml --numerical --json
"""


def gradcheck(
    checkpoint: CheckpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    document: DocumentOpt = None,
    batches: BatchesOpt = 1,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit non-zero when any gradient vanishes or explodes.")
    ] = False,
    numerical: Annotated[
        bool,
        typer.Option("--numerical", help="Also compare autograd with finite differences on a tiny model."),
    ] = False,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Where to save the gradient-flow chart.",
            dir_okay=False,
            autocompletion=complete_path,
        ),
    ] = Path("gradient_flow.png"),
    json_: JsonOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Run forward/backward passes and report gradient norms per layer.

    Warns about vanishing (< 1e-5) and exploding (> 10) gradients and saves a gradient-flow chart.
    """
    import json
    import math

    import torch
    from rich.console import Console

    from lhtcli.diagnostics.gradients import attention_gradcheck, gradient_report
    from lhtcli.diagnostics.loading import load_model, read_document, text_source
    from lhtcli.render.figures import gradient_flow_figure, save_figure
    from lhtcli.render.tables import gradient_table

    console = Console(stderr=json_)
    doc = read_document(document)[1] if document is not None else None
    loaded = load_model(checkpoint, config, set_, device.value if device else None, document=doc)
    source = text_source(loaded, document, batches, masked=True)
    model = loaded.model
    torch.manual_seed(loaded.config.seed)
    model.train()  # gradients as training sees them (dropout on)
    model.zero_grad(set_to_none=True)
    losses = []
    for batch in source.batches:
        batch = batch.to(loaded.device)
        loss = model(batch.input_ids, batch.positions, labels=batch.labels).loss
        (loss / len(source.batches)).backward()
        losses.append(float(loss.detach()))
    model.eval()
    report = gradient_report(model)
    path = save_figure(gradient_flow_figure(report), output)
    checks = attention_gradcheck() if numerical else None
    numerical_ok = checks is None or all(c["passed"] for c in checks)
    mean_loss = sum(losses) / len(losses)

    if json_:
        data = {
            "model": loaded.source,
            "step": loaded.step,
            "text": source.description,
            "batches": len(source.batches),
            "loss": mean_loss if math.isfinite(mean_loss) else str(mean_loss),
            "figure": str(path),
        }
        data.update(report.to_json())
        data["numerical"] = checks
        typer.echo(json.dumps(data))
    else:
        console.print(f"model: {loaded.source}")
        console.print(
            f"text: {source.description}; {len(source.batches)} MLM batch(es), mean loss {mean_loss:.4f}"
        )
        console.print(gradient_table(report))
        for line in report.warnings():
            console.print(f"[red]⚠ {line}[/red]", highlight=False)
        console.print(f"[green]✓[/green] gradient-flow chart saved to {path}")
        if checks is not None:
            for c in checks:
                mark = "[green]✓[/green]" if c["passed"] else "[red]✗[/red]"
                console.print(
                    f"{mark} autograd vs finite differences: {c['name']} "
                    f"(max relative error {c['max_rel_error']:.1e})"
                )
        verdict = (
            "[green]healthy[/green]" if report.healthy and numerical_ok else "[bold red]unhealthy[/bold red]"
        )
        console.print(f"gradients: {verdict}")
    if strict and not (report.healthy and numerical_ok):
        raise typer.Exit(1)
