"""Validation metrics, peak memory and the run's machine-readable metrics log."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


@torch.no_grad()
def evaluate_sums(model, batches: Sequence[Any], device: torch.device, autocast: Callable[[], Any]) -> list[float]:
    """[loss sum, correct, masked count] over validation batches (eval mode, restored after).

    Sums rather than means so that ranks of a distributed run can add theirs up exactly.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for batch in batches:
            batch = batch.to(device)
            with autocast():
                out = model(batch.input_ids, batch.positions)
            selected = batch.labels != -100
            if not bool(selected.any()):
                continue
            logits = out.mlm_logits[selected].float()
            targets = batch.labels[selected]
            loss_sum += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += int(targets.numel())
    finally:
        model.train(was_training)
    return [loss_sum, float(correct), float(count)]


def metrics_from_sums(loss_sum: float, correct: float, count: float) -> dict[str, float]:
    """Masked-token loss, accuracy and perplexity; empty when nothing was masked."""
    if count == 0:
        return {}
    loss = loss_sum / count
    return {"loss": loss, "accuracy": correct / count, "perplexity": math.exp(min(loss, 50.0)),
            "masked_tokens": count}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class MetricsFile:
    """``metrics.jsonl`` beside the TensorBoard events: one JSON object per logged step, for scripts.

    On resume, records after the checkpoint's step are dropped so the file reads as one clean run.
    """

    def __init__(self, path: Path, truncate_after: int = 0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if truncate_after and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= truncate_after:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        # Rewritten through a temporary file so a crash here cannot lose the lines being kept.
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)

    def write(self, step: int, values: dict[str, float]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
