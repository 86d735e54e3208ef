"""Start-up checks that catch what would otherwise fail hours into a run (DESIGN.md section 9).

Run on rank 0 before any data is read: the run and checkpoint directories must be creatable and
writable; once the model exists, the checkpoint disk must have room for at least one checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lhtcli.config import LHTConfig
from lhtcli.errors import LHTError

# Adam keeps two moments per parameter next to the weight itself; zip and pickle overhead on top.
OPTIMIZER_COPIES = 3
OVERHEAD_BYTES = 1 << 20


class PreflightError(LHTError):
    """The machine cannot hold this run's output (unwritable directory, no disk space)."""


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def check_writable(directory: Path, key: str) -> None:
    """Create ``directory`` if needed and prove a file can be written, synced and removed in it."""
    fix = f"set {key} to a writable location (e.g. --set {key}=/path/with/space)"
    if directory.exists() and not directory.is_dir():
        raise PreflightError(f"{directory} exists but is not a directory; move it away or {fix}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PreflightError(f"cannot create the directory {directory} ({_describe(exc)}); {fix}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".lht-write-test-", dir=directory)
        try:
            os.write(fd, b"lht")
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        raise PreflightError(f"the directory {directory} is not writable ({_describe(exc)}); {fix}") from None


def check_output_dirs(cfg: LHTConfig) -> None:
    """The run directory (logs, metrics, tokenizer) and the checkpoint directory are writable."""
    check_writable(cfg.run_dir(), "logging.dir")
    check_writable(cfg.checkpoint_dir(), "logging.checkpoint_dir")


def estimate_checkpoint_bytes(model: torch.nn.Module) -> int:
    """About how large one checkpoint of ``model`` with AdamW state will be."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return OPTIMIZER_COPIES * weights + OVERHEAD_BYTES


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def check_disk_space(directory: Path, model: torch.nn.Module, keep: int,
                     warn: Callable[[str], None] | None = None) -> None:
    """Fail when the disk cannot hold even one checkpoint; warn when it cannot hold ``keep`` + 1.

    (``keep`` files are retained and a new one is written beside them before the oldest goes.)
    """
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # not knowable here; a failing write still keeps the previous checkpoint intact
    need = estimate_checkpoint_bytes(model)
    if free < need:
        raise PreflightError(
            f"not enough disk space for checkpoints in {directory}: one needs about {_mb(need)}, {_mb(free)} "
            "free; free some space or set logging.checkpoint_dir to another disk"
        )
    if warn is not None and free < (keep + 1) * need:
        warn(f"only {_mb(free)} free in {directory}; keeping {keep} checkpoints of about {_mb(need)} each "
             "may fill the disk (lower training.keep_checkpoints or free space)")
