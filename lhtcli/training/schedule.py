"""Schedules over training progress: the learning rate (linear warmup, then linear or cosine decay to
``min_lr_ratio`` of the peak) and the masking rate (``mlm_probability`` to ``mlm_probability_end``).

With ``training.time_limit_minutes`` set, the decay follows whichever budget runs out first, steps
or time, so a run cut short by its time limit still ends at a low learning rate instead of
stopping at the peak. Time progress counts from the end of the warmup, so the decay starts at the
peak rather than jumping down by the share of the budget the warmup used. (Such a run depends on
the machine's speed; without a time limit the schedule is a pure function of the step and runs are
exactly reproducible.)
"""

from __future__ import annotations

import math

import torch

from lhtcli.config import TrainingConfig


def training_progress(step: int, cfg: TrainingConfig, elapsed_seconds: float = 0.0,
                      warmup_seconds: float = 0.0) -> float:
    """Share of the post-warmup budget used before optimizer step ``step`` (0-based): 0 during the warmup,
    1 at the end; with a time limit, whichever of steps or time is further along."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return 0.0
    span = max(1, cfg.num_steps - cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / span
    if cfg.time_limit_minutes:
        budget = max(60.0 * cfg.time_limit_minutes - warmup_seconds, 1e-9)
        progress = max(progress, (elapsed_seconds - warmup_seconds) / budget)
    return min(1.0, max(0.0, progress))


def lr_factor(step: int, cfg: TrainingConfig, elapsed_seconds: float = 0.0, warmup_seconds: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    ``warmup_seconds`` is the training time at which the warmup ended (time-limited runs).
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = training_progress(step, cfg, elapsed_seconds, warmup_seconds)
    if cfg.lr_schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def mlm_probability_at(step: int, cfg: TrainingConfig, elapsed_seconds: float = 0.0,
                       warmup_seconds: float = 0.0) -> float:
    """Masking rate of the batches of optimizer step ``step`` (0-based): ``mlm_probability`` through the
    warmup, then linear in training progress to ``mlm_probability_end`` (constant when that is null)."""
    start, end = cfg.mlm_probability, cfg.mlm_probability_end
    if end is None:
        return start
    return start + (end - start) * training_progress(step, cfg, elapsed_seconds, warmup_seconds)


def apply_lr(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, step: int, elapsed_seconds: float,
             warmup_seconds: float = 0.0) -> float:
    """Set every parameter group's learning rate for ``step``; returns it."""
    lr = cfg.learning_rate * lr_factor(step, cfg, elapsed_seconds, warmup_seconds)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
