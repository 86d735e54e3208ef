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
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

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


def _build_name() -> str:
    import torch

    key = hashlib.sha256()
    for source in (*_SOURCES, *_HEADERS):
        key.update(source.read_bytes())
    key.update(torch.__version__.encode())
    key.update(" ".join(sorted(_cpu_flags())).encode())  # -march=native code is only valid on this CPU
    return f"lht_band_{key.hexdigest()[:16]}"


def _built_library(name: str) -> Path:
    return cache_dir() / name / f"{name}.so"


def is_built() -> bool:
    """True when this source, torch and CPU already have a compiled module in the cache."""
    return _why_unsupported() is None and _built_library(_build_name()).exists()


def ready() -> bool:
    """True when the kernel is loaded or already built (this starts no build; checked once)."""
    if "module" in _STATE:
        return _STATE["module"] is not None
    if "built" not in _STATE:
        _STATE["built"] = is_built()
    return _STATE["built"]


KEEP_BUILDS = 4  # newest builds kept in the cache (other torch versions or lhtcli checkouts may share it)


def _mark_used(name: str) -> None:
    """Refresh a build's modification time when it is loaded, so that pruning keeps the builds in use."""
    try:
        os.utime(cache_dir() / name)
    except OSError:
        pass  # (a read-only cache: nothing is pruned there either)


def prune_builds(current: str, keep: int = KEEP_BUILDS) -> list[Path]:
    """Remove all but the ``keep`` most recently used kernel builds (the current one always stays, and so
    does any being built: it has a ``lock``). Each source change builds a new ~3 MB module; without this
    they would pile up. Returns what was removed; errors leave a build in place."""
    import shutil

    try:
        builds = [d for d in cache_dir().glob("lht_band_*") if d.is_dir() and d.name != current]
        builds.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    except OSError:
        return []
    removed = []
    for old in builds[max(keep - 1, 0) :]:
        if (old / "lock").exists():
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


def band_kernel():
    """The compiled module (``band_forward``, ``band_backward``), or None where it cannot be had."""
    if "module" in _STATE:
        return _STATE["module"]
    with _LOCK:
        if "module" in _STATE:
            return _STATE["module"]
        module = None
        reason = _why_unsupported()
        if reason is None:
            try:
                name = _build_name()
                if _built_library(name).exists() and not (cache_dir() / name / "lock").exists():
                    module = _import_built(name)  # (a "lock" means another process is building it now)
                    _mark_used(name)
                else:
                    from torch.utils.cpp_extension import load

                    build = cache_dir() / name
                    build.mkdir(parents=True, exist_ok=True)
                    module = load(
                        name,
                        [str(source) for source in _SOURCES],
                        extra_cflags=["-O3", "-march=native", "-mavx2", "-mfma", "-fopenmp"],
                        extra_ldflags=["-fopenmp"],
                        build_directory=str(build),
                        verbose=False,
                    )
                    prune_builds(name)
            except Exception as exc:  # no compiler, no ninja, a read-only cache...: the flash path works
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                warnings.warn(
                    f"ML-SWA native CPU kernel unavailable ({reason}); using the slower flash kernel path. "
                    "Set LHT_NATIVE_KERNEL=0 to skip the build.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _STATE["module"], _STATE["reason"] = module, reason
        return module


def warm_up(status) -> str | None:
    """Load the kernel now (building it under ``status(message)``, a context manager such as Rich's
    ``console.status``, when it is not cached); returns why it is unavailable, or None."""
    building = "module" not in _STATE and _why_unsupported() is None and not is_built()
    with (
        status("building the ML-SWA CPU kernel (once per machine, under a minute)") if building else nullcontext(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", RuntimeWarning)  # the reason is returned instead
        band_kernel()
    reason = unavailable_reason()
    return None if reason is None or reason.startswith("disabled") else reason


def unavailable_reason() -> str | None:
    """Why :func:`band_kernel` returned None (after it has been called), else None."""
    return _STATE.get("reason")


def reset() -> None:
    """Forget the loaded module so that the next call decides again (tests switch it off and on)."""
    _STATE.clear()
