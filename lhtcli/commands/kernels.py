"""``lht kernels``: show, build and remove the compiled native CPU kernels (core/native.py)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from lhtcli.errors import LHTError

STATUS_EPILOG = """\
examples:

  lht kernels status
  lht kernels status --json
"""

BUILD_EPILOG = """\
examples:

  lht kernels build
  lht kernels build --force --verbose
  LHT_KERNEL_CACHE=/tmp/lht-kernels lht kernels build
"""

CLEAN_EPILOG = """\
examples:

  lht kernels clean
  lht kernels clean && lht kernels build
"""


class KernelBuildError(LHTError):
    """The native kernel could not be built (or is disabled): the flash kernel path still works."""

    exit_code = 1


kernels_app = typer.Typer(
    help="Show, build or remove the native CPU kernel (compiled once per machine on first use).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MB"


def _when(stamp: float | None) -> str:
    return "-" if not stamp else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _status_lines(info: dict[str, Any]) -> list[str]:
    lines = [f"supported:   {'yes' if info['supported'] else 'no (' + str(info['reason']) + ')'}",
             f"cache:       {info['cache_dir']}",
             f"build hash:  {info['build_hash'] or '-'}"]
    if info["built"]:
        took = f", took {info['build_seconds']:.0f} s" if info.get("build_seconds") else ""
        lines += [f"built:       yes, {info['library']}",
                  f"size:        {_size(info['size_bytes'])} (built {_when(info['built_at'])}{took})"]
    else:
        lines.append("built:       no (built on first use by lht train, or now by: lht kernels build)")
    for lock in info["locks"]:
        state = "building now" if lock["held"] else "stale (its build was interrupted; taken over by the next build)"
        lines.append(f"lock:        {lock['path']}: pid {lock['pid']}, since {_when(lock['started'])}, {state}")
    for temp in info["temp_dirs"]:
        state = "abandoned (removed by the next build or lht kernels clean)" if temp["abandoned"] else "in progress"
        lines.append(f"temporary:   {temp['path']} (pid {temp['pid']}, {state})")
    for legacy in info["legacy_locks"]:
        state = "an older lht is building" if legacy["running"] else "stale, ignored (lht kernels clean removes it)"
        lines.append(f"old lock:    {legacy['path']} ({state})")
    if info["other_builds"]:
        lines.append(f"other builds: {', '.join(info['other_builds'])} (other sources or torch versions)")
    return lines


@kernels_app.command("status", epilog=STATUS_EPILOG)
def status(
    json_: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Is the native kernel supported here, built, where, how large; is a build running or left over?"""
    import json

    from lhtcli.core import native

    info = native.inventory()
    if json_:
        typer.echo(json.dumps(info, indent=1))
        return
    typer.echo("\n".join(_status_lines(info)))


@kernels_app.command("build", epilog=BUILD_EPILOG)
def build(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when a build is cached.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the compiler's output.")] = False,
) -> None:
    """Build the native kernel now (lht train otherwise builds it on first use)."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from lhtcli.core import native

    reason = native._why_unsupported()
    if reason is not None:
        raise KernelBuildError(f"the native kernel cannot be built here: {reason}")
    console = Console(stderr=True)
    started = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True, disable=verbose or not console.is_terminal) as progress:
        task = progress.add_task("checking the kernel cache", total=None)

        def report(message: str, waiting: bool = False) -> None:
            if verbose or not console.is_terminal:
                console.print(message)
            progress.update(task, description=message)

        reason = native.build(report, force=force, verbose=verbose)
    if reason is not None:
        raise KernelBuildError(f"the native kernel did not build: {reason} (see the compiler's output with "
                               "lht kernels build --verbose; lht keeps using the slower flash kernel)")
    info = native.inventory()
    typer.echo(f"✓ native kernel ready in {time.perf_counter() - started:.0f} s: {info['library']} "
               f"({_size(info['size_bytes'])})")


@kernels_app.command("clean", epilog=CLEAN_EPILOG)
def clean() -> None:
    """Remove built kernels, left-over temporary build directories and stale locks (never a running build's)."""
    from lhtcli.core import native

    removed, kept = native.clean()
    for path in removed:
        typer.echo(f"removed {path}")
    for what in kept:
        typer.echo(f"kept {what}")
    if not removed and not kept:
        typer.echo(f"nothing to remove in {native.cache_dir()}")
