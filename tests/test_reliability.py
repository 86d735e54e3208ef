"""Crashes, signals, full disks, untrusted checkpoints, NaNs and failing loggers lose nothing.

- SIGKILL at random moments and at chosen points of a checkpoint write: ``--resume auto`` always
  continues from the newest complete checkpoint, and the redone steps reproduce the lost ones.
- SIGINT/SIGTERM: a checkpoint, flushed loggers, exit 130/143.
- Unwritable directories and missing disk space are found at start-up; a failing write keeps the
  previous checkpoint intact.
- Damaged, foreign, newer or code-carrying checkpoint files are refused with a message naming them.
- NaN/Inf steps are skipped and reported; repeated ones stop the run with the last good checkpoint.
- W&B or TensorBoard failing mid-run never stops training.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kernel_helpers import buildable, kernel_env, leftovers, wait_for_compiler, write_stand_in
from training_helpers import tiny_overrides, write_corpus

import lhtcli.training.checkpoint as ckpt_module
from lhtcli.cli import main
from lhtcli.config import load_config
from lhtcli.errors import CheckpointError
from lhtcli.training.checkpoint import (
    FORMAT_VERSION,
    TEMP_FILE,
    TRAILER,
    atomic_torch_save,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lhtcli.training.trainer import run_training

# ----------------------------------------------------------------------------- helpers


def set_args(corpus: Path, name: str = "tiny", **extra: object) -> list[str]:
    return [a for o in tiny_overrides(corpus, name=name, **extra) for a in ("--set", o)]


def logged_losses(metrics: Path) -> list[tuple[int, float]]:
    """(step, train/loss) of every complete record, in file order (a half-written last line is skipped)."""
    rows = []
    if not metrics.exists():
        return rows
    for text in metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if "train/loss" in record:
            rows.append((record["step"], record["train/loss"]))
    return rows


def newest_loadable_step(ckpt_dir: Path) -> int | None:
    """Load every checkpoint file on disk (each must verify) and return the highest step."""
    steps = [load_checkpoint(p).step for p in ckpt_dir.glob("*.ckpt")] if ckpt_dir.is_dir() else []
    return max(steps, default=None)


def newest_step_name(ckpt_dir: Path) -> int:
    names = [re.fullmatch(r"checkpoint-(\d+)\.ckpt", p.name) for p in ckpt_dir.glob("checkpoint-*.ckpt")]
    return max((int(m.group(1)) for m in names if m), default=0)


def temp_files(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if TEMP_FILE.match(p.name))


def wait_for(predicate: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.01)
    return False


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def env(subprocess_env: dict[str, str]) -> dict[str, str]:
    return {**subprocess_env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def corpus(in_tmp: Path) -> Path:
    return write_corpus(in_tmp / "corpus.jsonl")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with checkpoint-2, checkpoint-4 and last.ckpt (read-only for the tests)."""
    base = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(base / "corpus.jsonl")
    cfg = load_config(None, tiny_overrides(corpus, **{
        "training.num_steps": 4, "training.save_every": 2, "logging.dir": str(base / "runs"),
        "logging.checkpoint_dir": str(base / "checkpoints")}))
    run_training(cfg, quiet=True)
    return cfg.checkpoint_dir()


@pytest.fixture
def ckpt_copy(trained: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpts"
    shutil.copytree(trained, target)  # last.ckpt becomes its own file here
    return target


# ----------------------------------------------------------------------------- 1. crash safety: SIGKILL


KILL_DRIVER = r"""
import os, signal, sys
from pathlib import Path
import lhtcli.training.checkpoint as ckpt
from lhtcli.training import metrics
from lhtcli.cli import main

point, argv = sys.argv[1], sys.argv[2:]
calls = {"n": 0}

def third_call():
    calls["n"] += 1
    return calls["n"] == 3

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "mid-write":  # the 3rd checkpoint of this process has 50 kB of its bytes written
    init, write = ckpt._HashingWriter.__init__, ckpt._HashingWriter.write
    def counting_init(self, handle):
        init(self, handle)
        self.doomed = third_call()
    def dying_write(self, data):
        if self.doomed and self.size > 50_000:
            die()
        return write(self, data)
    ckpt._HashingWriter.__init__, ckpt._HashingWriter.write = counting_init, dying_write
elif point in ("before-rename", "mid-link"):  # fsynced temporary not renamed yet / last.ckpt link not replaced
    replace = os.replace
    def dying_replace(src, dst, *a, **k):
        name = Path(dst).name
        if (name == "last.ckpt") == (point == "mid-link") and name.endswith(".ckpt") and third_call():
            die()
        return replace(src, dst, *a, **k)
    os.replace = dying_replace
elif point == "after-rename":  # checkpoint-N.ckpt complete, last.ckpt still the previous one
    link = ckpt._link_or_copy_atomic
    def dying_link(source, target):
        if third_call():
            die()
        return link(source, target)
    ckpt._link_or_copy_atomic = dying_link
elif point == "mid-metrics-line":  # half of a metrics.jsonl line is on disk
    write_metrics = metrics.MetricsFile.write
    def dying_metrics(self, step, values):
        if "train/loss" in values and third_call():
            import json
            text = json.dumps({"step": step, **values}) + "\n"
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(text[: len(text) // 2])
            die()
        return write_metrics(self, step, values)
    metrics.MetricsFile.write = dying_metrics
main(argv)
"""

# How each life of the run ends: killed at a random moment of start-up or of training, or at a fixed
# stage of a checkpoint or log write (True: that stage leaves a temporary file for the next save to remove).
KILL_POINTS = {"mid-write": True, "before-rename": True, "after-rename": False, "mid-link": True,
               "mid-metrics-line": False}
LIVES = ["startup", "startup", "random", "mid-write", "random", "before-rename", "random", "after-rename",
         "random", "mid-link", "random", "mid-metrics-line", "random"]


@pytest.mark.slow
def test_sigkill_at_random_moments_and_inside_writes_resumes_from_the_newest_complete_checkpoint(
        in_tmp: Path, corpus: Path, lht_cmd: list[str], env: dict[str, str]):
    num_steps = 100
    train = ["train", "--resume", "auto", *set_args(corpus, "killed", **{
        "training.num_steps": num_steps, "training.save_every": 1, "training.eval_every": 15,
        "training.keep_checkpoints": 3, "logging.backend": "tensorboard"})]
    (in_tmp / "driver.py").write_text(KILL_DRIVER)
    ckpt_dir, metrics = in_tmp / "checkpoints" / "killed", in_tmp / "runs" / "killed" / "metrics.jsonl"
    rng = random.Random(20240601)
    first_seen: dict[int, float] = {}  # the loss each step had the first time it was logged
    for life, how in enumerate(LIVES):
        expected = newest_loadable_step(ckpt_dir)  # every file on disk verifies; the resume must pick the newest
        out = in_tmp / f"life-{life}-{how}.log"
        command = [*lht_cmd, *train] if how in ("startup", "random") else [sys.executable, "driver.py", how, *train]
        with out.open("wb") as log:
            proc = subprocess.Popen(command, cwd=in_tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                if how == "startup":  # while importing, reading the corpus, training the tokenizer
                    time.sleep(rng.uniform(0.3, 2.5))
                elif how == "random":  # a few steps in, at a random point of a step, a save or a log write
                    target = (expected or 0) + rng.randint(1, 5)
                    assert wait_for(lambda t=target: newest_step_name(ckpt_dir) >= t, 60, proc), out.read_text()
                    time.sleep(rng.uniform(0.0, 0.06))
                if how in ("startup", "random"):
                    assert proc.poll() is None, f"life {life} finished before it was killed:\n{out.read_text()}"
                    proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=90)
            finally:
                proc.kill()
                proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, out.read_text()
        if how in KILL_POINTS:
            assert bool(temp_files(ckpt_dir)) == KILL_POINTS[how], (how, temp_files(ckpt_dir))
        resumed = re.search(r"resuming at step (\d+)", out.read_text())
        if expected is None:
            assert resumed is None
        elif resumed is not None:
            assert int(resumed.group(1)) == expected, out.read_text()
        for step, loss in logged_losses(metrics):
            first_seen.setdefault(step, loss)

    expected = newest_loadable_step(ckpt_dir)
    assert expected is not None and expected < num_steps
    final = subprocess.run([*lht_cmd, *train], cwd=in_tmp, env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"resuming at step {expected}" in final.stdout

    assert load_checkpoint(ckpt_dir / "last.ckpt").step == num_steps
    assert newest_loadable_step(ckpt_dir) == num_steps  # and every file on disk loads
    assert temp_files(ckpt_dir) == []  # writers killed mid-save left temporaries; the next save removed them
    rows = logged_losses(metrics)
    assert [step for step, _ in rows] == list(range(1, num_steps + 1))  # continuous: no gap, no duplicate
    assert len(_strict_metrics(metrics)) >= num_steps  # every line parses: the torn one was dropped on resume
    redone = {step: loss for step, loss in rows if step in first_seen}
    assert len(redone) >= 10
    for step, loss in redone.items():  # steps lost to a kill were recomputed exactly
        assert loss == pytest.approx(first_seen[step], rel=1e-6, abs=1e-7), step
    print(f"\nreliability: kills survived {len(LIVES)}/{len(LIVES)} (random moments and checkpoint/log writes)")


def _strict_metrics(metrics: Path) -> list[dict]:
    """Every line of metrics.jsonl is one complete JSON record (a resumed run rewrote any torn line)."""
    return [json.loads(text) for text in metrics.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(buildable() is not None, reason=f"cannot compile here: {buildable()}")
def test_sigkill_during_the_kernel_build_and_training_then_resume_auto_carries_on(
        in_tmp: Path, corpus: Path, lht_cmd: list[str], env: dict[str, str]):
    """The first run builds the native kernel; kill -9 lands inside that build (twice), inside training, and
    inside the rebuild a resumed run does: each next ``--resume auto`` builds again (never waiting on the
    dead build's lock) and continues from the newest complete checkpoint."""
    cache = in_tmp / "kernels"
    kenv = kernel_env(env, cache, write_stand_in(in_tmp, spin=3))
    num_steps = 12
    train = [*lht_cmd, "train", "--resume", "auto", *set_args(corpus, "kbuild", **{
        "training.num_steps": num_steps, "training.save_every": 2, "model.mlswa.backend": "compact"})]
    ckpt_dir, metrics = in_tmp / "checkpoints" / "kbuild", in_tmp / "runs" / "kbuild" / "metrics.jsonl"
    rng = random.Random(18)
    kills = []
    for life, how in enumerate(["build", "build", "training", "rebuild"]):
        if how == "rebuild":  # a new torch or lht version: the resumed run must build again
            shutil.rmtree(cache)
        expected = newest_loadable_step(ckpt_dir)
        proc = subprocess.Popen(train, cwd=in_tmp, env=kenv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            if how == "training":
                target = (expected or 0) + 4
                assert wait_for(lambda t=target: newest_step_name(ckpt_dir) >= t, 120, proc), proc.stdout.read()
            else:
                assert wait_for_compiler(cache, 120, proc) is not None, proc.stdout.read()
            time.sleep(rng.uniform(0.0, 0.3))
            assert proc.poll() is None, f"life {life} ended before the kill"
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        kills.append(how)
        if how != "training":
            assert leftovers(cache), "the killed build left its lock file and temporary directory"

    expected = newest_loadable_step(ckpt_dir)
    assert expected is not None and expected >= 4
    final = subprocess.run(train, cwd=in_tmp, env=kenv, capture_output=True, text=True, timeout=180)
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"resuming at step {expected}" in final.stdout
    assert "waiting" not in final.stdout + final.stderr  # nothing was waited for: the dead lock was taken over
    assert "was interrupted" in final.stdout  # the dead build was said, and built again
    assert leftovers(cache) == [] and len(list(cache.glob("lht_band_*/*.so"))) == 1
    assert newest_loadable_step(ckpt_dir) == num_steps  # every checkpoint on disk loads
    assert [r["step"] for r in _strict_metrics(metrics) if "train/loss" in r] == list(range(1, num_steps + 1))
    print(f"\nreliability: kills survived {len(kills)}/{len(kills)} (during the kernel build: "
          f"{sum(k != 'training' for k in kills)})")


# ----------------------------------------------------------------------------- 1c. one run per experiment


def test_a_second_run_on_the_same_experiment_is_refused_naming_the_holder(in_tmp: Path, corpus: Path,
                                                                          capsys: pytest.CaptureFixture[str]):
    from lhtcli.core.kernel_cache import OwnedLock
    from lhtcli.training.run_lock import LOCK_NAME

    ckpt_dir = in_tmp / "checkpoints" / "tiny"
    ckpt_dir.mkdir(parents=True)
    holder = OwnedLock(ckpt_dir / LOCK_NAME)  # as a running lht train holds it (flock: per open file)
    assert holder.try_acquire()
    try:
        err = _cli_error(["train", "-q", *set_args(corpus, **{"training.num_steps": 2})], capsys)
    finally:
        holder.release()
    assert f"another lht train (pid {os.getpid()}, started " in err and "already running experiment 'tiny'" in err
    assert "experiment_name" in err
    assert list(ckpt_dir.iterdir()) == [] and not (in_tmp / "runs" / "tiny" / "metrics.jsonl").exists()
    cfg = load_config(None, tiny_overrides(corpus, **{"training.num_steps": 2}))
    assert run_training(cfg, quiet=True).steps == 2  # released: the run goes ahead, and leaves no lock file
    assert not (ckpt_dir / LOCK_NAME).exists()


def test_only_rank_zero_takes_the_experiment_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from lhtcli.training.run_lock import LOCK_NAME, RunLockedError, experiment_lock

    with experiment_lock(tmp_path, "x") as held:
        assert held == tmp_path / LOCK_NAME
        with pytest.raises(RunLockedError), experiment_lock(tmp_path, "x"):
            pass
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(RunLockedError), experiment_lock(tmp_path, "x"):
            pass  # (RANK alone, without WORLD_SIZE > 1, is no DDP run)
        monkeypatch.setenv("WORLD_SIZE", "2")  # a DDP worker of the run that holds it
        with experiment_lock(tmp_path, "x") as worker:
            assert worker is None
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.slow
def test_concurrent_runs_never_interleave_and_a_killed_holder_never_blocks_resume(
        in_tmp: Path, corpus: Path, lht_cmd: list[str], env: dict[str, str]):
    train = [*lht_cmd, "train", "-q", "--resume", "auto", *set_args(corpus, "shared", **{
        "training.num_steps": 10_000, "training.save_every": 3, "training.eval_every": 10_000})]
    ckpt_dir, metrics = in_tmp / "checkpoints" / "shared", in_tmp / "runs" / "shared" / "metrics.jsonl"
    first = subprocess.Popen(train, cwd=in_tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: newest_step_name(ckpt_dir) >= 3, 120, first)
        second = subprocess.run(train, cwd=in_tmp, env=env, capture_output=True, text=True, timeout=120)
        assert first.poll() is None
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: another lht train (pid ") and f"{first.pid}" in lines[0]
    assert "Traceback" not in second.stderr
    expected = newest_loadable_step(ckpt_dir)
    resumed = subprocess.run([*train[:-2], *set_args(corpus, "shared", **{
        "training.num_steps": expected + 2, "training.save_every": 3, "training.eval_every": 10_000})],
        cwd=in_tmp, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    steps = [r["step"] for r in _strict_metrics(metrics) if "train/loss" in r]
    assert steps == list(range(1, expected + 3))  # one run's records, in order: nothing interleaved
    assert load_checkpoint(ckpt_dir / "last.ckpt").step == expected + 2


# ----------------------------------------------------------------------------- 1b. verification on load


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    size = len(data)
    kind, _, where = how.partition(":")
    at = {"start": 0, "header": 40, "middle": size // 2, "last-data": size - TRAILER.size - 1,
          "digest": size - 30, "end": size - 1, "trailer": size - TRAILER.size}.get(where)
    if kind == "truncate":
        path.write_bytes(bytes(data[: int(where) if where.isdigit() else at]))
    elif kind == "flip":
        data[at] ^= 0x01
        path.write_bytes(bytes(data))
    elif kind == "append":
        path.write_bytes(bytes(data) + b"\0" * 16)


DAMAGE = ["truncate:0", "truncate:1", "truncate:1000", "truncate:middle", "truncate:trailer", "truncate:end",
          "flip:start", "flip:header", "flip:middle", "flip:last-data", "flip:digest", "flip:end", "append:"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_is_never_taken_for_complete(how: str, ckpt_copy: Path):
    path = ckpt_copy / "checkpoint-4.ckpt"
    _damage(path, how)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_every_byte_of_the_payload_is_covered(ckpt_copy: Path):
    """Flip bytes across the whole file (also in optimizer state, which the weight digest never saw)."""
    path = ckpt_copy / "checkpoint-4.ckpt"
    original = path.read_bytes()
    for offset in range(0, len(original), max(1, len(original) // 40)):
        data = bytearray(original)
        data[offset] ^= 0x10
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
    path.write_bytes(original)
    assert load_checkpoint(path).step == 4


def test_resume_auto_falls_back_when_last_ckpt_is_damaged(ckpt_copy: Path, corpus: Path,
                                                          capsys: pytest.CaptureFixture[str]):
    _damage(ckpt_copy / "last.ckpt", "truncate:middle")
    warnings: list[str] = []
    ckpt = find_resume_checkpoint(ckpt_copy, warnings.append)
    assert ckpt is not None and ckpt.step == 4 and ckpt.path == ckpt_copy / "checkpoint-4.ckpt"
    assert len(warnings) == 1 and "last.ckpt" in warnings[0] and "checkpoint-4.ckpt" in warnings[0]

    cfg = load_config(None, tiny_overrides(corpus, **{"training.num_steps": 6, "training.save_every": 2,
                                                      "logging.checkpoint_dir": str(ckpt_copy.parent)}))
    ckpt_copy.rename(cfg.checkpoint_dir())
    assert run_training(cfg, resume="auto", quiet=True).steps == 6
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "last.ckpt" in err  # said even with --quiet
    assert load_checkpoint(cfg.checkpoint_dir() / "last.ckpt").step == 6


def test_resume_auto_prefers_a_step_file_written_after_last_ckpt(ckpt_copy: Path):
    """A crash between writing checkpoint-4.ckpt and re-pointing last.ckpt (still at step 2)."""
    last = ckpt_copy / "last.ckpt"
    last.unlink()
    os.link(ckpt_copy / "checkpoint-2.ckpt", last)
    warnings: list[str] = []
    assert find_resume_checkpoint(ckpt_copy, warnings.append).step == 4
    assert warnings == []


def test_resume_auto_with_only_damaged_checkpoints_is_a_clear_error(ckpt_copy: Path):
    for path in ckpt_copy.glob("*.ckpt"):
        _damage(path, "flip:middle")
    with pytest.raises(CheckpointError, match="no complete checkpoint") as info:
        find_resume_checkpoint(ckpt_copy)
    assert str(ckpt_copy) in str(info.value)


def test_temporary_files_of_a_killed_writer_are_ignored_then_removed(ckpt_copy: Path):
    (ckpt_copy / ".checkpoint-6.ckpt.k2j4x9.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    (ckpt_copy / ".last.ckpt.link.tmp").write_bytes(b"")
    ckpt = find_resume_checkpoint(ckpt_copy)
    assert ckpt.step == 4
    ckpt.step = 6
    save_checkpoint(ckpt, ckpt_copy, keep=2)
    assert temp_files(ckpt_copy) == []
    assert sorted(p.name for p in ckpt_copy.glob("*.ckpt")) == ["checkpoint-4.ckpt", "checkpoint-6.ckpt", "last.ckpt"]


# ----------------------------------------------------------------------------- 2. SIGINT / SIGTERM


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_cleanly_with_a_checkpoint_and_flushed_logs(sig: signal.Signals, in_tmp: Path, corpus: Path,
                                                                   lht_cmd: list[str], env: dict[str, str]):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [*lht_cmd, "train", "-q", *set_args(corpus, **{
        "training.num_steps": 10_000, "training.save_every": 10_000, "training.eval_every": 10_000,
        "logging.backend": "tensorboard"})]
    metrics = in_tmp / "runs" / "tiny" / "metrics.jsonl"
    proc = subprocess.Popen(args, cwd=in_tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: len(logged_losses(metrics)) >= 3, 60, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"interrupted by {sig.name}" in lines[0] and "checkpoint saved to" in lines[0], err
    assert "Traceback" not in err
    step = load_checkpoint(in_tmp / "checkpoints" / "tiny" / "last.ckpt").step
    assert step == logged_losses(metrics)[-1][0] >= 3  # the checkpoint holds the last logged step
    events = EventAccumulator(str(in_tmp / "runs" / "tiny"))
    events.Reload()
    assert max(e.step for e in events.Scalars("train/loss")) == step  # TensorBoard was flushed


def test_a_second_ctrl_c_inside_an_update_saves_nothing_half_done(corpus: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]):
    """'Stop now' can land inside optimizer.step(): no checkpoint is written from half-updated weights."""
    original, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].add_(1.0)  # one tensor updated, the rest not yet
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(SystemExit) as info:
        main(["train", "-q", *set_args(corpus, **{"training.num_steps": 10, "training.save_every": 2})])
    err = capsys.readouterr().err
    assert info.value.code == 130 and "interrupted by SIGINT" in err and "checkpoint-2.ckpt" in err, err
    ckpt_dir = Path("checkpoints/tiny")
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["checkpoint-2.ckpt", "last.ckpt"]
    assert newest_loadable_step(ckpt_dir) == 2


# ----------------------------------------------------------------------------- 3. disk full, unwritable output


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``error: ...`` line of a failed command (exit 2), after at most some ``⚠`` warnings."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and all(w.startswith("⚠") for w in lines[:-1]), err
    assert "Traceback" not in err
    return lines[-1]


@pytest.mark.parametrize("key", ["logging.dir", "logging.checkpoint_dir"])
def test_an_unwritable_output_directory_fails_before_training(key: str, in_tmp: Path, corpus: Path,
                                                               capsys: pytest.CaptureFixture[str]):
    (in_tmp / "blocker").write_text("a file where a directory should go")
    err = _cli_error(["train", "-q", *set_args(corpus, **{key: "blocker/out"})], capsys)
    assert "blocker/out/tiny" in err and key in err
    assert not list(in_tmp.rglob("tokenizer.json"))  # failed before reading any data


def test_an_output_path_that_is_a_file_fails_before_training(in_tmp: Path, corpus: Path,
                                                             capsys: pytest.CaptureFixture[str]):
    (in_tmp / "checkpoints").mkdir()
    (in_tmp / "checkpoints" / "tiny").write_text("not a directory")
    err = _cli_error(["train", "-q", *set_args(corpus)], capsys)
    assert "checkpoints/tiny exists but is not a directory" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write to read-only directories")
def test_a_read_only_directory_fails_before_training(in_tmp: Path, corpus: Path, capsys: pytest.CaptureFixture[str]):
    locked = in_tmp / "locked"
    (locked / "tiny").mkdir(parents=True)
    (locked / "tiny").chmod(0o500)
    try:
        err = _cli_error(["train", "-q", *set_args(corpus, **{"logging.checkpoint_dir": "locked"})], capsys)
    finally:
        (locked / "tiny").chmod(0o700)
    assert "not writable" in err


def test_too_little_disk_space_is_an_error_at_start_up(in_tmp: Path, corpus: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]):
    from lhtcli.training import preflight

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: SimpleNamespace(free=50_000))
    err = _cli_error(["train", "-q", *set_args(corpus)], capsys)
    assert "not enough disk space" in err and "checkpoints/tiny" in err
    assert not list(in_tmp.rglob("*.ckpt"))


def test_little_disk_space_is_a_warning(in_tmp: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]):
    from lhtcli.training import preflight

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: SimpleNamespace(free=3 << 20))
    cfg = load_config(None, tiny_overrides(corpus, **{"training.num_steps": 1}))
    assert run_training(cfg, quiet=True).steps == 1
    assert "may fill the disk" in capsys.readouterr().err


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``limit`` bytes are in."""

    def __init__(self, handle, limit: int) -> None:
        self.handle, self.limit, self.written = handle, limit, 0

    def write(self, data) -> int:
        if self.written + len(data) > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_a_failing_checkpoint_write_keeps_the_previous_checkpoint(in_tmp: Path, corpus: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]):
    overrides = {"training.num_steps": 6, "training.save_every": 2, "training.eval_every": 100}
    ckpt_dir = in_tmp / "checkpoints" / "tiny"
    real_fdopen, seen = os.fdopen, {"saves": 0, "before": None}

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        if mode != "wb":
            return handle
        seen["saves"] += 1
        if seen["saves"] < 2:
            return handle
        seen["before"] = {p.name: sha(p) for p in ckpt_dir.glob("*.ckpt")}
        return _FullDisk(handle, limit=64_000)

    monkeypatch.setattr(ckpt_module.os, "fdopen", fdopen)
    err = _cli_error(["train", "-q", *set_args(corpus, **overrides)], capsys)
    assert "could not write checkpoint" in err and "checkpoint-4.ckpt" in err and "No space left" in err
    assert "last.ckpt is intact" in err
    monkeypatch.setattr(ckpt_module.os, "fdopen", real_fdopen)  # (undo() would also leave in_tmp)

    assert {p.name: sha(p) for p in ckpt_dir.glob("*.ckpt")} == seen["before"]  # nothing touched
    assert load_checkpoint(ckpt_dir / "last.ckpt").step == 2
    assert temp_files(ckpt_dir) == [] and not (ckpt_dir / "checkpoint-4.ckpt").exists()
    cfg = load_config(None, tiny_overrides(corpus, **overrides))  # space freed: carry on
    assert run_training(cfg, resume="auto", quiet=True).steps == 6
    assert [s for s, _ in logged_losses(cfg.run_dir() / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def _tmpfs_namespace() -> bool:
    """Whether this machine lets us mount a small tmpfs in a private mount namespace (root, or user
    namespaces allowed); the mount vanishes with the namespace, touching nothing outside."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1"', "sh", "/tmp"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


VERIFY_FULL_DISK = r"""
import json, sys
from pathlib import Path
from lhtcli.training.checkpoint import TEMP_FILE, load_checkpoint
ckpt_dir = Path(sys.argv[1])
names = sorted(p.name for p in ckpt_dir.iterdir())
steps = {p.name: load_checkpoint(p).step for p in ckpt_dir.glob("*.ckpt")}
Path(sys.argv[2]).write_text(json.dumps({"names": names, "steps": steps,
                                         "temp": [n for n in names if TEMP_FILE.match(n)]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not _tmpfs_namespace(), reason="cannot mount a tmpfs here (needs root or user namespaces)")
def test_a_really_full_disk_stops_with_one_error_and_keeps_the_last_good_checkpoint(
        in_tmp: Path, corpus: Path, trained: Path, lht_cmd: list[str], env: dict[str, str]):
    """A real ENOSPC: the checkpoint directory is a tmpfs with room for the start-up check and a few
    checkpoints; the run fills it, stops with one error line, and every file left there verifies."""
    from lhtcli.training.preflight import OVERHEAD_BYTES

    state = load_checkpoint(trained / "checkpoint-4.ckpt").model_state
    weights = sum(t.numel() * t.element_size() for t in state.values())
    size_kb = (3 * weights + OVERHEAD_BYTES) // 1024 + 128  # passes the start-up check, then fills up
    mount = in_tmp / "small"
    mount.mkdir()
    train = [*lht_cmd, "train", "-q", *set_args(corpus, **{
        "training.num_steps": 40, "training.save_every": 1, "training.keep_checkpoints": 40,
        "logging.checkpoint_dir": str(mount)})]
    (in_tmp / "verify.py").write_text(VERIFY_FULL_DISK)
    script = ('mount -t tmpfs -o size="$1"k tmpfs "$2" && shift 2 && "$@" 2>train.err; echo $? > train.rc; '
              f'{sys.executable} verify.py {mount / "tiny"} verify.json')
    subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(size_kb), str(mount), *train], cwd=in_tmp,
                   env=env, timeout=300, check=True)
    err = (in_tmp / "train.err").read_text()
    assert int((in_tmp / "train.rc").read_text()) == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: could not write checkpoint") and "No space left on device" in lines[-1], err
    assert "is intact" in lines[-1] and "Traceback" not in err
    assert all(line.startswith("⚠") for line in lines[:-1]), err  # (the start-up warning about little space)
    found = json.loads((in_tmp / "verify.json").read_text())
    steps = found["steps"]
    assert found["temp"] == [] and steps["last.ckpt"] == max(steps.values()) >= 2  # every file there loads
    assert 2 <= len(steps) - 1 < 40  # as many as fitted; the one that did not is gone
    assert list(mount.iterdir()) == []  # (the tmpfs went with its namespace: nothing outside was touched)


# ----------------------------------------------------------------------------- 4. untrusted checkpoints


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("container", ["torch-zip", "torch-zip-valid-checksum", "raw-pickle"])
def test_a_pickle_that_would_run_code_is_refused(container: str, in_tmp: Path, capsys: pytest.CaptureFixture[str]):
    marker = in_tmp / "pwned"
    evil = in_tmp / "evil.ckpt"
    payload = {"format": "lht-checkpoint", "format_version": FORMAT_VERSION, "payload": _Exploit(marker)}
    if container == "torch-zip":
        torch.save(payload, evil, pickle_module=pickle)
    elif container == "torch-zip-valid-checksum":
        atomic_torch_save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="refusing") as info:
        load_checkpoint(evil)
    assert "evil.ckpt" in str(info.value)
    err = _cli_error(["visualize", "--checkpoint", str(evil), "--output", str(in_tmp / "x.png")], capsys)
    assert "evil.ckpt" in err
    assert not marker.exists()


def _rewrite(source: Path, target: Path, edit: Callable[[dict], None]) -> Path:
    raw = torch.load(source, weights_only=True)
    edit(raw)
    atomic_torch_save(raw, target)  # a valid checksum: only the contents are wrong
    return target


def _reshape_one(raw: dict) -> None:
    name = next(k for k in raw["model"] if k.endswith("norm1.weight"))
    raw["model"][name] = torch.ones(7)
    raw["model_digest"] = ckpt_module.state_digest(raw["model"])


CONTENT_PROBLEMS = {
    "newer_format": (lambda raw: raw.update(format_version=FORMAT_VERSION + 97),
                     f"format version {FORMAT_VERSION + 97}, newer than this lht supports ({FORMAT_VERSION})"),
    "missing_keys": (lambda raw: raw.pop("model_digest"), "missing model_digest"),
    "not_lht": (lambda raw: raw.update(format="something-else"), "not an lht checkpoint"),
    "bad_step": (lambda raw: raw.update(step=-3), "step is -3"),
    "shape_vs_own_config": (_reshape_one, "has shape (7,) but its own model config implies (32,)"),
    "weights_not_tensors": (lambda raw: raw.update(model={"w": [1, 2]}), "not a mapping of parameter names"),
    "bad_config": (lambda raw: raw.update(config_json="{not json"), "unreadable config"),
}


@pytest.mark.parametrize("problem", list(CONTENT_PROBLEMS))
def test_a_checkpoint_with_wrong_contents_is_named(problem: str, trained: Path, tmp_path: Path):
    edit, expected = CONTENT_PROBLEMS[problem]
    path = _rewrite(trained / "checkpoint-4.ckpt", tmp_path / "odd.ckpt", edit)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert expected in str(info.value) and "odd.ckpt" in str(info.value), str(info.value)


def test_resuming_with_a_different_model_shape_names_the_mismatch(trained: Path, corpus: Path,
                                                                   capsys: pytest.CaptureFixture[str]):
    args = set_args(corpus, **{"model.d_model": 64})
    err = _cli_error(["train", "-q", "--resume", str(trained / "last.ckpt"), *args], capsys)
    assert "last.ckpt" in err and "model.d_model is 32 in the checkpoint but 64" in err


# ----------------------------------------------------------------------------- 6. NaN / Inf


def _poison(monkeypatch: pytest.MonkeyPatch, bad_calls: Callable[[int], bool], gradient: bool = False) -> None:
    """Make the loss (or only its gradient) NaN on chosen training forward calls (2 per step here)."""
    from lhtcli.model import LHTEncoder

    original, calls = LHTEncoder.forward, {"n": 0}

    class NaNGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.loss is not None and self.training:
            calls["n"] += 1
            if bad_calls(calls["n"]):
                out.loss = NaNGradient.apply(out.loss) if gradient else out.loss * float("nan")
        return out

    monkeypatch.setattr(LHTEncoder, "forward", forward)


@pytest.mark.parametrize("gradient", [False, True], ids=["nan-loss", "nan-gradient"])
def test_a_nan_step_is_skipped_and_reported_with_its_step(gradient: bool, corpus: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]):
    _poison(monkeypatch, lambda n: n == 5, gradient)  # step 3's first micro-batch
    cfg = load_config(None, tiny_overrides(corpus, **{"training.num_steps": 5, "training.save_every": 5}))
    assert run_training(cfg, quiet=True).steps == 5
    err = capsys.readouterr().err
    assert f"step 3: {'gradient norm' if gradient else 'loss'} is nan; skipping this update" in err
    assert [s for s, _ in logged_losses(cfg.run_dir() / "metrics.jsonl")] == [1, 2, 4, 5]
    final = load_checkpoint(cfg.checkpoint_dir() / "last.ckpt")
    assert all(torch.isfinite(t).all() for t in final.model_state.values())


def test_repeated_nans_stop_the_run_and_keep_the_last_good_checkpoint(corpus: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]):
    _poison(monkeypatch, lambda n: n >= 9)  # every step from step 5 on
    args = set_args(corpus, **{"training.num_steps": 20, "training.save_every": 2, "training.max_bad_steps": 3})
    err = _cli_error(["train", "-q", *args], capsys)
    assert "3 consecutive steps had a NaN/Inf loss (last at step 7)" in err
    ckpt_dir = Path("checkpoints/tiny")
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["checkpoint-2.ckpt", "checkpoint-4.ckpt", "last.ckpt"]
    last = load_checkpoint(ckpt_dir / "last.ckpt")
    assert last.step == 4 and all(torch.isfinite(t).all() for t in last.model_state.values())


# ----------------------------------------------------------------------------- 7. failing logging backends


class _FlakyWandb:
    name = "wandb"
    fail_init = False

    def __init__(self, config, run_dir, on_warning) -> None:
        if self.fail_init:
            raise ConnectionError("api.wandb.ai unreachable")
        self.logged: list[int] = []

    def log_scalars(self, values, step) -> None:
        if step >= 3:
            raise RuntimeError("wandb is down")
        self.logged.append(step)

    def log_figure(self, *args) -> None: ...
    def log_table(self, *args) -> None: ...
    def log_text(self, *args) -> None: ...
    def log_config(self, config) -> None: ...
    def close(self) -> None: ...


@pytest.mark.parametrize("fail_init", [False, True], ids=["fails-mid-run", "fails-to-start"])
def test_a_failing_wandb_never_stops_training(fail_init: bool, corpus: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]):
    import lhtcli.loggers

    monkeypatch.setattr(_FlakyWandb, "fail_init", fail_init)
    monkeypatch.setattr(lhtcli.loggers, "WandbLogger", _FlakyWandb)
    cfg = load_config(None, tiny_overrides(corpus, **{"training.num_steps": 6, "logging.backend": "wandb"}))
    assert run_training(cfg, quiet=True).steps == 6
    err = capsys.readouterr().err
    expected = "wandb logging could not start (ConnectionError" if fail_init else "wandb logging failed (RuntimeError"
    assert err.count(expected) == 1 and err.count("⚠") == 1, err
    assert [s for s, _ in logged_losses(cfg.run_dir() / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("replaced_by_file", [False, True], ids=["deleted", "replaced-by-a-file"])
def test_a_vanishing_tensorboard_directory_never_stops_training(replaced_by_file: bool, corpus: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lhtcli.loggers import TensorBoardLogger

    original = TensorBoardLogger.log_scalars

    def log_scalars(self, values, step):
        if step == 3 and "train/loss" in values:
            shutil.rmtree(self.log_dir)
            if replaced_by_file:
                self.log_dir.write_text("in the way")
        return original(self, values, step)

    monkeypatch.setattr(TensorBoardLogger, "log_scalars", log_scalars)
    cfg = load_config(None, tiny_overrides(corpus, **{"training.num_steps": 6, "training.save_every": 3,
                                                      "logging.backend": "tensorboard"}))
    assert run_training(cfg, quiet=True).steps == 6
    err = capsys.readouterr().err
    assert load_checkpoint(cfg.checkpoint_dir() / "last.ckpt").step == 6
    if replaced_by_file:  # neither TensorBoard nor metrics.jsonl can write: each warns once, training goes on
        assert err.count("tensorboard logging failed") == 1 and err.count("training continues without it") == 1
        assert err.count("⚠") == 2, err
        return
    assert err.count("vanished; recreated it") == 1 and err.count("⚠") == 1, err
    events = EventAccumulator(str(cfg.run_dir()))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [3, 4, 5, 6]
    assert [s for s, _ in logged_losses(cfg.run_dir() / "metrics.jsonl")] == [3, 4, 5, 6]
