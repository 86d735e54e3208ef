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
)
from lhtcli.errors import NotReadyError

EPILOG = """\
examples:

  lht visualize --checkpoint checkpoints/lht_default/last.ckpt
  lht visualize --config configs/cpu_small.yaml --layer 3 --head 0 --max-tokens 40 -o layer3.png
  lht visualize --checkpoint checkpoints/lht_default/last.ckpt --document paper.md --color-by-level
  lht visualize --checkpoint checkpoints/lht_default/last.ckpt --layer all --json
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
        typer.Option("--output", "-o", help="Where to save the PNG.", dir_okay=False, autocompletion=complete_path),
    ] = Path("attention_visualization.png"),
    log_to: Annotated[
        LogTo | None,
        typer.Option("--log-to", help="Also log the figure to this backend (under the config's run).",
                     show_default=False),
    ] = None,
    json_: JsonOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Draw one layer's attention over a document as a heatmap.

    Tokens on both axes, sentence and section boundaries drawn, masked-out pairs distinct from weak attention.

    Works on a trained --checkpoint, or on random weights from --config.
    """
    raise NotReadyError("lht visualize is not implemented yet (the attention probes have not landed)")
