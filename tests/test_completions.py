"""Shell completion: typer's --show-completion, the committed scripts, and real Tab-time answers."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lhtcli.cli import app

REPO = Path(__file__).resolve().parent.parent
SHELLS = ["bash", "zsh", "fish"]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_completions", REPO / "scripts" / "generate_completions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shell", SHELLS)
def test_committed_scripts_are_up_to_date(shell):
    expected = _generator().render(shell)
    path = REPO / "completions" / f"lht.{shell}"
    assert path.is_file() and path.read_text(encoding="utf-8") == expected, (
        f"{path.relative_to(REPO)} is out of date: run `python scripts/generate_completions.py`"
    )


def test_zsh_script_starts_with_compdef():
    assert (REPO / "completions" / "lht.zsh").read_text().splitlines()[0] == "#compdef lht"


@pytest.mark.parametrize("shell", SHELLS)
def test_scripts_use_the_lht_protocol(shell):
    text = (REPO / "completions" / f"lht.{shell}").read_text()
    assert f"_LHT_COMPLETE=complete_{shell}" in text


@pytest.mark.parametrize("shell", SHELLS)
def test_show_completion(shell, monkeypatch):
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    result = CliRunner().invoke(app, ["--show-completion", shell], prog_name="lht")
    assert result.exit_code == 0, result.output
    assert f"_LHT_COMPLETE=complete_{shell}" in result.output
    committed = [line for line in _generator().render(shell).splitlines() if not line.startswith("# ")]
    assert [line for line in result.output.splitlines() if line.strip()] == [line for line in committed if line.strip()]


def test_install_completion_is_offered():
    result = CliRunner().invoke(app, ["--help"], prog_name="lht", env={"COLUMNS": "200"})
    assert "--install-completion" in result.output and "--show-completion" in result.output


def _complete(lht_cmd, env, words: str) -> list[str]:
    parts = words.split(" ")
    env = {**env, "_LHT_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(parts) - 1)}
    proc = subprocess.run(lht_cmd, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_tab_completes_commands_and_options(lht_cmd, subprocess_env):
    assert _complete(lht_cmd, subprocess_env, "lht tr") == ["train"]
    assert _complete(lht_cmd, subprocess_env, "lht train --con") == ["--config"]
    assert _complete(lht_cmd, subprocess_env, "lht train --device ") == ["auto", "cpu", "cuda"]
    assert _complete(lht_cmd, subprocess_env, "lht config v") == ["validate"]
    # Path options answer nothing, so the shell falls back to file-name completion.
    assert _complete(lht_cmd, subprocess_env, "lht train --config co") == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_script_end_to_end(lht_cmd, subprocess_env):
    bin_dir = str(Path(lht_cmd[0]).parent) if len(lht_cmd) == 1 else None
    if bin_dir is None:
        pytest.skip("needs the installed lht script")
    env = {**subprocess_env, "PATH": f"{bin_dir}:{subprocess_env.get('PATH', '')}"}
    script = (
        f"source {REPO / 'completions' / 'lht.bash'}\n"
        "COMP_WORDS=(lht visualize --log-to ''); COMP_CWORD=3; _lht_completion lht\n"
        'echo "${COMPREPLY[*]}"\n'
    )
    proc = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tensorboard", "wandb"]
