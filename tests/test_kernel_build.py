"""The native kernel's build never leaves a state that blocks a later run (issue 18), and ``lht kernels``.

Builds compile a tiny stand-in module (tests/kernel_helpers.py) in a private LHT_KERNEL_CACHE, so each
takes about a second; one slow test kills a real build.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kernel_helpers import (
    buildable,
    ctrl_c_reaches_child,
    kernel_env,
    leftovers,
    recording_status,
    wait_for_compiler,
    write_stand_in,
)

from lhtcli.cli import main
from lhtcli.core import kernel_cache, native
from lhtcli.core.kernel_cache import OwnedLock, Owner

pytestmark = [
    pytest.mark.skipif(buildable() is not None, reason=f"cannot compile here: {buildable()}"),
    pytest.mark.filterwarnings("ignore:ML-SWA native CPU kernel unavailable:RuntimeWarning"),
]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private kernel cache with the quick stand-in sources; the loaded-module state is reset around."""
    root = tmp_path / "kernels"
    monkeypatch.setenv("LHT_KERNEL_CACHE", str(root))
    monkeypatch.setenv(native.TEST_SOURCES_ENV, str(write_stand_in(tmp_path)))
    native.reset()
    yield root
    native.reset()


def _recorder(messages: list[str]):
    def report(message: str, waiting: bool = False) -> None:
        messages.append(message)

    return report


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _stale_lock(cache: Path, name: str, pid: int, started: float | None = None) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    path = kernel_cache.lock_path(cache, name)
    path.write_text(Owner(pid, Owner.me().host, started or time.time()).dump())
    return path


@contextlib.contextmanager
def _held(cache: Path, name: str, started: float | None = None):
    """Hold the build lock as another process would (flock conflicts between open files, even in one process)."""
    lock = OwnedLock(kernel_cache.lock_path(cache, name))
    assert lock.try_acquire()
    if started is not None:
        os.ftruncate(lock.fd, 0)
        os.pwrite(lock.fd, Owner(os.getpid(), Owner.me().host, started).dump().encode(), 0)
    try:
        yield lock
    finally:
        lock.release()


# ----------------------------------------------------------------------------- in-process: the build itself


def test_a_build_publishes_one_complete_module_and_leaves_no_lock_or_temp_dir(cache: Path):
    messages: list[str] = []
    native.band_kernel(_recorder(messages))
    assert native.unavailable_reason() == native.STAND_IN_REASON  # (built, published, never used)
    name = native._build_name()
    assert sorted(p.name for p in (cache / name).iterdir()) == ["build.json", f"{name}.so"]
    assert json.loads((cache / name / "build.json").read_text())["name"] == name
    assert leftovers(cache) == [] and native.is_built()
    assert messages == [native.BUILDING_MESSAGE]


def test_a_lock_and_temp_dir_left_by_a_killed_build_are_taken_over(cache: Path):
    name, pid = native._build_name(), _dead_pid()
    _stale_lock(cache, name, pid)
    debris = cache / f"{name}.tmp-{pid}-deadbeef"
    debris.mkdir()
    (debris / "owner.json").write_text(Owner(pid, Owner.me().host, time.time()).dump())
    (debris / "band_kernel.o").write_bytes(b"half an object file")
    messages: list[str] = []
    started = time.monotonic()
    native.band_kernel(_recorder(messages))
    assert time.monotonic() - started < 60
    assert native.is_built() and leftovers(cache) == []
    assert messages == [f"{native.BUILDING_MESSAGE}; the build of pid {pid} was interrupted"]


def test_a_live_build_elsewhere_is_waited_for_visibly_then_the_run_goes_on_with_one_warning(
        cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("LHT_KERNEL_WAIT", "1")
    name = native._build_name()
    with _held(cache, name):
        shown: list[str] = []
        started = time.monotonic()
        reason = native.warm_up(recording_status(shown))
        waited = time.monotonic() - started
        native.reset()
        with pytest.warns(RuntimeWarning) as caught:
            assert native.band_kernel() is None
    assert 1.0 <= waited < 30
    assert shown == [f"another lht process is building the kernel (pid {os.getpid()}), waiting… "
                     "(up to 1 s, LHT_KERNEL_WAIT)"]
    assert reason is not None and f"(pid {os.getpid()}) was still building it after 1 s" in reason
    assert len(caught) == 1 and "slower flash kernel path" in str(caught[0].message)
    err = capsys.readouterr().err  # with no status to show it in, the wait is said on stderr
    assert err.count("another lht process is building the kernel") == 1
    assert not native.is_built() and leftovers(cache) == []  # the holder's lock went with it


def test_a_module_published_while_waiting_is_loaded_without_building(cache: Path):
    native.band_kernel()
    name = native._build_name()
    library = native._built_library(name)
    aside = library.with_name("aside.so")
    library.rename(aside)
    native.reset()
    with _held(cache, name) as lock:
        def finish() -> None:  # the other process publishes its module and releases the lock
            time.sleep(0.6)
            aside.rename(library)
            lock.release()

        other = threading.Thread(target=finish)
        other.start()
        messages: list[str] = []
        module = native._obtain(name, _recorder(messages))
        other.join()
    assert module is not None and Path(module.__file__) == library
    assert len(messages) == 1 and messages[0].startswith("another lht process is building the kernel")


def test_a_lock_held_longer_than_the_stale_bound_is_built_around(cache: Path):
    name = native._build_name()
    with _held(cache, name, started=time.time() - 7200):
        messages: list[str] = []
        native.band_kernel(_recorder(messages))
        assert native.is_built()
    assert "has held its lock for 120 min (LHT_KERNEL_STALE); building separately" in messages[0]
    assert leftovers(cache) == []


def test_ctrl_c_during_the_build_leaves_nothing_behind(cache: Path, monkeypatch: pytest.MonkeyPatch):
    import torch.utils.cpp_extension as cpp

    real_load, seen = cpp.load, {}

    def interrupted(name, sources, build_directory, **kwargs):
        seen["dir"] = Path(build_directory)
        (seen["dir"] / "band_kernel.o").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cpp, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        native.band_kernel()
    assert not seen["dir"].exists() and leftovers(cache) == [] and not native.is_built()
    assert native.unavailable_reason() is None  # nothing decided: the next call builds
    monkeypatch.setattr(cpp, "load", real_load)
    native.band_kernel()
    assert native.is_built() and leftovers(cache) == []


def test_an_old_torch_lock_without_a_running_build_is_ignored_and_replaced(cache: Path):
    """Older lht versions built inside the cache directory under torch's ``lock``, left there by a kill."""
    name = native._build_name()
    old = cache / name
    old.mkdir(parents=True)
    (old / "lock").write_text("")
    (old / f"{name}.so").write_bytes(b"\x7fELF half-linked")  # the kill landed inside the link
    os.utime(old / "lock", (time.time() - 600, time.time() - 600))
    assert not native.is_built()
    native.band_kernel()
    assert native.is_built() and not (old / "lock").exists()
    assert (old / f"{name}.so").read_bytes()[:4] == b"\x7fELF" and (old / f"{name}.so").stat().st_size > 1000


def test_an_old_torch_lock_of_a_running_older_lht_is_waited_for(cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LHT_KERNEL_WAIT", "0.5")
    name = native._build_name()
    old = cache / name
    old.mkdir(parents=True)
    (old / "lock").write_text("")
    os.utime(old / "lock", (time.time() - 600, time.time() - 600))
    ninja = subprocess.Popen(["sleep", "30"], cwd=old)  # what an older lht's ninja looks like
    try:
        messages: list[str] = []
        native.band_kernel(_recorder(messages))
    finally:
        ninja.kill()
        ninja.wait()
    assert messages[0].startswith(f"another lht process is building the kernel (an older lht version, in {old})")
    assert "was still building it after 0.5 s" in native.unavailable_reason()


def test_a_damaged_cached_module_is_rebuilt(cache: Path):
    native.band_kernel()
    library = native._built_library(native._build_name())
    library.unlink()  # (never overwrite a loaded module in place: this process has it mapped)
    library.write_bytes(b"not a shared object")
    native.reset()
    messages: list[str] = []
    native.band_kernel(_recorder(messages))
    assert "could not be loaded" in messages[0] and "rebuilding" in messages[0]
    assert library.read_bytes()[:4] == b"\x7fELF" and leftovers(cache) == []


def test_pruning_ignores_temporary_directories_and_keeps_builds_under_a_live_lock(cache: Path):
    for age, name in enumerate(["lht_band_a", "lht_band_b", "lht_band_c"]):
        (cache / name).mkdir(parents=True)
        os.utime(cache / name, (1e9 - age, 1e9 - age))
    (cache / "lht_band_x.tmp-1-abcd").mkdir()
    with _held(cache, "lht_band_c"):
        removed = native.prune_builds("lht_band_current", keep=1)
    assert sorted(p.name for p in removed) == ["lht_band_a", "lht_band_b"]
    assert sorted(p.name for p in cache.iterdir()) == ["lht_band_c", "lht_band_x.tmp-1-abcd"]


# ----------------------------------------------------------------------------- lht kernels


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_kernels_status_build_and_clean(cache: Path, capsys: pytest.CaptureFixture[str]):
    code, out, _ = _cli(["kernels", "status", "--json"], capsys)
    before = json.loads(out)
    assert code == 0 and before["supported"] and not before["built"] and before["cache_dir"] == str(cache)
    assert before["build_name"] == native._build_name() == f"lht_band_{before['build_hash']}"

    code, out, err = _cli(["kernels", "build"], capsys)
    assert code == 0 and "native kernel ready" in out, err
    code, out, _ = _cli(["kernels", "status", "--json"], capsys)
    after = json.loads(out)
    library = native._built_library(after["build_name"])
    assert after["built"] and after["library"] == str(library) and after["size_bytes"] == library.stat().st_size
    assert after["build_seconds"] is not None and after["locks"] == [] and after["temp_dirs"] == []

    pid = _dead_pid()  # a killed build's lock and temporary directory, and a live build of another version
    _stale_lock(cache, after["build_name"], pid)
    debris = cache / f"{after['build_name']}.tmp-{pid}-0123abcd"
    debris.mkdir()
    (debris / "owner.json").write_text(Owner(pid, Owner.me().host, time.time()).dump())
    with _held(cache, "lht_band_othersources"):
        code, out, _ = _cli(["kernels", "status"], capsys)
        assert code == 0 and f"built:       yes, {library}" in out
        assert f"pid {pid}" in out and "stale (its build was interrupted" in out and "abandoned" in out
        assert f"pid {os.getpid()}" in out and "building now" in out
        code, out, _ = _cli(["kernels", "clean"], capsys)
        assert code == 0
        assert f"removed {kernel_cache.lock_path(cache, after['build_name'])}" in out
        assert f"removed {debris}" in out and f"removed {library.parent}" in out
        assert "kept" in out and "lht_band_othersources.lock" in out and "is running" in out
        assert sorted(p.name for p in cache.iterdir()) == ["lht_band_othersources.lock"]  # the live one stays
    code, out, _ = _cli(["kernels", "clean"], capsys)
    assert code == 0 and out.strip() == f"nothing to remove in {cache}"


def test_kernels_build_rebuilds_with_force(cache: Path, capsys: pytest.CaptureFixture[str]):
    assert _cli(["kernels", "build"], capsys)[0] == 0
    library = native._built_library(native._build_name())
    os.utime(library, (1e9, 1e9))
    code, out, _ = _cli(["kernels", "build"], capsys)
    assert code == 0 and library.stat().st_mtime == 1e9  # cached: nothing rebuilt
    code, out, _ = _cli(["kernels", "build", "--force"], capsys)
    assert code == 0 and library.stat().st_mtime > 1e9 and leftovers(cache) == []


@pytest.mark.parametrize("why", ["disabled", "compiler-fails"])
def test_kernels_build_failure_is_one_error_line(why: str, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]):
    if why == "disabled":
        monkeypatch.setenv("LHT_NATIVE_KERNEL", "0")
        expected = "cannot be built here: disabled by LHT_NATIVE_KERNEL"
    else:
        import torch.utils.cpp_extension as cpp

        def broken(*args, **kwargs):
            raise RuntimeError("Error building extension 'lht_band'\nband_kernel.cpp:1: error: expected ';'")

        monkeypatch.setattr(cpp, "load", broken)
        expected = "did not build: RuntimeError: band_kernel.cpp:1: error: expected ';'"
    code, out, err = _cli(["kernels", "build"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and lines[-1].startswith("error: ") and expected in lines[-1], err
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err
    assert leftovers(cache) == [] and not native.is_built()


# ----------------------------------------------------------------------------- subprocesses: signals, concurrency


@pytest.fixture
def kenv(subprocess_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A private cache and a stand-in whose compile keeps g++ busy for a second or more."""
    return kernel_env({**subprocess_env, "PYTHONUNBUFFERED": "1"}, tmp_path / "kernels",
                      write_stand_in(tmp_path, spin=6, name="slow_stand_in.cpp"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_compile_exits_cleanly_and_leaves_nothing(sig: signal.Signals, kenv: dict[str, str],
                                                                      lht_cmd: list[str]):
    cache = Path(kenv["LHT_KERNEL_CACHE"])
    proc = subprocess.Popen([*lht_cmd, "kernels", "build"], env=kenv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_reaches_child)
    try:
        assert wait_for_compiler(cache, 60, proc) is not None, proc.communicate()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    expected = 130 if sig == signal.SIGINT else -sig  # Ctrl-C: lht's exit 130; others: the signal's own death
    assert proc.returncode == expected, err
    assert "Traceback" not in err
    if sig == signal.SIGINT:
        assert err.strip().splitlines()[-1] == "interrupted (Ctrl-C)"
    assert leftovers(cache) == []
    status = subprocess.run([*lht_cmd, "kernels", "status", "--json"], env=kenv, capture_output=True, text=True,
                            timeout=60)
    info = json.loads(status.stdout)
    assert not info["built"] and info["locks"] == [] and info["temp_dirs"] == []


def test_two_processes_build_once_the_other_waits_visibly(kenv: dict[str, str], lht_cmd: list[str]):
    cache = Path(kenv["LHT_KERNEL_CACHE"])
    procs = [subprocess.Popen([*lht_cmd, "kernels", "build"], env=kenv, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [proc.communicate(timeout=180) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0], results
    errs = [err for _, err in results]
    builder = 0 if "building the ML-SWA CPU kernel" in errs[0] else 1
    waiter = 1 - builder
    assert "building the ML-SWA CPU kernel" not in errs[waiter]  # it loaded what the other one built
    assert f"another lht process is building the kernel (pid {procs[builder].pid}), waiting…" in errs[waiter]
    assert leftovers(cache) == [] and len(list(cache.glob("lht_band_*/*.so"))) == 1


def test_compilers_orphaned_by_a_killed_build_are_stopped_with_its_directory(tmp_path: Path):
    pid = _dead_pid()
    debris = tmp_path / f"lht_band_x.tmp-{pid}-0123abcd"
    debris.mkdir()
    (debris / "owner.json").write_text(Owner(pid, Owner.me().host, time.time()).dump())
    orphan = subprocess.Popen(["sleep", "60"], cwd=debris)  # a g++ that outlived its ninja
    try:
        assert kernel_cache.remove_abandoned_temp_dirs(tmp_path) == [debris]
        assert orphan.wait(timeout=10) == -signal.SIGTERM
    finally:
        orphan.kill()
        orphan.wait()
    assert not debris.exists()


@pytest.mark.slow
def test_sigkill_during_a_real_build_then_the_next_run_builds_at_once(subprocess_env: dict[str, str], tmp_path: Path,
                                                                      lht_cmd: list[str]):
    """The issue's reproduction with the real sources: after kill -9 the next build starts immediately
    (no wait on the dead build's lock); Ctrl-C stops that one and leaves the cache clean."""
    env = kernel_env({**subprocess_env, "PYTHONUNBUFFERED": "1"}, tmp_path / "kernels", None)
    cache = tmp_path / "kernels"
    killed = subprocess.Popen([*lht_cmd, "kernels", "build"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        assert wait_for_compiler(cache, 60, killed) is not None
        time.sleep(random.uniform(0.5, 3.0))
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        killed.kill()
        killed.wait()
    assert leftovers(cache)  # its lock file and temporary directory stay behind: nobody could remove them
    started = time.monotonic()
    proc = subprocess.Popen([*lht_cmd, "kernels", "build"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=ctrl_c_reaches_child)
    try:
        assert wait_for_compiler(cache, 60, proc) is not None
        assert time.monotonic() - started < 60
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and "waiting" not in err and "was interrupted" in err, err
    assert leftovers(cache) == []


def test_kernel_modules_stay_out_of_the_cli_import_path():
    code = ("import sys, lhtcli.cli, lhtcli.commands.kernels; "
            "print(sorted(m for m in ('torch', 'lhtcli.core.native') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
