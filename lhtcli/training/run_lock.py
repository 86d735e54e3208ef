"""One ``lht train`` per experiment directory at a time.

Two runs writing the same checkpoints and metrics.jsonl would interleave them beyond repair, so a run
holds an exclusive ``flock`` on ``.lht-train.lock`` in its checkpoint directory for as long as it lives.
The kernel releases a flock when its process dies, however it dies: a run killed with SIGKILL never
blocks the ``--resume auto`` after it. The file records the holder's pid, host and start time, so the
refused run can say who holds it. Under DDP only rank 0 takes the lock (the other ranks are its
workers, started by the same launcher).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from lhtcli.core.kernel_cache import OwnedLock, Owner, probe_lock
from lhtcli.errors import LHTError

LOCK_NAME = ".lht-train.lock"


class RunLockedError(LHTError):
    """Another live ``lht train`` is using this experiment's directories."""


def _is_rank_zero() -> bool:
    """As lhtcli.training.distributed decides: a plain run (WORLD_SIZE <= 1) or torchrun's rank 0."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return True
    except ValueError:
        return True
    return os.environ.get("RANK", "0") in ("", "0")


@contextlib.contextmanager
def experiment_lock(checkpoint_dir: Path, experiment: str) -> Iterator[Path | None]:
    """Hold the experiment's lock for the body (yields the lock file, or None where none could be taken:
    not rank 0, no flock on this filesystem, or a directory the start-up checks will report as unusable)."""
    if not _is_rank_zero():
        yield None
        return
    lock = OwnedLock(checkpoint_dir / LOCK_NAME)
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        acquired: bool | None = lock.try_acquire()
    except OSError:  # unwritable or not a directory: preflight names it; no flock here: run unguarded
        acquired = None
    if acquired is False:
        state = probe_lock(lock.path)
        raise RunLockedError(_refusal(experiment, lock.path, state.owner if state is not None else None))
    try:
        yield lock.path if acquired else None
    finally:
        lock.release()


def _refusal(experiment: str, path: Path, owner: Owner | None) -> str:
    who = "another lht train"
    if owner is not None:
        since = time.strftime("%H:%M:%S", time.localtime(owner.started))
        who = f"another lht train ({owner.describe()}, started {since})"
    return (f"{who} is already running experiment '{experiment}' ({path} is locked); wait for it to finish or "
            "stop it, or give this run another experiment_name (--set experiment_name=NAME)")
