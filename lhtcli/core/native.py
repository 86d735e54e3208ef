"""The native CPU kernels in C++, compiled on first use: ML-SWA attention (``band_kernel.cpp``:
level 0's band and the boundary rows' extra keys), and the elementwise passes of a training step around it:
dropout (``dropout_kernel.cpp``), a block's residual branch with the LayerNorm after it
(``norm_kernel.cpp``), the MLP's bias + GELU (``gelu_kernel.cpp``), the attention inputs from the
packed q/k/v projection: bias, RoPE and the head-major layout (``qkv_kernel.cpp``), and the MLM loss with the
decoder's bias (``loss_kernel.cpp``); ``vector_math.h`` and ``philox.h`` (dropout's masks) hold what the
elementwise ones share.

The CPU flash kernel that the fast path otherwise uses for level 0 computes whole 64 x 512 blocks over
padded key windows with an additive mask: 768 keys per query where 513 are allowed at w=256. The
native kernel multiplies each block of 64 queries against exactly the keys its rows reach (576) and
accumulates the key gradients in place: about 30% less time for level 0's forward+backward.

It is built with ``torch.utils.cpp_extension`` (g++ and ninja, ``-O3 -march=native``: it runs on the
machine that built it) into ``$LHT_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/lht/kernels`` or
``~/.cache/lht/kernels``), once per source, torch version and CPU; that takes ~50 s on 2 cores. Anything
missing (no compiler, no AVX2/FMA, not x86-64 Linux) or ``LHT_NATIVE_KERNEL=0`` leaves the flash
kernel in place, with one warning when a build was attempted and failed.

A build never leaves anything that blocks a later run (``kernel_cache.py``): it compiles in a private
temporary directory, publishes the module with one atomic rename, and holds a lock that the kernel drops
when the process dies. A second process waits for a live build with a visible message for at most
``LHT_KERNEL_WAIT`` seconds (default 300), then goes on with the flash kernel. Ctrl-C, SIGTERM or SIGHUP
during the build remove its temporary directory and release the lock before the process exits.
``lht kernels status|build|clean`` shows, makes and removes builds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lhtcli.core import kernel_cache
from lhtcli.core.kernel_cache import LockUnsupported, OwnedLock

_SOURCES = [
    Path(__file__).with_name(name)
    for name in (
        "band_kernel.cpp", "dropout_kernel.cpp", "norm_kernel.cpp", "gelu_kernel.cpp", "qkv_kernel.cpp",
        "loss_kernel.cpp", "native_module.cpp",
    )
]
_HEADERS = [Path(__file__).with_name(name) for name in ("vector_math.h", "philox.h")]
_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}


def cpuinfo(key: str) -> str:
    """The first ``key : value`` of /proc/cpuinfo (e.g. "flags", "vendor_id", "model name"); "" if absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return ""


def _cpu_flags() -> set[str]:
    return set(cpuinfo("flags").split())


def _why_unsupported() -> str | None:
    if os.environ.get("LHT_NATIVE_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by LHT_NATIVE_KERNEL"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64 Linux, not {platform.system()} {platform.machine()}"
    flags = _cpu_flags()
    if not {"avx2", "fma"} <= flags:
        return "the CPU lacks AVX2/FMA"
    return None


def supported() -> bool:
    """True when this machine and environment allow the kernel (it may still need building)."""
    return _why_unsupported() is None


def cache_dir() -> Path:
    root = os.environ.get("LHT_KERNEL_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lht" / "kernels"


# Tests only: build these (tiny, fast) sources instead of the real ones, and never use the result. It lets
# the fault-injection tests kill builds many times in seconds; the module's hash name follows the sources.
TEST_SOURCES_ENV = "_LHT_KERNEL_TEST_SOURCES"
BUILDING_MESSAGE = "building the ML-SWA CPU kernel (once per machine, under a minute)"
STAND_IN_REASON = f"only a test stand-in module was built ({TEST_SOURCES_ENV})"
Report = Callable[..., None]  # report(message, waiting=False): what a slow step is doing now


def _sources() -> tuple[list[Path], list[Path]]:
    stand_in = os.environ.get(TEST_SOURCES_ENV, "").strip()
    if stand_in:
        return [Path(p) for p in stand_in.split(os.pathsep) if p], []
    return _SOURCES, _HEADERS


def _build_name() -> str:
    import torch

    sources, headers = _sources()
    key = hashlib.sha256()
    for source in (*sources, *headers):
        key.update(source.read_bytes())
    key.update(torch.__version__.encode())
    key.update(" ".join(sorted(_cpu_flags())).encode())  # -march=native code is only valid on this CPU
    return f"{kernel_cache.PREFIX}{key.hexdigest()[:16]}"


def _built_library(name: str) -> Path:
    return kernel_cache.library(cache_dir(), name)


def _is_complete(name: str) -> bool:
    """A published module with no legacy torch ``lock`` beside it (an older lht may be linking that file
    in place right now, or was killed doing so: then it is rebuilt and replaced)."""
    library = _built_library(name)
    return library.exists() and not (library.parent / kernel_cache.LEGACY_LOCK).exists()


def is_built() -> bool:
    """True when this source, torch and CPU already have a compiled module in the cache."""
    return _why_unsupported() is None and _is_complete(_build_name())


def ready() -> bool:
    """True when the kernel is loaded or already built (this starts no build; checked once)."""
    if "module" in _STATE:
        return _STATE["module"] is not None
    if "built" not in _STATE:
        _STATE["built"] = is_built() and not os.environ.get(TEST_SOURCES_ENV)
    return _STATE["built"]


KEEP_BUILDS = 4  # newest builds kept in the cache (other torch versions or lhtcli checkouts may share it)


def _mark_used(name: str) -> None:
    """Refresh a build's modification time when it is loaded, so that pruning keeps the builds in use."""
    try:
        os.utime(cache_dir() / name)
    except OSError:
        pass  # (a read-only cache: nothing is pruned there either)


def _being_built(build: Path) -> bool:
    """A live lock (ours, or an older lht's torch ``lock``) guards this build directory."""
    state = kernel_cache.probe_lock(kernel_cache.lock_path(build.parent, build.name))
    if state is not None and state.held:
        return True
    return (build / kernel_cache.LEGACY_LOCK).exists() and kernel_cache.legacy_build_running(build)


def prune_builds(current: str, keep: int = KEEP_BUILDS) -> list[Path]:
    """Remove all but the ``keep`` most recently used kernel builds (the current one always stays, and so
    does any being built). Each source change builds a new ~3 MB module; without this they would pile up.
    Returns what was removed; errors leave a build in place."""
    import shutil

    old_builds = [d for d in kernel_cache.builds(cache_dir()) if d.name != current]
    removed = []
    for old in old_builds[max(keep - 1, 0) :]:
        if _being_built(old):
            continue
        try:
            shutil.rmtree(old)
        except OSError:
            continue
        removed.append(old)
    return removed


def _import_built(name: str):
    """Load an already built module directly: its name carries the hash of everything it was built
    from, so no rebuild check (and no ninja run) is needed."""
    import importlib.machinery
    import importlib.util

    import torch  # noqa: F401  (the module links against libtorch, which torch loads)

    loader = importlib.machinery.ExtensionFileLoader(name, str(_built_library(name)))
    spec = importlib.util.spec_from_file_location(name, str(_built_library(name)), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class _WaitedTooLong(Exception):
    """Another process's build outlasted LHT_KERNEL_WAIT: go on without the kernel."""


class _BuildSignal(KeyboardInterrupt):
    """SIGTERM/SIGHUP during a build: unwinds like Ctrl-C (cleaning up), then the signal is re-sent."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_clean_up() -> Iterator[None]:
    """While building: SIGTERM and SIGHUP (a closed terminal, a job timeout) raise, so that the temporary
    directory and the lock are released on the way out; afterwards the signal is delivered again with the
    handler that was there before (by default it ends the process with the usual 143/129 status)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def handle(signum: int, frame: Any) -> None:
        raise _BuildSignal(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, handle)
    try:
        yield
    except _BuildSignal as exc:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        previous.clear()
        os.kill(os.getpid(), exc.signum)
        raise KeyboardInterrupt from None  # (only reached when the restored handler lets us live)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _compile(name: str, report: Report, interrupted: kernel_cache.Owner | None, verbose: bool):
    """Compile in a private temporary directory and publish the module atomically; the directory goes
    whatever happens (an exception, Ctrl-C, SIGTERM)."""
    from torch.utils import cpp_extension

    cache = cache_dir()
    sources, _ = _sources()
    note = f"; the build of {interrupted.describe()} was interrupted" if interrupted else ""
    report(BUILDING_MESSAGE + note)
    started = time.time()
    temp = kernel_cache.new_temp_dir(cache, name)
    try:
        versions = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
        if versions is not None:  # a second build in one process would otherwise be renamed name_v1
            getattr(versions, "entries", {}).pop(name, None)
        module = cpp_extension.load(
            name,
            [str(source) for source in sources],
            extra_cflags=["-O3", "-march=native", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(temp),
            verbose=verbose,
        )
        import torch

        kernel_cache.publish(temp / f"{name}.so", cache, name, {
            "name": name, "torch": torch.__version__, "built_at": time.time(), "build_seconds": time.time() - started,
            "sources": [s.name for s in sources], "host": kernel_cache.Owner.me().host,
        })
    finally:
        kernel_cache.remove_tree(temp)
    prune_builds(name)
    return module


def _obtain(name: str, report: Report, force: bool = False, verbose: bool = False):
    """The module ``name``: loaded when published, else built under its lock; while another live process
    builds it, waited for (visibly, at most LHT_KERNEL_WAIT seconds)."""
    cache = cache_dir()
    wait_s = kernel_cache.env_seconds("LHT_KERNEL_WAIT", 300.0)
    deadline = time.monotonic() + wait_s
    lock = OwnedLock(kernel_cache.lock_path(cache, name))
    announced = None
    while True:
        if not force and _is_complete(name):
            try:
                module = _import_built(name)
                _mark_used(name)
                return module
            except (ImportError, OSError) as exc:  # a damaged file in the cache: build it again, once
                report(f"the cached kernel could not be loaded ({exc}); rebuilding it")
                force = True
        build_dir = cache / name
        if (build_dir / kernel_cache.LEGACY_LOCK).exists() and kernel_cache.legacy_build_running(build_dir):
            who = f"an older lht version, in {build_dir}"
        else:
            before = kernel_cache.probe_lock(lock.path)
            try:
                acquired = lock.try_acquire()
            except (LockUnsupported, OSError):  # no flock here: a private build is still safe
                return _compile(name, report, None, verbose)
            if acquired:
                try:
                    if not force and _is_complete(name):
                        continue  # published while we waited: load it (the lock is released first)
                    kernel_cache.remove_abandoned_temp_dirs(cache)
                    gone = before.owner if before is not None and before.owner and before.owner.gone() else None
                    return _compile(name, report, gone, verbose)
                finally:
                    lock.release()
            state = kernel_cache.probe_lock(lock.path)
            if state is None or not state.held:  # released in between: try again at once
                time.sleep(0.05)
                continue
            owner = state.owner
            if owner is not None and owner.age() > kernel_cache.stale_after_s():
                report(f"the kernel build of {owner.describe()} has held its lock for {owner.age() / 60:.0f} min "
                       "(LHT_KERNEL_STALE); building separately")
                return _compile(name, report, None, verbose)
            who = owner.describe() if owner is not None else "pid unknown"
        if time.monotonic() >= deadline:
            raise _WaitedTooLong(f"another lht process ({who}) was still building it after {wait_s:g} s; "
                                 "raise LHT_KERNEL_WAIT to wait longer")
        if who != announced:
            report(f"another lht process is building the kernel ({who}), waiting… "
                   f"(up to {wait_s:g} s, LHT_KERNEL_WAIT)", waiting=True)
            announced = who
        time.sleep(0.2)


def _report_waits_to_stderr(message: str, waiting: bool = False) -> None:
    if waiting:  # never wait silently, even where nobody shows a status
        print(message, file=sys.stderr, flush=True)


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, _WaitedTooLong):
        return str(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"


def _load(report: Report, force: bool = False, verbose: bool = False) -> tuple[Any, str | None]:
    """(module, None), or (None, why not); exceptions other than interrupts become the reason."""
    reason = _why_unsupported()
    if reason is not None:
        return None, reason
    try:
        with _signals_clean_up():
            module = _obtain(_build_name(), report, force=force, verbose=verbose)
    except Exception as exc:  # no compiler, no ninja, a read-only cache, a build that never ends elsewhere
        return None, _describe_failure(exc)
    if os.environ.get(TEST_SOURCES_ENV):
        return None, STAND_IN_REASON
    return module, None


def band_kernel(report: Report | None = None):
    """The compiled module (``band_forward``, ``band_backward``), or None where it cannot be had."""
    if "module" in _STATE:
        return _STATE["module"]
    with _LOCK:
        if "module" in _STATE:
            return _STATE["module"]
        module, reason = _load(report or _report_waits_to_stderr)
        if module is None and reason is not None and _why_unsupported() is None:
            warnings.warn(
                f"ML-SWA native CPU kernel unavailable ({reason}); using the slower flash kernel path. "
                "Set LHT_NATIVE_KERNEL=0 to skip the build.",
                RuntimeWarning,
                stacklevel=2,
            )
        _STATE["module"], _STATE["reason"] = module, reason
        return module


def build(report: Report, force: bool = False, verbose: bool = False) -> str | None:
    """Build (or with ``force`` rebuild) the kernel now, for ``lht kernels build``; returns why it failed."""
    with _LOCK:
        _STATE.clear()
        module, reason = _load(report, force=force, verbose=verbose)
        _STATE["module"], _STATE["reason"] = module, reason
    return None if reason == STAND_IN_REASON else reason


@contextlib.contextmanager
def _status_reporter(status) -> Iterator[Report]:
    """A report callback that shows each message in ``status(message)`` (e.g. Rich's ``console.status``),
    updating the open one where it can. Where that console cannot animate (a log file, a pipe) the
    messages are printed as lines instead; where it is quiet, waiting is still said on stderr."""
    console = getattr(status, "__self__", None)
    quiet = bool(getattr(console, "quiet", False))
    plain = console is not None and not getattr(console, "is_terminal", True)
    with contextlib.ExitStack() as stack:
        shown: dict[str, Any] = {}

        def report(message: str, waiting: bool = False) -> None:
            if quiet:
                _report_waits_to_stderr(message, waiting)
                return
            if plain:
                console.print(message, highlight=False, soft_wrap=True)
                return
            current = shown.get("status")
            if current is not None and hasattr(current, "update"):
                current.update(message)
                return
            stack.close()
            shown["status"] = stack.enter_context(status(message))

        yield report


def warm_up(status) -> str | None:
    """Load the kernel now (building it, or waiting for another process's build, under
    ``status(message)``, a context manager such as Rich's ``console.status``, when it is not cached);
    returns why it is unavailable, or None."""
    with _status_reporter(status) as report, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reason is returned instead
        band_kernel(report)
    reason = unavailable_reason()
    return None if reason is None or reason.startswith("disabled") else reason


def unavailable_reason() -> str | None:
    """Why :func:`band_kernel` returned None (after it has been called), else None."""
    return _STATE.get("reason")


def reset() -> None:
    """Forget the loaded module so that the next call decides again (tests switch it off and on)."""
    _STATE.clear()


# ----------------------------------------------------------------------------- lht kernels status / clean


def inventory() -> dict[str, Any]:
    """Everything ``lht kernels status`` shows, as plain data (also its ``--json``)."""
    cache = cache_dir()
    reason = _why_unsupported()
    info: dict[str, Any] = {"supported": reason is None, "reason": reason, "cache_dir": str(cache)}
    try:
        name = _build_name()
    except Exception as exc:  # (sources missing from a broken install)
        name, info["reason"] = None, info["reason"] or _describe_failure(exc)
    info["build_name"] = name
    info["build_hash"] = name[len(kernel_cache.PREFIX):] if name else None
    library = _built_library(name) if name else None
    complete = bool(name) and _is_complete(name)
    info["built"] = complete
    info["library"] = str(library) if complete else None
    info["size_bytes"] = library.stat().st_size if complete else None
    meta = kernel_cache.build_info(cache, name) if complete else {}
    info["built_at"] = meta.get("built_at") or (library.stat().st_mtime if complete else None)
    info["build_seconds"] = meta.get("build_seconds")
    info["torch"] = meta.get("torch")
    locks = []
    for path in kernel_cache.lock_files(cache):
        state = kernel_cache.probe_lock(path)
        if state is None:
            continue
        owner = state.owner
        locks.append({"path": str(path), "held": state.held, "pid": owner.pid if owner else None,
                      "host": owner.host if owner else None, "started": owner.started if owner else None})
    info["locks"] = locks
    temps = []
    for path in kernel_cache.temp_dirs(cache):
        owner = kernel_cache.temp_dir_owner(path)
        temps.append({"path": str(path), "pid": owner.pid if owner else None,
                      "abandoned": kernel_cache.temp_dir_abandoned(path)})
    info["temp_dirs"] = temps
    info["legacy_locks"] = [
        {"path": str(d / kernel_cache.LEGACY_LOCK), "running": kernel_cache.legacy_build_running(d)}
        for d in kernel_cache.builds(cache) if (d / kernel_cache.LEGACY_LOCK).exists()
    ]
    info["other_builds"] = [d.name for d in kernel_cache.builds(cache) if d.name != name]
    return info


def clean() -> tuple[list[Path], list[str]]:
    """Remove every build, abandoned temporary directory and stale lock; never what a live build uses.
    Returns (removed paths, what was kept and why)."""
    cache = cache_dir()
    removed: list[Path] = []
    kept: list[str] = []
    for path in kernel_cache.lock_files(cache):
        lock = OwnedLock(path)
        try:
            taken = lock.try_acquire()
        except OSError:
            taken = False
        if taken:  # nobody held it: release() removes the file while we hold it (no race with a new build)
            lock.release()
            removed.append(path)
        else:
            state = kernel_cache.probe_lock(path)
            who = state.owner.describe() if state is not None and state.owner else "another process"
            kept.append(f"{path} (a build by {who} is running)")
    removed += kernel_cache.remove_abandoned_temp_dirs(cache)
    for path in kernel_cache.temp_dirs(cache):
        if not kernel_cache.temp_dir_abandoned(path):
            owner = kernel_cache.temp_dir_owner(path)
            kept.append(f"{path} (build in progress by {owner.describe() if owner else 'another process'})")
    import shutil

    for build_dir in kernel_cache.builds(cache):
        if _being_built(build_dir):
            kept.append(f"{build_dir} (being built)")
            continue
        try:
            shutil.rmtree(build_dir)
            removed.append(build_dir)
        except OSError as exc:
            kept.append(f"{build_dir} ({exc.strerror or exc})")
    reset()
    return removed, kept
