"""The MLM pretraining loop: accumulation, clipping, evaluation, checkpoints, resume, logging."""

from __future__ import annotations

import math
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lhtcli.config import LHTConfig
from lhtcli.errors import CheckpointError, ConfigError, LHTError
from lhtcli.loggers import create_logger
from lhtcli.model import LHTEncoder
from lhtcli.training.checkpoint import (
    Checkpoint,
    check_model_compatible,
    load_checkpoint,
    resolve_resume_path,
    save_checkpoint,
)
from lhtcli.training.data_setup import DataBundle, prepare_data
from lhtcli.training.metrics import MetricsFile, evaluate, peak_memory_mb
from lhtcli.training.progress import TrainingDisplay
from lhtcli.training.schedule import make_scheduler


class TrainingStopped(LHTError):
    """The run cannot continue (e.g. repeated NaN losses); the last good checkpoint is kept."""


@dataclass
class TrainingSummary:
    steps: int
    train_loss: float | None
    val: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, float] = field(default_factory=dict)
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    stopped: str = "completed"
    tokens_per_second: float = 0.0


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available (use --device cpu or auto)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast_for(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; CPU trains in fp32 whatever the config says (DESIGN.md)."""
    if device.type != "cuda" or precision == "none":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits 130/143."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(LHTError):
    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        where = f"; checkpoint saved to {checkpoint}" if checkpoint else ""
        super().__init__(f"training interrupted by {signal.Signals(signum).name}{where} (resume with --resume auto)")
        self.exit_code = 128 + signum


def _load_resume(cfg: LHTConfig, resume: str | None) -> Checkpoint | None:
    if resume is None:
        return None
    path = resolve_resume_path(resume, cfg.checkpoint_dir())
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    saved, current = ckpt.config.model.model_dump(), cfg.model.model_dump()
    for key in set(saved) | set(current):
        if key == "vocab_size" and current.get(key) is None:
            continue
        if saved.get(key) != current.get(key) and key not in ("dropout",):
            raise CheckpointError(
                f"cannot resume from {path}: model.{key} is {saved.get(key)!r} in the checkpoint but "
                f"{current.get(key)!r} in this config"
            )
    return ckpt


def build_model(cfg: LHTConfig, vocab_size: int) -> LHTEncoder:
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size is {cfg.model.vocab_size} but the tokenizer has {vocab_size} tokens: "
            "set model.vocab_size: null to follow the tokenizer"
        )
    model_cfg = cfg.model.model_copy(update={"vocab_size": vocab_size})
    return LHTEncoder(model_cfg)


def _make_visualizer(cfg: LHTConfig, data: DataBundle, logger, console: Console):
    if not cfg.training.log_viz_every:
        return None
    from lhtcli.diagnostics.training_viz import TrainingVisualizer

    return TrainingVisualizer(cfg, data.tokenizer, logger, console)


def run_training(cfg: LHTConfig, resume: str | None = None, quiet: bool = False,
                 console: Console | None = None) -> TrainingSummary:
    """Train ``cfg`` from scratch or from a checkpoint; returns the end-of-run summary."""
    console = console or Console(quiet=quiet)
    device = resolve_device(cfg.device)
    ckpt = _load_resume(cfg, resume)
    seed_everything(cfg.seed)
    data = prepare_data(cfg, tokenizer_json=ckpt.tokenizer_json if ckpt else None, console=console)
    model = build_model(cfg, data.tokenizer.vocab_size).to(device)
    tcfg = cfg.training
    optimizer = torch.optim.AdamW(
        model.optimizer_groups(tcfg.weight_decay), lr=tcfg.learning_rate, betas=(0.9, 0.98), eps=1e-6
    )
    scheduler = make_scheduler(optimizer, tcfg)
    start_step = 0
    if ckpt is not None:
        check_model_compatible(ckpt, model)
        model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state:
            optimizer.load_state_dict(ckpt.optimizer_state)
        if ckpt.scheduler_state:
            scheduler.load_state_dict(ckpt.scheduler_state)
        if ckpt.data_state:
            data.train_stream.load_state_dict(ckpt.data_state)
        restore_rng(ckpt.rng_state)
        start_step = ckpt.step
    if start_step >= tcfg.num_steps:
        raise ConfigError(
            f"the checkpoint is already at step {start_step} and training.num_steps is {tcfg.num_steps}: "
            "raise training.num_steps to train further"
        )

    run_dir, ckpt_dir = cfg.run_dir(), cfg.checkpoint_dir()
    warn = (lambda msg: console.print(f"[yellow]⚠ {msg}[/yellow]")) if not quiet else (lambda msg: None)
    logger = create_logger(cfg, on_warning=warn)
    logger.log_config(cfg.to_dict())
    metrics_file = MetricsFile(run_dir / "metrics.jsonl", truncate_after=start_step)
    visualizer = _make_visualizer(cfg, data, logger, console)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and tcfg.mixed_precision == "fp16" else None

    display = TrainingDisplay(console, quiet)
    display.startup(cfg, model, data, device, logger.names, start_step)
    if visualizer is not None:
        console.print(visualizer.start_message())

    def snapshot(step: int, metrics: dict[str, Any]) -> Path:
        state = Checkpoint(
            step=step, config=cfg.model_copy(update={"model": model.cfg}), model_state=model.state_dict(),
            tokenizer_json=data.tokenizer.to_json_str(), optimizer_state=optimizer.state_dict(),
            scheduler_state=scheduler.state_dict(), rng_state=rng_state(),
            data_state=data.train_stream.state_dict(), metrics=metrics,
        )
        return save_checkpoint(state, ckpt_dir, keep=tcfg.keep_checkpoints)

    summary = TrainingSummary(steps=start_step, train_loss=None)
    best_val = math.inf
    bad_steps = 0
    last_saved_step = start_step
    started = time.perf_counter()
    window_tokens, window_start = 0, time.perf_counter()
    tokens_total = 0
    params = [p for p in model.parameters() if p.requires_grad]
    step = start_step
    try:
        with _StopRequest() as stop, display.progress(start_step, tcfg.num_steps) as progress:
            while step < tcfg.num_steps:
                model.train()
                step_start = time.perf_counter()
                loss_sum, step_tokens = 0.0, 0
                for _ in range(tcfg.grad_accum_steps):
                    batch = next(data.train_stream).to(device)
                    with autocast_for(device, tcfg.mixed_precision):
                        out = model(batch.input_ids, batch.positions, labels=batch.labels)
                    loss = out.loss / tcfg.grad_accum_steps
                    (scaler.scale(loss) if scaler else loss).backward()
                    loss_sum += float(loss.detach())
                    step_tokens += batch.num_tokens
                step += 1
                if not math.isfinite(loss_sum):
                    bad_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    warn(f"step {step}: loss is {loss_sum}; skipping this update ({bad_steps} in a row)")
                    if bad_steps >= tcfg.max_bad_steps:
                        raise TrainingStopped(
                            f"{bad_steps} consecutive steps had a NaN/Inf loss (last at step {step}); "
                            f"stopping. The last good checkpoint is in {ckpt_dir}. Lower "
                            "training.learning_rate or check the data."
                        )
                    continue
                if scaler:
                    scaler.unscale_(optimizer)
                viz_due = visualizer is not None and visualizer.due(step)
                grad_norms = visualizer.gradient_norms(model) if viz_due else None
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm))
                if not math.isfinite(grad_norm):
                    bad_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    warn(f"step {step}: gradient norm is {grad_norm}; skipping this update ({bad_steps} in a row)")
                    if bad_steps >= tcfg.max_bad_steps:
                        raise TrainingStopped(
                            f"{bad_steps} consecutive steps had NaN/Inf gradients (last at step {step}); stopping"
                        )
                    if scaler:
                        scaler.update()
                    continue
                bad_steps = 0
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_seconds = time.perf_counter() - step_start
                window_tokens += step_tokens
                tokens_total += step_tokens
                summary.train_loss = loss_sum
                summary.steps = step

                if step % tcfg.log_every == 0 or step == tcfg.num_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    scalars = {
                        "train/loss": loss_sum, "train/lr": lr, "train/grad_norm": grad_norm,
                        "train/tokens_per_second": window_tokens / elapsed, "train/seconds_per_step": step_seconds,
                        "train/peak_memory_mb": peak_memory_mb(device),
                    }
                    logger.log_scalars(scalars, step)
                    metrics_file.write(step, scalars)
                    window_tokens, window_start = 0, time.perf_counter()
                progress.update(step, loss_sum, lr, tokens_total / max(time.perf_counter() - started, 1e-9))

                if viz_due:
                    visualizer.log(step, model, batch, grad_norms)

                final = step == tcfg.num_steps
                out_of_time = tcfg.time_limit_minutes is not None and (
                    time.perf_counter() - started > 60 * tcfg.time_limit_minutes
                )
                if step % tcfg.eval_every == 0 or final or out_of_time:
                    val = evaluate(model, data.val_batches, device, lambda: autocast_for(device, tcfg.mixed_precision))
                    if val:
                        logger.log_scalars({f"val/{k}": v for k, v in val.items()}, step)
                        metrics_file.write(step, {f"val/{k}": v for k, v in val.items()})
                        summary.val = val
                        progress.note(f"step {step}: val loss {val['loss']:.3f}, accuracy {val['accuracy']:.1%}")
                        if val["loss"] < best_val:
                            best_val = val["loss"]
                            summary.best_checkpoint = ckpt_dir / f"checkpoint-{step}.ckpt"
                if step % tcfg.save_every == 0 or final or out_of_time or stop.signum is not None:
                    summary.last_checkpoint = snapshot(step, {"train_loss": loss_sum, **summary.val})
                    last_saved_step = step
                if stop.signum is not None:
                    raise Interrupted(stop.signum, summary.last_checkpoint)
                if out_of_time:
                    summary.stopped = f"time limit ({tcfg.time_limit_minutes:g} min) reached at step {step}"
                    break
    except KeyboardInterrupt:
        path = snapshot(step, {"train_loss": summary.train_loss}) if step > last_saved_step else summary.last_checkpoint
        logger.close()
        raise Interrupted(signal.SIGINT, path) from None
    except BaseException:
        logger.close()
        raise
    if summary.best_checkpoint is not None and not summary.best_checkpoint.exists():
        summary.best_checkpoint = summary.last_checkpoint
    summary.tokens_per_second = tokens_total / max(time.perf_counter() - started, 1e-9)
    summary.baselines = data.baselines() if summary.val else {}
    if summary.baselines:
        logger.log_scalars({f"val/baseline_{k}_accuracy": v for k, v in summary.baselines.items()}, summary.steps)
    logger.close()
    display.summary(summary, run_dir, ckpt_dir)
    return summary
