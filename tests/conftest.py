"""Shared fixtures and marker handling for the lht test suite.

- Every test runs without ``LHT_*`` environment variables (a developer's shell must not change results).
- ``in_tmp``: run a test inside its own temporary working directory.
- ``write_config``: write a YAML config file from a dict.
- ``lht_cmd``: the argv prefix that runs the installed ``lht`` entry point in a subprocess.
- Tests marked ``cuda`` are skipped when torch sees no CUDA device.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch  # only when some selected test needs it: keeps CLI-only runs light

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in cuda_items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def clean_lht_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every LHT_* / _LHT_* variable (config overrides, LHT_DEBUG, completion requests)."""
    for name in list(os.environ):
        if name.startswith(("LHT_", "_LHT_")):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """chdir into a fresh temporary directory (runs/, checkpoints/ ... land there) and return it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """``write_config({"training": {"num_steps": 3}}, name="x.yaml")`` -> path of the written YAML."""
    import yaml

    def write(data: dict[str, Any] | str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def lht_cmd() -> list[str]:
    """argv prefix for the real entry point: the venv's ``lht`` script, else ``python -m lhtcli``."""
    script = Path(sys.executable).parent / "lht"
    if script.is_file():
        return [str(script)]
    found = shutil.which("lht")
    return [found] if found else [sys.executable, "-m", "lhtcli"]


@pytest.fixture
def subprocess_env() -> Iterator[dict[str, str]]:
    """A copy of the environment for subprocesses: no LHT_* variables, no colour, wide terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LHT_", "_LHT_"))}
    env.update({"NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb"})
    env.pop("FORCE_COLOR", None)
    yield env


@pytest.fixture(scope="module")
def kernel():
    """The compiled native module (lhtcli/core/native.py); a failure where g++ and ninja could build it,
    a skip where they cannot."""
    from lhtcli.core import native

    native.reset()
    module = native.band_kernel()
    if module is None:
        buildable = native._why_unsupported() is None and shutil.which("g++") and shutil.which("ninja")
        if buildable:
            pytest.fail(f"the native kernel should build here: {native.unavailable_reason()}")
        pytest.skip(f"native kernel unavailable here: {native.unavailable_reason()}")
    return module
