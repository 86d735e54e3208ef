"""The MLM pretraining loop: accumulation, clipping, evaluation, checkpoints, resume, logging."""

from __future__ import annotations

import math
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
from lhtcli.training.rng import restore_rng, rng_state, seed_everything
from lhtcli.training.schedule import apply_lr, mlm_probability_at
from lhtcli.training.stopping import Interrupted, StopRequest


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


@dataclass
class _LoopState:
    """What the loop carries from step to step."""

    summary: TrainingSummary
    best_val: float = math.inf
    bad_steps: int = 0  # NaN/Inf steps in a row
    tokens_total: int = 0
    window_tokens: int = 0  # since the last logged step
    started: float = field(default_factory=time.perf_counter)
    window_start: float = field(default_factory=time.perf_counter)


@dataclass
class _StepOutcome:
    """One step as every rank agrees on it (the loss averaged over ranks, tokens summed, flags OR-ed)."""

    step: int
    loss: float
    tokens: int
    elapsed: float  # training seconds across resumes, mean over ranks
    out_of_time: bool
    stopping: bool  # a signal asked the run to stop
    started: float  # perf_counter at the step's start
    batch: Any  # the last micro-batch (the visuals look at it)
    updated: bool = False  # False: skipped (NaN/Inf loss or gradient norm)
    lr: float = 0.0
    grad_norm: float = 0.0
    grad_norms: Any = None  # per-parameter norms for the visuals, on steps they are due


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available (use --device cpu or auto)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast_for(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; CPU trains in fp32 whatever the config says (DESIGN.md)."""
    if device.type != "cuda" or precision == "none":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


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
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.dist.is_main:
            check_disk_space(cfg.checkpoint_dir(), self.model, self.tcfg.keep_checkpoints, self.warn)
        self._prepare_attention_kernel()
        self.start_step = 0
        self.elapsed_before = 0.0  # training seconds of earlier invocations (resume)
        self.warmup_seconds: float | None = None  # training seconds when the warmup ended (LR decay by time)
        if ckpt is not None:
            self._restore(ckpt)
        self.agreed_elapsed = self.elapsed_before  # training seconds after the last step, agreed by all ranks
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

    def _log_visuals(self, step: int, batch: Any, grad_norms: Any) -> None:
        try:
            self.visualizer.log(step, self.model, batch, grad_norms)
        except Exception as exc:  # noqa: BLE001 - a diagnostic must never end a long run
            self.warn(f"visualisation at step {step} failed ({type(exc).__name__}: {exc}); training continues")

    def run(self) -> TrainingSummary:
        """Train from ``start_step`` to ``num_steps``: each step trains, reports, evaluates when due, then
        checkpoints when due and stops on a signal or at the time limit."""
        display = TrainingDisplay(self.console, self.quiet)
        self._announce(display)
        loop = _LoopState(TrainingSummary(steps=self.start_step, train_loss=None))
        self.invocation_start = loop.started
        try:
            with StopRequest() as stop, display.progress(self.start_step, self.tcfg.num_steps) as progress:
                for step in range(self.start_step + 1, self.tcfg.num_steps + 1):
                    outcome = self.train_step(step, stop, loop)
                    if outcome.updated:
                        self._report(outcome, loop, progress)
                        self._evaluate_if_due(outcome, loop, progress)
                    if self._checkpoint_or_stop(outcome, loop, stop):
                        break
        except KeyboardInterrupt:
            # A second Ctrl-C lands anywhere, even inside optimizer.step(): the weights in memory may be
            # half updated, so nothing is saved from them; the last complete checkpoint stands.
            self.close()
            raise Interrupted(signal.SIGINT, loop.summary.last_checkpoint) from None
        except BaseException:
            self.close()
            raise
        return self._finish(loop, display)

    def _announce(self, display: TrainingDisplay) -> None:
        display.startup(self.cfg, self.model, self.data, self.device, self.logger.names, self.start_step,
                        world_size=self.dist.world_size)
        if self.visualizer is not None:
            self.console.print(self.visualizer.start_message())
        self.logger.log_config(self.cfg.to_dict())

    def train_step(self, step: int, stop: StopRequest, loop: _LoopState) -> _StepOutcome:
        """Forward/backward over the micro-batches, then clip and update, unless the loss or the gradient
        norm is NaN/Inf: then the update is skipped (and too many such steps in a row end the run)."""
        self.model.train()
        started = time.perf_counter()
        # The previous step's agreed time keeps every rank's masking rate identical.
        self.data.train_stream.mlm_probability = mlm_probability_at(
            step - 1, self.tcfg, self.agreed_elapsed, self.warmup_seconds or 0.0)
        loss_sum, tokens, batch = self.accumulate()
        outcome = self._agree(step, loss_sum, tokens, stop, started, batch)
        self.agreed_elapsed = outcome.elapsed
        if self.warmup_seconds is None and step >= self.tcfg.warmup_steps:
            self.warmup_seconds = outcome.elapsed if self.tcfg.warmup_steps else 0.0
        if not math.isfinite(outcome.loss):
            self._skip(step, "loss", outcome.loss, loop)
            return outcome
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.visualizer is not None and self.visualizer.due(step):
            outcome.grad_norms = self.visualizer.gradient_norms(self.model)  # before clipping
        outcome.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.tcfg.max_grad_norm))
        if not math.isfinite(outcome.grad_norm):
            self._skip(step, "gradient norm", outcome.grad_norm, loop)
            return outcome
        loop.bad_steps = 0
        outcome.lr = apply_lr(self.optimizer, self.tcfg, step - 1, outcome.elapsed, self.warmup_seconds or 0.0)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        outcome.updated = True
        return outcome

    def _agree(self, step: int, loss_sum: float, tokens: int, stop: StopRequest, started: float,
               batch: Any) -> _StepOutcome:
        """One collective per step keeps every rank's decisions (skip, stop) and, through the mean elapsed
        time, its learning rate identical."""
        elapsed = self.elapsed()
        limit = self.tcfg.time_limit_minutes
        out_of_time = limit is not None and elapsed > 60 * limit
        loss_sum, tokens, out_of_time, stopping, elapsed = self.dist.sum(
            [loss_sum, tokens, float(out_of_time), float(stop.signum is not None), elapsed], self.device)
        world = self.dist.world_size
        return _StepOutcome(step, loss_sum / world, int(tokens), elapsed / world, bool(out_of_time), bool(stopping),
                            started, batch)

    def _skip(self, step: int, what: str, value: float, loop: _LoopState) -> None:
        loop.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()
        self.warn(f"step {step}: {what} is {value}; skipping this update ({loop.bad_steps} in a row)")
        if loop.bad_steps >= self.tcfg.max_bad_steps:
            raise TrainingStopped(
                f"{loop.bad_steps} consecutive steps had a NaN/Inf {what} (last at step {step}); stopping. "
                f"The last good checkpoint is in {self.ckpt_dir}. Lower training.learning_rate or check the data."
            )

    def _report(self, outcome: _StepOutcome, loop: _LoopState, progress: Any) -> None:
        """Scalars every ``log_every`` steps (and the last), the progress line, visuals when due."""
        step, now = outcome.step, time.perf_counter()
        loop.window_tokens += outcome.tokens
        loop.tokens_total += outcome.tokens
        loop.summary.train_loss, loop.summary.steps = outcome.loss, step
        if step % self.tcfg.log_every == 0 or step == self.tcfg.num_steps:
            self._record({
                "train/loss": outcome.loss, "train/lr": outcome.lr, "train/grad_norm": outcome.grad_norm,
                "train/tokens_per_second": loop.window_tokens / max(now - loop.window_start, 1e-9),
                "train/seconds_per_step": now - outcome.started,
                "train/peak_memory_mb": peak_memory_mb(self.device),
                **({"train/mlm_probability": self.data.train_stream.mlm_probability}
                   if self.tcfg.mlm_probability_end is not None else {}),
            }, step)
            loop.window_tokens, loop.window_start = 0, time.perf_counter()
        throughput = loop.tokens_total / max(time.perf_counter() - loop.started, 1e-9)
        progress.update(step, outcome.loss, outcome.lr, throughput)
        if outcome.grad_norms is not None:
            self._log_visuals(step, outcome.batch, outcome.grad_norms)

    def _evaluate_if_due(self, outcome: _StepOutcome, loop: _LoopState, progress: Any) -> None:
        """Validation every ``eval_every`` steps, at the last step and at the time limit; tracks the best."""
        step = outcome.step
        if not (step % self.tcfg.eval_every == 0 or step == self.tcfg.num_steps or outcome.out_of_time):
            return
        val = self.validate()
        if not val:
            return
        self._record({f"val/{k}": v for k, v in val.items()}, step)
        loop.summary.val = val
        progress.note(f"step {step}: val loss {val['loss']:.3f}, accuracy {val['accuracy']:.1%}")
        if val["loss"] < loop.best_val:
            loop.best_val = val["loss"]
            loop.summary.best_checkpoint = self.ckpt_dir / f"checkpoint-{step}.ckpt"

    def _checkpoint_or_stop(self, outcome: _StepOutcome, loop: _LoopState, stop: StopRequest) -> bool:
        """Checkpoint when due (every ``save_every`` updates and the last) and always before stopping; a
        signal ends the run with :class:`Interrupted`, the time limit by returning True. A skipped update
        is no checkpoint of its own, but never swallows a stop."""
        step, summary, tcfg = outcome.step, loop.summary, self.tcfg
        due = outcome.updated and (step % tcfg.save_every == 0 or step == tcfg.num_steps)
        if due or outcome.out_of_time or outcome.stopping:
            summary.last_checkpoint = self.snapshot(step, {"train_loss": summary.train_loss, **summary.val})
        if outcome.stopping:
            raise Interrupted(stop.signum or signal.SIGTERM, summary.last_checkpoint)
        if outcome.out_of_time:
            summary.stopped = f"time limit ({tcfg.time_limit_minutes:g} min) reached at step {step}"
        return outcome.out_of_time

    def _finish(self, loop: _LoopState, display: TrainingDisplay) -> TrainingSummary:
        summary = loop.summary
        if summary.best_checkpoint is not None and not summary.best_checkpoint.exists():
            summary.best_checkpoint = summary.last_checkpoint
        summary.tokens_per_second = loop.tokens_total / max(time.perf_counter() - loop.started, 1e-9)
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
