"""A tiny stand-in for the native module, so that tests can build (and kill builds) in a second or two.

``_LHT_KERNEL_TEST_SOURCES`` (lhtcli/core/native.py) swaps the real sources for these; the module that
comes out is published like the real one but never used. ``spin`` makes g++ itself busy for a while
(a constexpr loop), so that a signal can land while the compiler really runs.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from pathlib import Path

from lhtcli.core import native

STAND_IN = r"""// A stand-in for lht's native module in tests: an empty Python module.
#include <Python.h>
#define LHT_CAT2(a, b) a##b
#define LHT_CAT(a, b) LHT_CAT2(a, b)
constexpr unsigned spin(unsigned n) {
  unsigned x = 1;
  for (unsigned j = 0; j < n; ++j)
    for (unsigned i = 0; i < 200000u; ++i) x = x * 1664525u + 1013904223u;
  return x;
}
constexpr unsigned kSpun = spin(SPIN);
static struct PyModuleDef lht_stand_in = {PyModuleDef_HEAD_INIT, "lht_stand_in", nullptr, -1, nullptr};
PyMODINIT_FUNC LHT_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&lht_stand_in); }
"""


def write_stand_in(directory: Path, spin: int = 0, name: str = "stand_in.cpp") -> Path:
    path = directory / name
    path.write_text(STAND_IN.replace("SPIN", str(spin)))
    return path


def buildable() -> str | None:
    """Why nothing can be compiled here (None: g++ and ninja are present and the CPU is supported)."""
    reason = native._why_unsupported()
    if reason is not None:
        return reason
    missing = [tool for tool in ("g++", "ninja") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not found" if missing else None


def leftovers(cache: Path) -> list[str]:
    """Lock files and temporary build directories in a kernel cache (a clean cache has none)."""
    if not cache.is_dir():
        return []
    return sorted(p.name for p in cache.iterdir() if p.name.endswith(".lock") or ".tmp-" in p.name)


def kernel_env(env: dict[str, str], cache: Path, stand_in: Path | None) -> dict[str, str]:
    extra = {"LHT_KERNEL_CACHE": str(cache)}
    if stand_in is not None:
        extra[native.TEST_SOURCES_ENV] = str(stand_in)
    return {**env, **extra}


def wait_for_compiler(cache: Path, timeout: float, proc=None) -> Path | None:
    """The temporary build directory of ``proc`` (any process when None) once ninja runs in it (its
    build.ninja exists), or None."""
    end = time.monotonic() + timeout
    pattern = f"*.tmp-{proc.pid}-*" if proc is not None else "*.tmp-*"
    while time.monotonic() < end:
        for temp in cache.glob(pattern) if cache.is_dir() else []:
            if (temp / "build.ninja").exists():
                return temp
        if proc is not None and proc.poll() is not None:
            return None
        time.sleep(0.02)
    return None


def recording_status(shown: list[str]):
    """A stand-in for Rich's ``console.status`` that records each message shown."""

    @contextlib.contextmanager
    def status(message: str):
        shown.append(message)
        yield

    return status


def ctrl_c_reaches_child() -> None:
    """``preexec_fn`` of a child that a test will Ctrl-C: a shell starts background jobs with SIGINT
    ignored, and Python keeps an ignored SIGINT ignored, so a suite run from ``cmd &`` or ``nohup``
    would send a Ctrl-C the child never sees."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
