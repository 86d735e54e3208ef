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
from lhtcli.core import native
from lhtcli.core.attention import choose_backend
from lhtcli.errors import CheckpointError, ConfigError, LHTError
from lhtcli.loggers import FanOutLogger, create_logger
from lhtcli.model import LHTEncoder
from lhtcli.training.allocator import reuse_freed_memory
from lhtcli.training.checkpoint import (
    Checkpoint,
    check_model_compatible,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lhtcli.training.data_setup import DataBundle, prepare_data
from lhtcli.training.distributed import ShardedStream, init_distributed, shard
from lhtcli.training.metrics import MetricsFile, evaluate_sums, metrics_from_sums, peak_memory_mb
from lhtcli.training.optimizer import build_adamw, keep_fused
from lhtcli.training.preflight import check_disk_space, check_output_dirs
from lhtcli.training.progress import TrainingDisplay
from lhtcli.training.schedule import apply_lr


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


def _load_resume(cfg: LHTConfig, resume: str | None, warn=None) -> Checkpoint | None:
    """``auto``: the newest checkpoint of the run that verifies (None: start fresh); else the given file."""
    if resume is None:
        return None
    ckpt = find_resume_checkpoint(cfg.checkpoint_dir(), warn) if resume == "auto" else load_checkpoint(resume)
    if ckpt is None:
        return None
    path = ckpt.path
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


class Trainer:
    """One training run. Rank 0 alone logs, prints and writes checkpoints; every rank computes."""

    def __init__(self, cfg: LHTConfig, resume: str | None, quiet: bool, console: Console | None) -> None:
        self.cfg, self.tcfg = cfg, cfg.training
        device = resolve_device(cfg.device)
        self.dist = init_distributed(device)
        self.device = self.dist.device(device)
        if self.device.type == "cpu":
            reuse_freed_memory()
        self.quiet = quiet or not self.dist.is_main
        self.console = console if console is not None and self.dist.is_main else Console(quiet=self.quiet)
        if self.dist.is_main:
            check_output_dirs(cfg)
        ckpt = _load_resume(cfg, resume, self.warn)
        seed_everything(cfg.seed)
        self.data = prepare_data(cfg, tokenizer_json=ckpt.tokenizer_json if ckpt else None,
                                 console=self.console, write_files=self.dist.is_main)
        self.stream = ShardedStream(self.data.train_stream, self.dist)
        self.val_batches = shard(self.data.val_batches, self.dist)
        self.model = build_model(cfg, self.data.tokenizer.vocab_size).to(self.device)
        self.optimizer = build_adamw(self.model, self.tcfg.learning_rate, self.tcfg.weight_decay)
        if self.dist.is_main:
            check_disk_space(cfg.checkpoint_dir(), self.model, self.tcfg.keep_checkpoints, self.warn)
        self._prepare_attention_kernel()
        self.start_step = 0
        self.elapsed_before = 0.0  # training seconds of earlier invocations (resume)
        self.warmup_seconds: float | None = None  # training seconds when the warmup ended (LR decay by time)
        if ckpt is not None:
            self._restore(ckpt)
        limit = self.tcfg.time_limit_minutes
        if limit is not None and self.elapsed_before >= 60 * limit:
            raise ConfigError(
                f"this run already trained for {self.elapsed_before / 60:.1f} min, its whole time limit "
                f"({limit:g} min): pass a larger --time-limit to continue"
            )
        if self.start_step >= self.tcfg.num_steps:
            raise ConfigError(
                f"the checkpoint is already at step {self.start_step} and training.num_steps is "
                f"{self.tcfg.num_steps}: raise training.num_steps to train further"
            )
        self.forward_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=ids)
        self.run_dir, self.ckpt_dir = cfg.run_dir(), cfg.checkpoint_dir()
        self.logger = create_logger(cfg, on_warning=self.warn) if self.dist.is_main else FanOutLogger([])
        self.metrics_file = MetricsFile(self.run_dir / "metrics.jsonl", self.start_step) if self.dist.is_main else None
        self.visualizer = _make_visualizer(cfg, self.data, self.logger, self.console) if self.dist.is_main else None
        use_scaler = self.device.type == "cuda" and self.tcfg.mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.invocation_start = time.perf_counter()

    def elapsed(self) -> float:
        """Training seconds so far, across resumes (what the time limit and the schedule count)."""
        return self.elapsed_before + time.perf_counter() - self.invocation_start

    def scheduler_state(self) -> dict[str, float]:
        state = {"elapsed_seconds": self.elapsed()}
        if self.warmup_seconds is not None:
            state["warmup_seconds"] = self.warmup_seconds
        return state

    def _prepare_attention_kernel(self) -> None:
        """Build (first run) or load the native CPU attention kernel now, before the clock starts,
        when the longest batches will run the compact backend."""
        mcfg, supported = self.cfg.model, native.supported()
        backend = choose_backend(mcfg.max_seq_len, self.device, mcfg.mlswa.backend,
                                 token_window=mcfg.mlswa.window_size_per_level[0], native_kernel=supported,
                                 batch_size=self.tcfg.batch_size)
        if self.device.type != "cpu" or backend != "compact":
            return
        building, started = supported and not native.is_built(), time.perf_counter()
        reason = native.warm_up(self.console.status)
        if reason is not None:
            self.warn(f"the native ML-SWA CPU kernel is unavailable ({reason}); attention uses the slower flash path")
        elif building and native.ready():
            self.console.print(f"[green]✓[/green] built the ML-SWA CPU kernel in {time.perf_counter() - started:.0f} s "
                               f"(cached in {native.cache_dir()})")

    def warn(self, message: str) -> None:
        if self.console.quiet and self.dist.is_main:  # --quiet hides progress, never warnings
            Console(stderr=True, highlight=False).print(f"[yellow]⚠ {message}[/yellow]", soft_wrap=True)
            return
        self.console.print(f"[yellow]⚠ {message}[/yellow]")

    def _restore(self, ckpt: Checkpoint) -> None:
        check_model_compatible(ckpt, self.model)
        self.model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
            keep_fused(self.optimizer)
        if ckpt.scheduler_state:
            self.elapsed_before = float(ckpt.scheduler_state.get("elapsed_seconds", 0.0))
            warmup_seconds = ckpt.scheduler_state.get("warmup_seconds")
            self.warmup_seconds = None if warmup_seconds is None else float(warmup_seconds)
        if ckpt.data_state:
            self.stream.load_state_dict(ckpt.data_state)
        restore_rng(ckpt.rng_state)
        self.start_step = ckpt.step

    def autocast(self):
        return autocast_for(self.device, self.tcfg.mixed_precision)

    def snapshot(self, step: int, metrics: dict[str, Any]) -> Path | None:
        if not self.dist.is_main:
            return None
        state = Checkpoint(
            step=step, config=self.cfg.model_copy(update={"model": self.model.cfg}),
            model_state=self.model.state_dict(), tokenizer_json=self.data.tokenizer.to_json_str(),
            optimizer_state=self.optimizer.state_dict(), scheduler_state=self.scheduler_state(),
            rng_state=rng_state(), data_state=self.stream.state_dict(), metrics=metrics,
        )
        return save_checkpoint(state, self.ckpt_dir, keep=self.tcfg.keep_checkpoints)

    def accumulate(self) -> tuple[float, int, Any]:
        """Forward/backward over the accumulation micro-batches; gradients sync only on the last one."""
        loss_sum, tokens, batch = 0.0, 0, None
        accum = self.tcfg.grad_accum_steps
        for micro in range(accum):
            batch = next(self.stream).to(self.device)
            sync = micro == accum - 1 or not self.dist.enabled
            with nullcontext() if sync else self.forward_model.no_sync():
                with self.autocast():
                    out = self.forward_model(batch.input_ids, batch.positions, labels=batch.labels,
                                             return_logits=False)
                    loss = out.loss / accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += float(loss.detach())
            tokens += batch.num_tokens
        return loss_sum, tokens, batch

    def validate(self) -> dict[str, float]:
        sums = evaluate_sums(self.model, self.val_batches, self.device, self.autocast)
        return metrics_from_sums(*self.dist.sum(sums, self.device))

    def _skip(self, step: int, what: str, value: float, bad_steps: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()
        self.warn(f"step {step}: {what} is {value}; skipping this update ({bad_steps} in a row)")
        if bad_steps >= self.tcfg.max_bad_steps:
            raise TrainingStopped(
                f"{bad_steps} consecutive steps had a NaN/Inf {what} (last at step {step}); stopping. "
                f"The last good checkpoint is in {self.ckpt_dir}. Lower training.learning_rate or check the data."
            )

    def _log_visuals(self, step: int, batch: Any, grad_norms: Any) -> None:
        try:
            self.visualizer.log(step, self.model, batch, grad_norms)
        except Exception as exc:  # noqa: BLE001 - a diagnostic must never end a long run
            self.warn(f"visualisation at step {step} failed ({type(exc).__name__}: {exc}); training continues")

    def run(self) -> TrainingSummary:
        tcfg, display = self.tcfg, TrainingDisplay(self.console, self.quiet)
        display.startup(self.cfg, self.model, self.data, self.device, self.logger.names, self.start_step,
                        world_size=self.dist.world_size)
        if self.visualizer is not None:
            self.console.print(self.visualizer.start_message())
        self.logger.log_config(self.cfg.to_dict())
        summary = TrainingSummary(steps=self.start_step, train_loss=None)
        best_val, bad_steps = math.inf, 0
        started = window_start = self.invocation_start = time.perf_counter()
        window_tokens = tokens_total = 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        step = self.start_step
        try:
            with _StopRequest() as stop, display.progress(self.start_step, tcfg.num_steps) as progress:
                while step < tcfg.num_steps:
                    self.model.train()
                    step_start = time.perf_counter()
                    loss_sum, step_tokens, batch = self.accumulate()
                    step += 1
                    elapsed = self.elapsed()
                    out_of_time = tcfg.time_limit_minutes is not None and elapsed > 60 * tcfg.time_limit_minutes
                    # One collective per step keeps every rank's decisions (skip, stop) and, through the
                    # mean elapsed time, its learning rate identical.
                    loss_sum, step_tokens, out_of_time, stopping, elapsed = self.dist.sum(
                        [loss_sum, step_tokens, float(out_of_time), float(stop.signum is not None), elapsed],
                        self.device)
                    loss_sum /= self.dist.world_size
                    elapsed /= self.dist.world_size
                    if self.warmup_seconds is None and step >= tcfg.warmup_steps:
                        self.warmup_seconds = elapsed if tcfg.warmup_steps else 0.0
                    if not math.isfinite(loss_sum):
                        bad_steps += 1
                        self._skip(step, "loss", loss_sum, bad_steps)
                        if stopping or out_of_time:  # a skipped step must not swallow a stop request
                            summary.last_checkpoint = self.snapshot(step, {"train_loss": summary.train_loss})
                            if stopping:
                                raise Interrupted(stop.signum or signal.SIGTERM, summary.last_checkpoint)
                            summary.stopped = f"time limit reached at step {step}"
                            break
                        continue
                    if self.scaler:
                        self.scaler.unscale_(self.optimizer)
                    viz_due = self.visualizer is not None and self.visualizer.due(step)
                    grad_norms = self.visualizer.gradient_norms(self.model) if viz_due else None
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm))
                    if not math.isfinite(grad_norm):
                        bad_steps += 1
                        self._skip(step, "gradient norm", grad_norm, bad_steps)
                        if stopping or out_of_time:  # a skipped step must not swallow a stop request
                            summary.last_checkpoint = self.snapshot(step, {"train_loss": summary.train_loss})
                            if stopping:
                                raise Interrupted(stop.signum or signal.SIGTERM, summary.last_checkpoint)
                            summary.stopped = f"time limit reached at step {step}"
                            break
                        continue
                    bad_steps = 0
                    lr = apply_lr(self.optimizer, tcfg, step - 1, elapsed, self.warmup_seconds or 0.0)
                    if self.scaler:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    window_tokens += int(step_tokens)
                    tokens_total += int(step_tokens)
                    summary.train_loss, summary.steps = loss_sum, step

                    if step % tcfg.log_every == 0 or step == tcfg.num_steps:
                        window_seconds = max(time.perf_counter() - window_start, 1e-9)
                        scalars = {
                            "train/loss": loss_sum, "train/lr": lr, "train/grad_norm": grad_norm,
                            "train/tokens_per_second": window_tokens / window_seconds,
                            "train/seconds_per_step": time.perf_counter() - step_start,
                            "train/peak_memory_mb": peak_memory_mb(self.device),
                        }
                        self._record(scalars, step)
                        window_tokens, window_start = 0, time.perf_counter()
                    progress.update(step, loss_sum, lr, tokens_total / max(time.perf_counter() - started, 1e-9))
                    if viz_due:
                        self._log_visuals(step, batch, grad_norms)

                    final = step == tcfg.num_steps
                    if step % tcfg.eval_every == 0 or final or out_of_time:
                        val = self.validate()
                        if val:
                            self._record({f"val/{k}": v for k, v in val.items()}, step)
                            summary.val = val
                            progress.note(f"step {step}: val loss {val['loss']:.3f}, "
                                          f"accuracy {val['accuracy']:.1%}")
                            if val["loss"] < best_val:
                                best_val = val["loss"]
                                summary.best_checkpoint = self.ckpt_dir / f"checkpoint-{step}.ckpt"
                    if step % tcfg.save_every == 0 or final or out_of_time or stopping:
                        summary.last_checkpoint = self.snapshot(step, {"train_loss": loss_sum, **summary.val})
                    if stopping:
                        raise Interrupted(stop.signum or signal.SIGTERM, summary.last_checkpoint)
                    if out_of_time:
                        summary.stopped = f"time limit ({tcfg.time_limit_minutes:g} min) reached at step {step}"
                        break
        except KeyboardInterrupt:
            # A second Ctrl-C lands anywhere, even inside optimizer.step(): the weights in memory may be
            # half updated, so nothing is saved from them; the last complete checkpoint stands.
            self.close()
            raise Interrupted(signal.SIGINT, summary.last_checkpoint) from None
        except BaseException:
            self.close()
            raise
        if summary.best_checkpoint is not None and not summary.best_checkpoint.exists():
            summary.best_checkpoint = summary.last_checkpoint
        summary.tokens_per_second = tokens_total / max(time.perf_counter() - started, 1e-9)
        if self.dist.is_main and summary.val:
            summary.baselines = self.data.baselines()
            self.logger.log_scalars({f"val/baseline_{k}_accuracy": v for k, v in summary.baselines.items()},
                                    summary.steps)
        self.dist.barrier()
        self.close()
        display.summary(summary, self.run_dir, self.ckpt_dir)
        return summary

    def _record(self, values: dict[str, float], step: int) -> None:
        self.logger.log_scalars(values, step)
        if self.metrics_file is not None:
            try:
                self.metrics_file.write(step, values)
            except OSError:  # the run directory vanished? recreate it once, else go on without the file
                try:
                    self.metrics_file.path.parent.mkdir(parents=True, exist_ok=True)
                    self.metrics_file.write(step, values)
                    self.warn(f"{self.metrics_file.path.parent} vanished at step {step}; recreated it")
                except OSError as exc:
                    self.warn(f"cannot write {self.metrics_file.path} ({exc.strerror or exc}); "
                              "training continues without it")
                    self.metrics_file = None

    def close(self) -> None:
        self.logger.close()
        self.dist.close()


def run_training(cfg: LHTConfig, resume: str | None = None, quiet: bool = False,
                 console: Console | None = None) -> TrainingSummary:
    """Train ``cfg`` from scratch or from a checkpoint (``resume``: a path or ``auto``); returns the summary."""
    from lhtcli.training.run_lock import experiment_lock

    with experiment_lock(cfg.checkpoint_dir(), cfg.experiment_name):  # one run per experiment directory
        return Trainer(cfg, resume, quiet, console).run()
