"""The ``lht`` command line: registers the subcommands and turns user errors into one-line messages.

Importing this module must stay cheap (shell completion runs ``lht`` on every Tab press): no torch,
wandb, matplotlib, tensorboard, tokenizers or pydantic here or in ``lhtcli.commands``.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from lhtcli import __version__
from lhtcli.commands import demo, docmap, entropy, export, gradcheck, kernels, train, visualize
from lhtcli.errors import LHTError

HELP = """\
Pretrain and inspect Learned Hierarchical Transformers.

ML-SWA (Multi-Level Sliding Window Attention) lets a token attend to nearby tokens, sentences and sections.

Each level has its own sliding window, so attention cost grows linearly with document length.
"""

_state = {"debug": False}


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past typer (which would turn it into a silent exit 130)."""


class _LHTGroup(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Interrupted() from exc


app = typer.Typer(
    name="lht",
    help=HELP,
    cls=_LHTGroup,
    rich_markup_mode="rich",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"lht {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar="LHT_DEBUG", help="Show full tracebacks for errors."),
    ] = False,
) -> None:
    if debug:
        _state["debug"] = True


_COMMANDS = [
    (train.train, "train", "Training", train.TRAIN_EPILOG),
    (visualize.visualize, "visualize", "Inspection", visualize.EPILOG),
    (entropy.entropy, "entropy", "Inspection", entropy.EPILOG),
    (docmap.docmap, "map", "Inspection", docmap.EPILOG),
    (gradcheck.gradcheck, "gradcheck", "Inspection", gradcheck.EPILOG),
    (demo.demo, "demo", "Getting started", demo.EPILOG),
    (export.export, "export", "Sharing", export.EPILOG),
]
for _func, _name, _panel, _epilog in _COMMANDS:
    app.command(_name, rich_help_panel=_panel, epilog=_epilog)(_func)
app.add_typer(train.config_app, name="config", rich_help_panel="Training")
app.add_typer(kernels.kernels_app, name="kernels", rich_help_panel="Setup")


def _debug_requested() -> bool:
    return _state["debug"] or os.environ.get("LHT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _print_error(message: str) -> None:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, highlight=False).print(Text(f"error: {message}", style="red"), soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: ``lht``. Exits 2 on user errors, 130 on Ctrl-C."""
    _state["debug"] = False
    try:
        app(args=argv, prog_name="lht")
    except LHTError as exc:
        if _debug_requested():
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        _print_error(str(exc))
        sys.exit(exc.exit_code)
    except (_Interrupted, KeyboardInterrupt):
        if _debug_requested():
            import traceback

            traceback.print_exc(file=sys.stderr)
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
