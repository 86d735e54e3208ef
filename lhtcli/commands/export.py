"""``lht export``: a checkpoint as a Hugging Face style folder (config.json, model.safetensors, tokenizer.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lhtcli.commands._common import complete_path

EPILOG = """\
examples:

  lht export --checkpoint checkpoints/lht_default/last.ckpt --output lht-model
  lht entropy --checkpoint lht-model
  lht export --checkpoint checkpoints/lht_default/checkpoint-1000.ckpt --output lht-model --force
"""


def export(
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint",
            help="A .ckpt written by lht train.",
            show_default=False,
            dir_okay=False,
            autocompletion=complete_path,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Folder to write (created; an existing non-empty folder needs --force).",
            show_default=False,
            file_okay=False,
            autocompletion=complete_path,
        ),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Replace the files of an existing non-empty --output folder.")
    ] = False,
) -> None:
    """Write a checkpoint's weights (safetensors), config and tokenizer to a folder.

    The folder works as --checkpoint for visualize, entropy and gradcheck; loading it never runs code.
    Optimizer state is left out: resume training from the .ckpt.
    """
    from rich.console import Console

    from lhtcli.training.export import export_checkpoint

    result = export_checkpoint(checkpoint, output, force)
    console = Console(highlight=False)
    console.print(f"[green]✓[/green] exported {checkpoint} (step {result.step}, {result.parameters:,} parameters) "
                  f"to {result.directory}/")
    for file in result.files:
        console.print(f"  {file.name:<18} {file.stat().st_size:>12,} bytes")
