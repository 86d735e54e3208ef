"""Self-contained, atomically written, verified and safely loaded checkpoints (DESIGN.md section 8).

A checkpoint holds weights, optimizer and scheduler state, step, RNG and data-stream state, the
resolved config and the tokenizer, so ``lht visualize --checkpoint X`` needs nothing else.

File layout: torch's zip container followed by a 56-byte trailer (magic, payload length, SHA-256 of
the payload, end magic). A writer streams into ``.checkpoint-{step}.ckpt.*.tmp``, fsyncs and renames,
so a reader never sees a partial ``checkpoint-*.ckpt``; the checksum catches truncated or altered
files anyway. Loading uses ``torch.load(weights_only=True)``: a file can hold tensors and plain
values, never code, and it is checked for its format version, keys and tensor shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lhtcli.config import LHTConfig, config_from_dict
from lhtcli.errors import CheckpointError, LHTError

FORMAT_NAME = "lht-checkpoint"
FORMAT_VERSION = 2  # 2: SHA-256 trailer; 1: plain torch zip (still readable)
REQUIRED_KEYS = ("format", "format_version", "step", "model", "config_json", "tokenizer_json", "model_digest")
STEP_FILE = re.compile(r"^checkpoint-(\d+)\.ckpt$")
LAST_FILE = "last.ckpt"
TEMP_FILE = re.compile(r"^\.(?:checkpoint-\d+|last)\.ckpt\..*tmp$")  # left behind by a killed writer
TRAILER = struct.Struct("<8sQ32s8s")
TRAILER_MAGIC, TRAILER_END = b"LHTCKSUM", b"LHTCKEND"
_CHUNK = 8 << 20
DAMAGED_HINT = "resume from an older checkpoint-*.ckpt in the same directory (--resume auto picks the newest good one)"


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


# ----------------------------------------------------------------------------- writing


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what torch.save streams through it."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.sha = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            written = self.handle.write(data)
        except OSError as exc:  # torch may wrap it in a RuntimeError: keep the original
            self.error = exc
            raise
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        return written

    def flush(self) -> None:
        self.handle.flush()


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (best effort: not every file system allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save + checksum trailer into a temporary file in the same directory, fsync, rename.

    A crash at any point leaves either the old ``path`` or the complete new one (plus, at worst, a
    ``.tmp`` file that the next save removes). An OSError (disk full, ...) leaves ``path`` untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer = _HashingWriter(handle)
            try:
                torch.save(obj, writer)
            except Exception as exc:
                if writer.error is not None:
                    raise writer.error from exc
                raise
            handle.write(TRAILER.pack(TRAILER_MAGIC, writer.size, writer.sha.digest(), TRAILER_END))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _link_or_copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        import shutil

        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    _fsync_directory(target.parent)


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete ``.checkpoint-*.tmp`` / ``.last.ckpt.*tmp`` files a killed writer left behind."""
    removed = []
    for entry in directory.iterdir():
        if TEMP_FILE.match(entry.name) and entry.is_file():
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def _step_files(directory: Path) -> list[tuple[int, Path]]:
    return [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]


def _newest_first(paths: list[Path]) -> list[Path]:
    """Most recently written first (then the higher step): the order --resume auto tries them in."""

    def key(p: Path) -> tuple[int, int]:
        try:
            mtime = p.stat().st_mtime_ns
        except OSError:
            mtime = -1
        m = STEP_FILE.match(p.name)
        return mtime, int(m.group(1)) if m else -1

    return sorted(paths, key=key, reverse=True)


def save_checkpoint(ckpt: Checkpoint, directory: Path, keep: int = 3) -> Path:
    """Write ``checkpoint-{step}.ckpt``, point ``last.ckpt`` at it, keep the newest ``keep`` step files.

    A failed write (disk full, directory gone read-only) raises a CheckpointError and leaves every
    earlier checkpoint as it was.
    """
    directory = Path(directory)
    path = directory / f"checkpoint-{ckpt.step}.ckpt"
    last = directory / LAST_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(directory)
        atomic_torch_save(_payload(ckpt), path)
        _link_or_copy_atomic(path, last)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        kept = f"the previous checkpoint {last} is intact" if last.exists() else "no earlier checkpoint was touched"
        raise CheckpointError(
            f"could not write checkpoint {path}: {reason}; {kept}. Free disk space or set "
            "logging.checkpoint_dir to a writable disk, then continue with --resume auto"
        ) from exc
    newest = _newest_first([p for _, p in _step_files(directory)])
    for old in [p for p in newest if p != path][max(keep - 1, 0) :]:
        try:
            old.unlink()
        except OSError:
            pass
    return path


# ----------------------------------------------------------------------------- reading


def verify_file_checksum(path: Path) -> bool:
    """Check the trailer: True when present and the checksum matches, False for a file without one.

    Raises CheckpointError for an empty, truncated or altered file.
    """
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): it was never completely written; {DAMAGED_HINT}")
    if size < TRAILER.size:
        return False
    with path.open("rb") as handle:
        handle.seek(size - TRAILER.size)
        magic, length, digest, end = TRAILER.unpack(handle.read(TRAILER.size))
        if magic != TRAILER_MAGIC or end != TRAILER_END:
            return False
        if length != size - TRAILER.size:
            raise CheckpointError(
                f"{path} is incomplete or corrupted: its trailer records {length:,} bytes of data but the file "
                f"holds {size - TRAILER.size:,}; {DAMAGED_HINT}"
            )
        handle.seek(0)
        sha, remaining = hashlib.sha256(), length
        while remaining:
            chunk = handle.read(min(_CHUNK, remaining))
            if not chunk:
                break
            sha.update(chunk)
            remaining -= len(chunk)
    if remaining or sha.digest() != digest:
        raise CheckpointError(
            f"{path} is corrupted: its SHA-256 checksum does not match its contents (the file was damaged or "
            f"modified after it was written); {DAMAGED_HINT}"
        )
    return True


def _expected_shapes(config: LHTConfig) -> dict[str, tuple[int, ...]] | None:
    """Parameter shapes the saved model config implies (built on the meta device: no memory, no init)."""
    if config.model.vocab_size is None:
        return None
    from lhtcli.model import LHTEncoder

    with torch.device("meta"):
        model = LHTEncoder(config.model)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_contents(raw: dict[str, Any], path: Path, checksummed: bool) -> LHTConfig:
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path} has an invalid checkpoint format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, newer than this lht supports ({FORMAT_VERSION}); "
            "upgrade lht to read it"
        )
    if version >= 2 and not checksummed:
        raise CheckpointError(
            f"{path} is incomplete: its checksum trailer is missing (truncated or not written by lht); {DAMAGED_HINT}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise CheckpointError(f"{path} is incomplete: missing {', '.join(missing)}")
    step, model = raw["step"], raw["model"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path} is malformed: step is {step!r}, not a non-negative integer")
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
    ):
        raise CheckpointError(f"{path} is malformed: 'model' is not a mapping of parameter names to tensors")
    for key in ("config_json", "tokenizer_json"):
        if not isinstance(raw[key], str):
            raise CheckpointError(f"{path} is malformed: {key!r} is {type(raw[key]).__name__}, not text")
    if state_digest(model) != raw["model_digest"]:
        raise CheckpointError(f"{path} is corrupted: its weights do not match their recorded digest; {DAMAGED_HINT}")
    try:
        config = config_from_dict(json.loads(raw["config_json"]))
    except (ValueError, TypeError, LHTError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} holds an unreadable config: {first}") from exc
    try:
        expected = _expected_shapes(config)
    except Exception as exc:  # noqa: BLE001 - any failure to build the saved model is a bad checkpoint
        raise CheckpointError(f"{path} holds a model config lht cannot build: {exc}") from exc
    if expected is not None:
        for name, shape in expected.items():
            if name not in model:
                raise CheckpointError(f"{path} is incomplete: parameter {name!r} of its model config is missing")
            if tuple(model[name].shape) != shape:
                raise CheckpointError(
                    f"{path} is malformed: parameter {name!r} has shape {tuple(model[name].shape)} but its own "
                    f"model config implies {shape}"
                )
        extra = sorted(set(model) - set(expected))
        if extra:
            raise CheckpointError(f"{path} is malformed: unexpected parameters {extra[:3]} for its model config")
    return config


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; any problem is a CheckpointError naming the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass a .ckpt file (e.g. {path / LAST_FILE}) or a folder "
                              "written by lht export")
    try:
        checksummed = verify_file_checksum(path)
        with path.open("rb") as handle:  # neither a torch zip nor a pickle (a corpus, a config, random bytes)
            head = handle.read(4)
        if not head.startswith(b"PK\x03\x04") and head[:1] != b"\x80":
            raise CheckpointError(f"{path} is not a readable lht checkpoint (not a PyTorch file); "
                                  "pass a .ckpt written by lht train")
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "Unsupported operand" in str(exc):
            raise CheckpointError(
                f"{path} contains Python objects that would run code when loaded; refusing to load it "
                "(lht checkpoints hold only tensors and plain values)"
            ) from exc
        raise CheckpointError(f"{path} is not a readable lht checkpoint (corrupted or incomplete): {message}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an lht checkpoint (no '{FORMAT_NAME}' header)")
    config = _check_contents(raw, path, checksummed)
    try:
        metrics = json.loads(raw.get("metrics_json") or "{}")
    except (ValueError, TypeError):
        metrics = {}
    return Checkpoint(
        step=int(raw["step"]),
        config=config,
        model_state=raw["model"],
        tokenizer_json=raw["tokenizer_json"],
        optimizer_state=raw.get("optimizer"),
        scheduler_state=raw.get("scheduler"),
        rng_state=raw.get("rng"),
        data_state=raw.get("data_state"),
        metrics=metrics if isinstance(metrics, dict) else {},
        path=path,
    )


def resolve_resume_path(resume: str, checkpoint_dir: Path) -> Path | None:
    """``auto`` means the run's ``last.ckpt`` (None when the run has none yet: start fresh)."""
    if resume == "auto":
        last = checkpoint_dir / LAST_FILE
        return last if last.exists() else None
    return Path(resume)


def find_resume_checkpoint(
    checkpoint_dir: Path, on_warning: Callable[[str], None] | None = None
) -> Checkpoint | None:
    """What ``--resume auto`` continues from: the newest checkpoint that loads and verifies.

    ``last.ckpt`` normally is that one; when it is damaged (or a crash came between writing
    ``checkpoint-N.ckpt`` and linking it), the newest good ``checkpoint-*.ckpt`` is used and the
    skipped files are named in a warning. None when the directory holds no checkpoint (start fresh);
    a CheckpointError when it holds only damaged ones.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    candidates = [p for _, p in _step_files(checkpoint_dir)]
    if (checkpoint_dir / LAST_FILE).exists():
        candidates.append(checkpoint_dir / LAST_FILE)
    problems: list[str] = []
    seen: set[tuple[int, int]] = set()
    for path in _newest_first(candidates):
        try:
            stat = path.stat()
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in seen:  # last.ckpt is a hard link to a step file
            continue
        seen.add((stat.st_dev, stat.st_ino))
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems and on_warning is not None:
            on_warning(f"skipping damaged checkpoint(s): {' | '.join(problems)}; resuming from {path} "
                       f"(step {ckpt.step})")
        return ckpt
    if problems:
        raise CheckpointError(
            f"--resume auto: no complete checkpoint in {checkpoint_dir} ({len(problems)} damaged; newest: "
            f"{problems[0]}). Pass --resume PATH to a good checkpoint, or move the directory away to start fresh"
        )
    return None


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
