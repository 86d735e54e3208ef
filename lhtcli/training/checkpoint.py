"""Self-contained, atomically written, safely loaded checkpoints (DESIGN.md section 8).

A checkpoint holds weights, optimizer and scheduler state, step, RNG and data-stream state, the
resolved config and the tokenizer, so ``lht visualize --checkpoint X`` needs nothing else. Loading
uses ``torch.load(weights_only=True)``: a file can hold tensors and plain values, never code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lhtcli.config import LHTConfig, config_from_dict
from lhtcli.errors import CheckpointError

FORMAT_NAME = "lht-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "step", "model", "config_json", "tokenizer_json", "model_digest")
STEP_FILE = re.compile(r"^checkpoint-(\d+)\.ckpt$")


@dataclass
class Checkpoint:
    step: int
    config: LHTConfig
    model_state: dict[str, torch.Tensor]
    tokenizer_json: str
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = None
    data_state: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A cheap fingerprint of names, shapes and a few values: proves a loaded state is the one saved."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _payload(ckpt: Checkpoint) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": int(ckpt.step),
        "model": ckpt.model_state,
        "model_digest": state_digest(ckpt.model_state),
        "optimizer": ckpt.optimizer_state,
        "scheduler": ckpt.scheduler_state,
        "rng": ckpt.rng_state,
        "data_state": ckpt.data_state,
        "metrics_json": json.dumps(ckpt.metrics),
        "config_json": json.dumps(ckpt.config.to_dict()),
        "tokenizer_json": ckpt.tokenizer_json,
    }


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _link_or_copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        import shutil

        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def save_checkpoint(ckpt: Checkpoint, directory: Path, keep: int = 3) -> Path:
    """Write ``checkpoint-{step}.ckpt``, point ``last.ckpt`` at it, keep the newest ``keep`` step files."""
    path = directory / f"checkpoint-{ckpt.step}.ckpt"
    atomic_torch_save(_payload(ckpt), path)
    _link_or_copy_atomic(path, directory / "last.ckpt")
    step_files = sorted(
        (int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))
    )
    for _, old in step_files[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; any problem is a CheckpointError naming the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass a .ckpt file (e.g. {path / 'last.ckpt'})")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path} contains Python objects that would run code when loaded; refusing to load it "
                "(lht checkpoints hold only tensors and plain values)"
            ) from exc
        raise CheckpointError(f"{path} is not a readable lht checkpoint (corrupted or incomplete): {message}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an lht checkpoint (no '{FORMAT_NAME}' header)")
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, newer than this lht supports ({FORMAT_VERSION}); "
            "upgrade lht to read it"
        )
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise CheckpointError(f"{path} is incomplete: missing {', '.join(missing)}")
    if state_digest(raw["model"]) != raw["model_digest"]:
        raise CheckpointError(f"{path} is corrupted: its weights do not match their recorded digest")
    try:
        config = config_from_dict(json.loads(raw["config_json"]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} holds an unreadable config: {exc}") from exc
    return Checkpoint(
        step=int(raw["step"]),
        config=config,
        model_state=raw["model"],
        tokenizer_json=raw["tokenizer_json"],
        optimizer_state=raw.get("optimizer"),
        scheduler_state=raw.get("scheduler"),
        rng_state=raw.get("rng"),
        data_state=raw.get("data_state"),
        metrics=json.loads(raw.get("metrics_json") or "{}"),
        path=path,
    )


def resolve_resume_path(resume: str, checkpoint_dir: Path) -> Path | None:
    """``auto`` means the run's ``last.ckpt`` (None when the run has none yet: start fresh)."""
    if resume == "auto":
        last = checkpoint_dir / "last.ckpt"
        return last if last.exists() else None
    return Path(resume)


def check_model_compatible(ckpt: Checkpoint, model: torch.nn.Module) -> None:
    """Name the first mismatching parameter instead of a wall of load_state_dict text."""
    expected = model.state_dict()
    for name, tensor in ckpt.model_state.items():
        if name not in expected:
            raise CheckpointError(
                f"checkpoint parameter {name!r} does not exist in this model (different model config?)"
            )
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint parameter {name!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(expected[name].shape)}: the checkpoint was trained with a different model config"
            )
    absent = [name for name in expected if name not in ckpt.model_state]
    if absent:
        raise CheckpointError(f"checkpoint lacks parameters {absent[:3]} (different model config?)")
