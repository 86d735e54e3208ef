"""Multi-process training with torchrun on CPU (gloo): equality with one process, resume, failures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from training_helpers import tiny_overrides, write_corpus

from lhtcli.config import default_config_path, load_config
from lhtcli.training.metrics import read_metrics
from lhtcli.training.trainer import run_training

pytestmark = pytest.mark.slow


def torchrun(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**env, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}


def set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture
def corpus(in_tmp: Path) -> Path:
    return write_corpus(in_tmp / "corpus.jsonl", documents=30)


def common(corpus: Path, name: str, **extra: object) -> list[str]:
    values = {"model.dropout": 0.0, "training.num_steps": 6, "training.save_every": 3, "training.eval_every": 3,
              "training.batch_size": 2}
    values.update(extra)
    return tiny_overrides(corpus, name=name, **values)


def test_two_ranks_match_one_rank_with_the_same_global_batch(corpus: Path, in_tmp: Path, subprocess_env):
    single = load_config(default_config_path(), common(corpus, "single", **{"training.grad_accum_steps": 2}))
    run_training(single, quiet=True)
    result = torchrun(["-m", "lhtcli", "train", "--quiet",
                       *set_args(common(corpus, "ddp", **{"training.grad_accum_steps": 1}))], in_tmp, subprocess_env)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = train_losses(single.run_dir()), train_losses(in_tmp / "runs" / "ddp")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5, 6]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    # rank 0 alone wrote checkpoints; every rank can resume from them
    assert (in_tmp / "checkpoints" / "ddp" / "checkpoint-3.ckpt").exists()
    resumed = torchrun(["-m", "lhtcli", "train", "--quiet", "--resume",
                        str(in_tmp / "checkpoints" / "ddp" / "checkpoint-3.ckpt"),
                        *set_args(common(corpus, "ddp-resumed", **{"training.grad_accum_steps": 1}))],
                       in_tmp, subprocess_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = train_losses(in_tmp / "runs" / "ddp-resumed")
    assert sorted(again) == [4, 5, 6]
    for step in again:
        assert again[step] == pytest.approx(one[step], rel=1e-5)


def test_a_failing_rank_ends_the_job_quickly(corpus: Path, in_tmp: Path, subprocess_env):
    script = in_tmp / "failing_rank.py"
    script.write_text(textwrap.dedent("""
        import os
        import sys

        from lhtcli.cli import main
        from lhtcli.model import LHTEncoder

        original = LHTEncoder.forward
        calls = {"n": 0}

        def forward(self, *args, **kwargs):
            calls["n"] += 1
            if os.environ["RANK"] == "1" and calls["n"] == 3:
                raise RuntimeError("boom on rank 1")
            return original(self, *args, **kwargs)

        LHTEncoder.forward = forward
        main(sys.argv[1:])
    """))
    started = time.perf_counter()
    result = torchrun([str(script), "train", "--quiet", *set_args(common(corpus, "failing"))], in_tmp,
                      subprocess_env, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    assert "boom on rank 1" in result.stderr + result.stdout
    assert elapsed < 90


def test_rank_zero_visualises_while_the_other_rank_waits(corpus: Path, in_tmp: Path, subprocess_env):
    """Figures and entropy statistics on rank 0 alone must not deadlock the DDP job."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = torchrun(["-m", "lhtcli", "train", "--quiet",
                       *set_args(common(corpus, "viz", **{"training.num_steps": 4, "training.log_viz_every": 2,
                                                          "logging.backend": "tensorboard"}))],
                      in_tmp, subprocess_env, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(in_tmp / "runs" / "viz"))
    events.Reload()
    assert {"attention/entropy_mean", "train/loss"} <= set(events.Tags()["scalars"])
    assert "gradients/flow" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("attention/entropy_mean")] == [2, 4]
