"""``lht demo``: a seconds-long tour of hierarchical positions and ML-SWA on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lhtcli.commands._common import JsonOpt
from lhtcli.errors import NotReadyError

EPILOG = """\
examples:

  lht demo
  lht demo --output-dir /tmp/lht-demo --seed 1
  lht demo --json
"""


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
    raise NotReadyError("lht demo is not implemented yet (the demo has not landed)")
