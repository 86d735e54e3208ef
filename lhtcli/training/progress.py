"""What a training run shows in the terminal: start-up panel, live progress bar, end summary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lhtcli.model import describe_size


class _LiveProgress:
    def __init__(self, progress: Progress | None, task: int | None, console: Console) -> None:
        self._progress, self._task, self._console = progress, task, console

    def update(self, step: int, loss: float, lr: float, tokens_per_second: float) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, completed=step, loss=f"{loss:.3f}", lr=f"{lr:.2e}", tps=f"{tokens_per_second:,.0f}"
            )

    def note(self, message: str) -> None:
        self._console.print(f"[dim]{message}[/dim]")


class TrainingDisplay:
    def __init__(self, console: Console, quiet: bool) -> None:
        self.console = console
        self.quiet = quiet

    def startup(self, cfg, model, data, device, logger_names: list[str], start_step: int,
                world_size: int = 1) -> None:
        if self.quiet:
            return
        n_params = model.num_parameters()
        mcfg = cfg.model
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan")
        table.add_column()
        table.add_row("model", f"{describe_size(n_params)} parameters ({n_params:,}): {mcfg.num_layers} layers, "
                      f"d_model {mcfg.d_model}, {mcfg.n_heads} heads, d_ff {mcfg.d_ff}")
        table.add_row("ML-SWA", f"windows {mcfg.mlswa.window_size_per_level} (tokens, sentences, sections), "
                      f"layer max level {model.cfg.max_levels()}, backend {mcfg.mlswa.backend}")
        tcfg = cfg.training
        global_batch = tcfg.batch_size * world_size * tcfg.grad_accum_steps
        table.add_row("batch", f"{global_batch} sequences of up to {mcfg.max_seq_len} tokens per step = "
                      f"{tcfg.batch_size} per rank x {world_size} rank{'s' if world_size > 1 else ''} x "
                      f"{tcfg.grad_accum_steps} accumulation")
        table.add_row("data", data.describe())
        table.add_row("device", f"{device} ({'fp32' if device.type == 'cpu' else cfg.training.mixed_precision})")
        table.add_row("steps", f"{start_step} -> {cfg.training.num_steps}"
                      + (f" (time limit {cfg.training.time_limit_minutes:g} min)"
                         if cfg.training.time_limit_minutes else ""))
        table.add_row("logs", f"{cfg.run_dir()} ({', '.join(logger_names) or 'no backend'}; metrics.jsonl)")
        table.add_row("checkpoints", str(cfg.checkpoint_dir()))
        title = f"lht train · {cfg.experiment_name}" + (f" · resuming at step {start_step}" if start_step else "")
        self.console.print(Panel(table, title=title, expand=False))

    @contextmanager
    def progress(self, start: int, total: int) -> Iterator[_LiveProgress]:
        if self.quiet:
            yield _LiveProgress(None, None, self.console)
            return
        progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        with progress:
            task = progress.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-")
            yield _LiveProgress(progress, task, self.console)

    def summary(self, summary: Any, run_dir: Path, ckpt_dir: Path) -> None:
        if self.quiet:
            return
        table = Table(title=f"Training finished: {summary.stopped}", show_header=True)
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("steps", str(summary.steps))
        if summary.train_loss is not None:
            table.add_row("final train loss", f"{summary.train_loss:.4f}")
        if summary.val:
            table.add_row("val loss", f"{summary.val['loss']:.4f}")
            table.add_row("val perplexity", f"{summary.val['perplexity']:.1f}")
            table.add_row("val masked-token accuracy", f"[bold green]{summary.val['accuracy']:.1%}[/bold green]")
        for name, accuracy in summary.baselines.items():
            table.add_row(f"  baseline: {name}", f"{accuracy:.1%}")
        table.add_row("throughput", f"{summary.tokens_per_second:,.0f} tokens/s")
        if summary.best_checkpoint:
            table.add_row("best checkpoint", str(summary.best_checkpoint))
        if summary.last_checkpoint:
            table.add_row("last checkpoint", str(summary.last_checkpoint))
        table.add_row("logs", str(run_dir))
        self.console.print(table)
