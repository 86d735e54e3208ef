"""Run real ``lht train`` jobs in scratch directories and read their throughput back.

Shared by the run-level benchmarks (``distributed.py``, ``viz_overhead.py``): they time whole
training runs, with logging, checkpoints and everything else a user's run does, rather than a
single step in isolation.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lhtcli.training.distributed import torchrun_command


@dataclass
class RunResult:
    label: str
    steps: int
    tokens_per_second: float  # global (all ranks), over the timed windows
    seconds_per_step: float
    wall_seconds: float       # the whole command: start-up, data, training, final checkpoint
    final_loss: float


def run_train(label: str, overrides: list[str], nproc: int = 0, skip_windows: int = 1,
              env: dict[str, str] | None = None) -> RunResult:
    """``lht train --quiet --set ...`` in a fresh directory; throughput from its metrics.jsonl.

    ``nproc`` > 0 runs it under torchrun with that many processes (DDP on even for 1).

    Each log window's tokens/s covers everything between two log lines (validation, figures, a
    checkpoint): the harmonic mean over the windows after the first ``skip_windows`` (warm-up) is
    total tokens over total time.
    """
    with tempfile.TemporaryDirectory(prefix="lht-bench-") as workdir:
        argv = ["train", "--quiet"]
        for override in overrides:
            argv += ["--set", override]
        cmd = torchrun_command(nproc, argv) if nproc else [sys.executable, "-m", "lhtcli", *argv]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{label}: lht train exited {done.returncode}\n{done.stdout}\n{done.stderr}")
        metrics_files = list(Path(workdir).glob("runs/*/metrics.jsonl"))
        if not metrics_files:
            raise SystemExit(f"{label}: no metrics.jsonl written (is logging.backend 'none'?)")
        records = [json.loads(line) for line in metrics_files[0].read_text().splitlines() if line.strip()]
    train = [r for r in records if "train/tokens_per_second" in r]
    timed = train[skip_windows:] or train
    tps = statistics.harmonic_mean([r["train/tokens_per_second"] for r in timed])
    sps = statistics.median(r["train/seconds_per_step"] for r in timed)
    return RunResult(label, train[-1]["step"], tps, sps, wall, train[-1]["train/loss"])


def markdown_table(results: list[RunResult], baseline: RunResult) -> str:
    rows = ["| run | steps | tokens/s | s/step (median) | ratio to first | wall s | final loss |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.label} | {r.steps} | {r.tokens_per_second:,.0f} | {r.seconds_per_step:.3f} | "
                    f"{r.tokens_per_second / baseline.tokens_per_second:.2f}x | {r.wall_seconds:.0f} | "
                    f"{r.final_loss:.4f} |")
    return "\n".join(rows)
