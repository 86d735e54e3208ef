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
from lhtcli.errors import NotReadyError

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
    per_head: Annotated[bool, typer.Option("--per-head", help="One row per head instead of per layer.")] = False,
    json_: JsonOpt = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Also save an entropy chart as PNG.", show_default=False,
                     dir_okay=False, autocompletion=complete_path),
    ] = None,
    device: DeviceOpt = None,
) -> None:
    """Tabulate attention entropy per layer: mean, std, min, max and normalised entropy.

    Flags layers whose attention looks collapsed (very low entropy) or diffuse (very high).

    Normalised entropy divides by log(#allowed keys): the fair comparison across ML-SWA rows.
    """
    raise NotReadyError("lht entropy is not implemented yet (the attention probes have not landed)")
