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
  lht gradcheck checkpoints/lht_default/checkpoint-1000.ckpt checkpoints/lht_default/last.ckpt
"""


def gradcheck(
    checkpoints: Annotated[
        list[Path] | None,
        typer.Argument(
            help="One or two .ckpt files (instead of --checkpoint); two are compared per layer and block "
            "on the same masked batches.",
            show_default=False,
            autocompletion=complete_path,
        ),
    ] = None,
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

    from rich.console import Console

    from lhtcli.diagnostics.gradients import attention_gradcheck
    from lhtcli.diagnostics.loading import checkpoint_paths, load_model, load_pair, read_document, text_source
    from lhtcli.render.figures import gradient_flow_figure, save_figure
    from lhtcli.render.tables import gradient_table

    console = Console(stderr=json_)
    paths = checkpoint_paths(checkpoint, checkpoints)
    doc = read_document(document)[1] if document is not None else None
    if len(paths) == 2:
        models = load_pair(paths, config, set_, device.value if device else None, doc)
        source = text_source(models[0], document, batches, masked=True)
        results = [_gradients(m, source) for m in models]
        _print_comparison(models, results, source, output, json_, console, strict)
        return
    loaded = load_model(paths[0] if paths else None, config, set_, device.value if device else None, document=doc)
    source = text_source(loaded, document, batches, masked=True)
    report, losses = _gradients(loaded, source)
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


def _gradients(loaded, source):
    """(gradient report, per-batch losses) of one model on the source's masked batches, as training sees
    them (train mode: dropout on, seeded by the config)."""
    import torch

    from lhtcli.diagnostics.gradients import gradient_report

    model = loaded.model
    torch.manual_seed(loaded.config.seed)
    model.train()
    model.zero_grad(set_to_none=True)
    losses = []
    for batch in source.batches:
        batch = batch.to(loaded.device)
        loss = model(batch.input_ids, batch.positions, labels=batch.labels).loss
        (loss / len(source.batches)).backward()
        losses.append(float(loss.detach()))
    model.eval()
    return gradient_report(model), losses


def _print_comparison(models, results, source, output, json_, console, strict) -> None:
    """``lht gradcheck A B``: group norms of both, their ratio, both charts side by side in one PNG."""
    import json
    import math

    from lhtcli.diagnostics.gradients import compare_gradients
    from lhtcli.render.figures import gradient_flow_figure, save_figure
    from lhtcli.render.tables import gradient_comparison_table

    (report_a, losses_a), (report_b, losses_b) = results
    rows = compare_gradients(report_a, report_b)
    labels = (f"A (step {models[0].step})", f"B (step {models[1].step})")
    stem = output.with_suffix("")
    paths = [
        save_figure(gradient_flow_figure(r, title=f"Gradient flow, {label} (total norm {r.total_norm:.3g})"),
                    stem.with_name(f"{stem.name}_{tag}").with_suffix(output.suffix or ".png"))
        for r, label, tag in ((report_a, labels[0], "A"), (report_b, labels[1], "B"))
    ]
    mean = [sum(v) / len(v) for v in (losses_a, losses_b)]
    healthy = report_a.healthy and report_b.healthy
    if json_:
        typer.echo(json.dumps({
            "a": {"model": models[0].source, "step": models[0].step, "loss": mean[0], **report_a.to_json()},
            "b": {"model": models[1].source, "step": models[1].step, "loss": mean[1], **report_b.to_json()},
            "text": source.description,
            "batches": len(source.batches),
            "changes": rows,
            "figures": [str(p) for p in paths],
        }, default=lambda v: str(v) if isinstance(v, float) and not math.isfinite(v) else v))
    else:
        console.print(f"A: {models[0].source}, mean loss {mean[0]:.4f}")
        console.print(f"B: {models[1].source}, mean loss {mean[1]:.4f}")
        console.print(f"text: {source.description}; {len(source.batches)} MLM batch(es)")
        console.print(gradient_comparison_table(rows, labels))
        for tag, report in (("A", report_a), ("B", report_b)):
            for line in report.warnings():
                console.print(f"[red]⚠ {tag}: {line}[/red]", highlight=False)
        console.print(f"[green]✓[/green] gradient-flow charts saved to {paths[0]} and {paths[1]}")
    if strict and not healthy:
        raise typer.Exit(1)
