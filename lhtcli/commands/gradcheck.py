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
from lhtcli.errors import NotReadyError

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
        typer.Option("--output", "-o", help="Where to save the gradient-flow chart.", dir_okay=False,
                     autocompletion=complete_path),
    ] = Path("gradient_flow.png"),
    json_: JsonOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Run forward/backward passes and report gradient norms per layer.

    Warns about vanishing (< 1e-5) and exploding (> 10) gradients and saves a gradient-flow chart.
    """
    raise NotReadyError("lht gradcheck is not implemented yet (the gradient diagnostics have not landed)")
