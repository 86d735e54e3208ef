"""``lht train`` and the ``lht config`` helpers (show, validate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lhtcli.commands._common import ConfigOpt, DeviceOpt, SetOpt, complete_path, resolve_config
from lhtcli.errors import CheckpointError, ConfigError, NotReadyError

TRAIN_EPILOG = """\
examples:

  lht train
  lht train --set training.num_steps=200 --time-limit 2
  lht train -c configs/pretrain_hierarchical.yaml --set data.path=corpus.jsonl --set data.tokenizer=train
  lht train --resume auto
  lht train --nproc 2 --set training.grad_accum_steps=1
  torchrun --nproc_per_node 4 -m lhtcli train -c configs/pretrain_hierarchical.yaml
"""

CONFIG_SHOW_EPILOG = """\
examples:

  lht config show
  lht config show --config configs/pretrain_hierarchical.yaml --set model.num_layers=6 > my.yaml
"""

CONFIG_VALIDATE_EPILOG = """\
examples:

  lht config validate --config configs/cpu_small.yaml
  lht config validate --config my.yaml --set data.path=corpus.jsonl
"""


def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="PATH|auto",
            help="Continue from a checkpoint file, or 'auto' for the experiment's last.ckpt (if any).",
            show_default=False,
            autocompletion=complete_path,
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No live progress display; log lines only.")
    ] = False,
    device: DeviceOpt = None,
    time_limit: Annotated[
        float | None,
        typer.Option(
            "--time-limit",
            metavar="MINUTES",
            help="Stop cleanly (with a checkpoint) after this many minutes; sets training.time_limit_minutes.",
            show_default=False,
        ),
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Train on this many local processes (launches torchrun: DDP, gloo on CPU, nccl on CUDA).",
        ),
    ] = 1,
) -> None:
    """Pretrain an ML-SWA encoder with masked-language modelling.

    Runs the experiment in --config (default: a small model on the built-in corpus, minutes on a CPU).

    Logs go to runs/{experiment_name}, checkpoints to checkpoints/{experiment_name};
    --resume auto continues from checkpoints/{experiment_name}/last.ckpt.
    """
    if resume is not None and resume != "auto" and not Path(resume).is_file():
        raise CheckpointError(
            f"--resume {resume}: no such checkpoint file "
            "(pass a .ckpt written by lht train, or 'auto' for the experiment's last.ckpt)"
        )
    cfg = resolve_config(config, set_, device, {"training.time_limit_minutes": time_limit})
    if nproc > 1:
        import os
        import sys

        if "WORLD_SIZE" in os.environ:
            raise ConfigError("--nproc cannot be used inside torchrun; torchrun already sets the process count")
        from lhtcli.training.distributed import launch

        raise typer.Exit(launch(nproc, _without_nproc(sys.argv[1:])))
    try:
        from lhtcli.training.trainer import run_training
    except ImportError as exc:
        if not (exc.name or "").startswith("lhtcli.training"):
            raise
        raise NotReadyError(
            "lht train is not implemented yet: the training loop (lhtcli.training.trainer) has not landed"
        ) from exc
    run_training(cfg, resume=resume, quiet=quiet)


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line minus --nproc (each launched process is one rank)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


config_app = typer.Typer(
    help="Show or check the resolved experiment configuration.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


@config_app.command("show", epilog=CONFIG_SHOW_EPILOG)
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved configuration as YAML (defaults < file < LHT_* env < --set).

    The output is itself a valid config file.
    """
    import yaml

    cfg = resolve_config(config, set_)
    typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip())


@config_app.command("validate", epilog=CONFIG_VALIDATE_EPILOG)
def config_validate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Check a configuration and list every problem at once (exit code 2 when invalid).

    Besides the schema, checks that data.path and data.tokenizer point at existing files.
    """
    from lhtcli.config import default_config_path

    path = config or default_config_path()
    cfg = resolve_config(path, set_)
    problems = []
    if cfg.data.path != "builtin" and not Path(cfg.data.path).exists():
        problems.append(
            f"  data.path: {cfg.data.path} does not exist (a .jsonl/.json/.parquet file, a folder of .txt/.md or "
            ".parquet files, a Hugging Face dataset saved with save_to_disk, or builtin)"
        )
    if cfg.data.tokenizer != "train" and not Path(cfg.data.tokenizer).is_file():
        problems.append(
            f"  data.tokenizer: {cfg.data.tokenizer} does not exist (a tokenizer.json file, or train)"
        )
    if problems:
        raise ConfigError("\n".join([f"invalid configuration ({path}):", *problems]))
    typer.echo(f"✓ {path} is valid ({cfg.experiment_name}: {cfg.model.num_layers} layers, d_model "
               f"{cfg.model.d_model}, {cfg.training.num_steps} steps on {cfg.data.path})")
