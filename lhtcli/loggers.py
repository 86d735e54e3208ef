"""Metric loggers: TensorBoard, Weights & Biases, none, or both behind one interface.

Backends are imported lazily. A backend that fails mid-run is switched off with one warning instead
of ending a training run that may have been going for days.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Protocol

from lhtcli.config import LHTConfig


class Logger(Protocol):
    def log_scalars(self, values: dict[str, float], step: int) -> None: ...
    def log_figure(self, tag: str, figure: Any, step: int) -> None: ...
    def log_table(self, tag: str, columns: list[str], rows: list[list[str]], step: int) -> None: ...
    def log_text(self, tag: str, text: str, step: int) -> None: ...
    def log_config(self, config: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class NullLogger:
    def log_scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        pass

    def log_table(self, tag: str, columns: list[str], rows: list[list[str]], step: int) -> None:
        pass

    def log_text(self, tag: str, text: str, step: int) -> None:
        pass

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    name = "tensorboard"

    def __init__(self, log_dir: Path, on_warning=warnings.warn) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self._warn = on_warning
        self._writer_class = SummaryWriter
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def _live_writer(self):
        """The writer, reopened in a recreated directory if the old one vanished (its events went with it).

        Without this check a deleted directory swallows every later event silently: the open file lives on.
        """
        if not self.log_dir.is_dir():
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 - the old file is gone anyway
                pass
            self.log_dir.mkdir(parents=True, exist_ok=True)  # an OSError here drops this backend (FanOutLogger)
            self.writer = self._writer_class(log_dir=str(self.log_dir))
            self._warn(f"the TensorBoard directory {self.log_dir} vanished; recreated it and logging continues "
                       "there (earlier events were deleted with it)")
        return self.writer

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        writer = self._live_writer()
        for tag, value in values.items():
            writer.add_scalar(tag, float(value), step)

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        self._live_writer().add_figure(tag, figure, step, close=False)

    def log_table(self, tag: str, columns: list[str], rows: list[list[str]], step: int) -> None:
        self._live_writer().add_text(tag, markdown_table(columns, rows), step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._live_writer().add_text(tag, text, step)

    def log_config(self, config: dict[str, Any]) -> None:
        self._live_writer().add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class WandbLogger:
    name = "wandb"

    def __init__(self, config: LHTConfig, run_dir: Path, on_warning=warnings.warn) -> None:
        import wandb

        self._wandb = wandb
        offline = config.wandb.offline
        if not offline and os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb_has_credentials():
            on_warning("no W&B API key configured (wandb login / WANDB_API_KEY): logging to W&B offline instead")
            offline = True
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=config.wandb.project,
            entity=config.wandb.entity,
            name=config.wandb.name or config.experiment_name,
            tags=list(config.wandb.tags),
            config=config.to_dict(),
            dir=str(run_dir),
            mode="offline" if offline else "online",
            reinit=True,
        )
        self.offline = offline

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({k: float(v) for k, v in values.items()}, step=step)

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        self.run.log({tag: self._wandb.Image(figure)}, step=step)

    def log_table(self, tag: str, columns: list[str], rows: list[list[str]], step: int) -> None:
        self.run.log({tag: self._wandb.Table(columns=columns, data=rows)}, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: self._wandb.Html(f"<pre>{text}</pre>")}, step=step)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


class FanOutLogger:
    """Sends every call to each active backend; a backend that raises is dropped with one warning."""

    def __init__(self, backends: list[Any], on_warning=warnings.warn) -> None:
        self.backends = list(backends)
        self._warn = on_warning

    @property
    def names(self) -> list[str]:
        return [getattr(b, "name", type(b).__name__) for b in self.backends]

    def _call(self, method: str, *args: Any) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a logging failure must never end training
                self.backends.remove(backend)
                name = getattr(backend, "name", type(backend).__name__)
                self._warn(f"{name} logging failed ({type(exc).__name__}: {exc}); continuing without it")

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self._call("log_scalars", values, step)

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        self._call("log_figure", tag, figure, step)

    def log_table(self, tag: str, columns: list[str], rows: list[list[str]], step: int) -> None:
        self._call("log_table", tag, columns, rows, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._call("log_text", tag, text, step)

    def log_config(self, config: dict[str, Any]) -> None:
        self._call("log_config", config)

    def close(self) -> None:
        self._call("close")


def create_logger(config: LHTConfig, backend: str | None = None, on_warning=warnings.warn) -> FanOutLogger:
    """The loggers ``logging.backend`` asks for, writing under ``runs/{experiment_name}``.

    A backend that cannot start (W&B unreachable or not installed, ...) is left out with a warning:
    metrics.jsonl and checkpoints still record the run.
    """
    backend = backend or config.logging.backend
    run_dir = config.run_dir()
    backends: list[Any] = []
    factories = []
    if backend in ("tensorboard", "both"):
        factories.append(("tensorboard", lambda: TensorBoardLogger(run_dir, on_warning)))
    if backend in ("wandb", "both"):
        factories.append(("wandb", lambda: WandbLogger(config, run_dir, on_warning)))
    for name, factory in factories:
        try:
            backends.append(factory())
        except Exception as exc:  # noqa: BLE001 - a logger must never keep a run from starting
            message = str(exc).splitlines()[0] if str(exc) else ""
            on_warning(f"{name} logging could not start ({type(exc).__name__}: {message}); continuing without it")
    return FanOutLogger(backends, on_warning)
