"""Option types and helpers shared by the ``lht`` subcommands.

This module is imported on every ``lht`` invocation, including each shell-completion Tab press, so
it must stay light: typer and the standard library only. Commands import torch, the config models
and everything else heavy inside their function bodies.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from lhtcli.config import LHTConfig


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class LogTo(StrEnum):
    tensorboard = "tensorboard"
    wandb = "wandb"


def complete_path(incomplete: str) -> list[str]:
    """No candidates, so that bash (``complete -o default``), zsh and fish fall back to file names."""
    return []


def _check_layer(value: str) -> str:
    text = value.strip().lower()
    if text == "all" or (text.isdigit() and text != ""):
        return text
    raise typer.BadParameter(f"expected a layer index (0, 1, ...) or 'all', got {value!r}")


def layer_index(value: str) -> int | None:
    """``--layer`` as an int, or ``None`` for ``all``."""
    text = _check_layer(value)
    return None if text == "all" else int(text)


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Experiment YAML file.",
        show_default="the packaged cpu_small.yaml",
        dir_okay=False,
        autocompletion=complete_path,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override one config key, e.g. --set training.num_steps=100 (repeatable; beats env and file).",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    Device | None,
    typer.Option("--device", help="Where to run; overrides the config's device.", show_default=False),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="A .ckpt written by lht train, or a folder written by lht export (without it, --config builds a "
        "randomly initialised model).",
        show_default=False,
        autocompletion=complete_path,
    ),
]
DocumentOpt = Annotated[
    Path | None,
    typer.Option(
        "--document",
        help="A .jsonl (first document), .txt or .md file to analyse.",
        show_default="a built-in sample",
        autocompletion=complete_path,
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables."),
]
BatchesOpt = Annotated[
    int,
    typer.Option("--batches", min=1, help="How many batches to average over."),
]
LayerOpt = Annotated[
    str,
    typer.Option("--layer", callback=_check_layer, help="Layer index, or 'all' for every layer."),
]


def config_overrides(
    sets: list[str] | None,
    device: Device | None = None,
    extra: dict[str, object] | None = None,
) -> list[str]:
    """``--set`` items followed by the ones implied by dedicated flags (which win over ``--set``)."""
    overrides = list(sets or [])
    if device is not None:
        overrides.append(f"device={device.value}")
    for key, value in (extra or {}).items():
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


def resolve_config(
    config: Path | None,
    sets: list[str] | None = None,
    device: Device | None = None,
    extra: dict[str, object] | None = None,
) -> LHTConfig:
    """Load ``config`` (default: the packaged cpu_small.yaml) with env and command-line overrides."""
    from lhtcli.config import default_config_path, load_config

    return load_config(config or default_config_path(), config_overrides(sets, device, extra))
