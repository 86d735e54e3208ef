"""The on-disk cache of compiled native kernels, safe against interrupted and concurrent builds.

Layout of the cache directory (``lhtcli.core.native.cache_dir()``), for a build named ``lht_band_<hash>``:

- ``lht_band_<hash>/lht_band_<hash>.so``: a finished module. It only ever appears by an atomic rename, so
  its presence means it is complete; ``build.json`` beside it says what built it and when.
- ``lht_band_<hash>.lock``: held with ``fcntl.flock`` by the one process building that module (its pid,
  host and start time inside, for messages). The kernel drops a flock when its owner dies, however it
  dies, so a killed build never blocks the next one: an unheld lock file is simply taken over.
- ``lht_band_<hash>.tmp-<pid>-<random>/``: a build in progress. Each build compiles in its own directory,
  so even two processes that both build (no flock on this filesystem, or a hung owner) never share files.

Versions of lht before this layout built inside ``lht_band_<hash>/`` itself, guarded by torch's ``lock``
file there, which a killed build left behind forever; such "legacy" locks are judged by whether a process
still works in that directory (see :func:`legacy_build_running`), never waited on blindly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # (not POSIX: the kernel is never built there)
    fcntl = None  # type: ignore[assignment]

PREFIX = "lht_band_"
LEGACY_LOCK = "lock"  # torch's FileBaton inside a build directory of older lht versions
LEGACY_GRACE_S = 30.0  # a legacy lock this fresh may belong to a build that has not started ninja yet


def env_seconds(name: str, default: float) -> float:
    """A duration from the environment (seconds; an unparsable or negative value means the default)."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value >= 0 else default


def stale_after_s() -> float:
    """A build lock held longer than this is taken for a hung build and ignored (``LHT_KERNEL_STALE``)."""
    return env_seconds("LHT_KERNEL_STALE", 1800.0)


def lock_path(cache: Path, name: str) -> Path:
    return cache / f"{name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@dataclass
class Owner:
    """Who holds (or held) a lock or a temporary build directory."""

    pid: int | None
    host: str
    started: float

    @classmethod
    def me(cls) -> Owner:
        return cls(os.getpid(), socket.gethostname(), time.time())

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data.get("host", "")), float(data.get("started", 0.0)))
        except (ValueError, KeyError, TypeError):
            return None

    def dump(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "started": self.started})

    def age(self) -> float:
        return max(0.0, time.time() - self.started)

    def gone(self) -> bool:
        """True when the owner is known to be dead (same host, no such process)."""
        return self.host == socket.gethostname() and self.pid is not None and not _pid_alive(self.pid)

    def describe(self) -> str:
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"pid {self.pid}{where}"


class LockUnsupported(OSError):
    """flock is not available on the cache's filesystem (some network filesystems)."""


class OwnedLock:
    """An exclusive, non-blocking flock on ``path``; the kernel releases it when the owner dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it (also when a dead owner left the file); False if held."""
        if fcntl is None:
            raise LockUnsupported(errno.ENOLCK, "no fcntl on this platform")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as exc:
                os.close(fd)
                raise LockUnsupported(exc.errno, f"cannot lock {self.path}: {exc.strerror}") from None
            try:  # the holder before us may have unlinked the file as it released: lock the file on disk
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, Owner.me().dump().encode())
            self.fd = fd
            return True

    def release(self) -> None:
        """Remove the lock file (while still holding it, so nobody locks a file about to vanish), unlock."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


@dataclass
class LockState:
    path: Path
    owner: Owner | None
    held: bool  # some live process holds the flock now


def probe_lock(path: Path) -> LockState | None:
    """The state of a build lock file (None when there is none); never blocks, never takes it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        owner = Owner.parse(os.read(fd, 4096).decode("utf-8", "replace"))
        held = False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                held = True
            except OSError:  # no flock here: judge by the recorded owner
                held = owner is not None and not owner.gone()
    finally:
        os.close(fd)
    return LockState(path, owner, held)


# ----------------------------------------------------------------------------- temporary build directories


def new_temp_dir(cache: Path, name: str) -> Path:
    """A fresh private directory for one build, with its owner recorded inside."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    (path / "owner.json").write_text(Owner.me().dump())
    return path


def temp_dirs(cache: Path) -> list[Path]:
    try:
        return sorted(p for p in cache.glob(f"{PREFIX}*.tmp-*") if p.is_dir())
    except OSError:
        return []


def temp_dir_owner(path: Path) -> Owner | None:
    try:
        return Owner.parse((path / "owner.json").read_text())
    except OSError:
        return None


def temp_dir_abandoned(path: Path) -> bool:
    """True when no live process builds in ``path``: its owner is dead, or it is older than the stale bound
    (or it has no owner record and is more than a minute old: its creator died right after ``mkdir``)."""
    owner = temp_dir_owner(path)
    if owner is None:
        try:
            return time.time() - path.stat().st_mtime > 60
        except OSError:
            return False
    return owner.gone() or owner.age() > stale_after_s()


def remove_tree(path: Path, attempts: int = 10) -> bool:
    """rmtree that outlasts a compiler orphaned by a killed ninja still writing its last object file."""
    for attempt in range(attempts):
        try:
            shutil.rmtree(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if attempt + 1 < attempts:
                time.sleep(0.2)
    return not path.exists()


def processes_in(directory: Path) -> list[int]:
    """This user's processes whose working directory is ``directory`` (torch runs ninja there, and the
    compilers inherit it); other users' processes are not visible and not counted."""
    target, found = str(directory.resolve()), []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry.name}/cwd") == target:
                        found.append(int(entry.name))
    return found


def remove_abandoned_temp_dirs(cache: Path) -> list[Path]:
    """Remove temporary directories of dead builds, first stopping the compilers a killed build orphaned
    there (they would otherwise compete for the CPU with the build that replaces it for up to a minute)."""
    removed = []
    for path in temp_dirs(cache):
        if not temp_dir_abandoned(path):
            continue
        owner = temp_dir_owner(path)
        if owner is not None and owner.gone():
            for pid in processes_in(path):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
        if remove_tree(path, attempts=5):
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------- legacy (torch FileBaton) locks


def legacy_build_running(build: Path) -> bool:
    """Whether an older lht may be building in ``build`` right now: its torch ``lock`` is fresh, or some
    process (ninja, which torch runs inside the build directory) has it as working directory."""
    lock = build / LEGACY_LOCK
    try:
        if time.time() - lock.stat().st_mtime < LEGACY_GRACE_S:
            return True
    except OSError:
        return False
    return bool(processes_in(build))


def has_stale_legacy_lock(build: Path) -> bool:
    return (build / LEGACY_LOCK).exists() and not legacy_build_running(build)


# ----------------------------------------------------------------------------- publishing and inventory


def library(cache: Path, name: str) -> Path:
    return cache / name / f"{name}.so"


def publish(built_so: Path, cache: Path, name: str, info: dict) -> Path:
    """Move a finished module into ``cache/name/`` with one atomic rename (readers see all of it or none),
    with ``build.json`` written first; a stale legacy ``lock`` there is removed."""
    target_dir = cache / name
    target_dir.mkdir(parents=True, exist_ok=True)
    meta = target_dir / f".build.json.{os.getpid()}.tmp"
    meta.write_text(json.dumps(info, indent=1))
    os.replace(meta, target_dir / "build.json")
    target = library(cache, name)
    os.replace(built_so, target)
    with contextlib.suppress(OSError):
        fd = os.open(target_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if has_stale_legacy_lock(target_dir):
        with contextlib.suppress(OSError):
            (target_dir / LEGACY_LOCK).unlink()
    return target


def build_info(cache: Path, name: str) -> dict:
    try:
        data = json.loads((cache / name / "build.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def builds(cache: Path) -> list[Path]:
    """Every build directory in the cache (finished or not), newest first."""
    try:
        found = [d for d in cache.glob(f"{PREFIX}*") if d.is_dir() and ".tmp-" not in d.name]
        return sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)
    except OSError:
        return []


def lock_files(cache: Path) -> Iterator[Path]:
    with contextlib.suppress(OSError):
        yield from sorted(cache.glob(f"{PREFIX}*.lock"))
