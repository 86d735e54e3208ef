"""Learning-rate schedule: linear warmup, then linear or cosine decay to ``min_lr_ratio`` of the peak.

With ``training.time_limit_minutes`` set, the decay follows whichever budget runs out first, steps
or time, so a run cut short by its time limit still ends at a low learning rate instead of
stopping at the peak. (Such a run depends on the machine's speed; without a time limit the
schedule is a pure function of the step and runs are exactly reproducible.)
"""

from __future__ import annotations

import math

import torch

from lhtcli.config import TrainingConfig


def lr_factor(step: int, cfg: TrainingConfig, elapsed_seconds: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.num_steps - cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / span
    if cfg.time_limit_minutes:
        progress = max(progress, elapsed_seconds / (60.0 * cfg.time_limit_minutes))
    progress = min(1.0, progress)
    if cfg.lr_schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def apply_lr(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, step: int, elapsed_seconds: float) -> float:
    """Set every parameter group's learning rate for ``step``; returns it."""
    lr = cfg.learning_rate * lr_factor(step, cfg, elapsed_seconds)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
