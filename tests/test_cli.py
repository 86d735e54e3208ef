"""The lht command line: entry point, help, error mapping, lht train wiring, lht config, docs."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from lhtcli import __version__
from lhtcli.cli import app, main
from lhtcli.config import LHTConfig, default_config_path, load_config
from lhtcli.errors import DataError

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
COMMANDS = ["train", "visualize", "entropy", "map", "gradcheck", "demo", "export"]
HEAVY = ["torch", "wandb", "matplotlib", "tensorboard", "tokenizers", "numpy", "pydantic", "safetensors", "datasets",
         "transformers", "pyarrow"]


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the console-script entry point in-process: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fake_trainer(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Stand-in for lhtcli.training.trainer (the real one imports torch and trains)."""
    calls: list[dict] = []
    module = types.ModuleType("lhtcli.training.trainer")

    def run_training(cfg, *, resume=None, quiet=False):
        calls.append({"cfg": cfg, "resume": resume, "quiet": quiet})

    module.run_training = run_training
    monkeypatch.setitem(sys.modules, "lhtcli.training.trainer", module)
    return calls


# --- entry point and import weight ---------------------------------------------------------------


def test_cli_import_is_light():
    code = (
        "import sys, lhtcli.cli\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "assert not heavy, f'lhtcli.cli imported {heavy}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)


def test_help_subprocess_is_fast(lht_cmd, subprocess_env):
    start = time.perf_counter()
    proc = subprocess.run([*lht_cmd, "--help"], capture_output=True, text=True, env=subprocess_env, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    for text in ["ML-SWA", "Training", "Inspection", "Getting started", *COMMANDS, "config"]:
        assert text in proc.stdout
    assert elapsed < 3.0, f"lht --help took {elapsed:.2f}s; keep heavy imports out of the CLI import path"


def test_python_dash_m_entry_point(subprocess_env):
    proc = subprocess.run(
        [sys.executable, "-m", "lhtcli", "--version"], capture_output=True, text=True, env=subprocess_env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"lht {__version__}"


def test_version(capsys):
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"lht {__version__}"


def test_no_arguments_shows_help(capsys):
    code, out, err = run_main([], capsys)
    assert code in (0, 2)
    assert "Usage" in out + err and "train" in out + err


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_has_examples(name):
    result = runner.invoke(app, [name, "--help"], prog_name="lht", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "examples:" in result.output
    assert f"lht {name}" in result.output


def test_panels_group_commands():
    from typer.main import get_command

    group = get_command(app)
    panels = {name: getattr(cmd, "rich_help_panel", None) for name, cmd in group.commands.items()}
    assert panels == {
        "train": "Training",
        "config": "Training",
        "kernels": "Setup",
        "visualize": "Inspection",
        "entropy": "Inspection",
        "map": "Inspection",
        "gradcheck": "Inspection",
        "demo": "Getting started",
        "export": "Sharing",
    }


# --- error mapping -------------------------------------------------------------------------------


def test_user_error_is_one_line_exit_2(capsys, tmp_path):
    code, out, err = run_main(["train", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2
    assert err.startswith("error: config file not found")
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err + out


def test_debug_flag_shows_traceback(capsys, tmp_path):
    code, _, err = run_main(["--debug", "train", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2
    assert "Traceback" in err and "ConfigError" in err
    assert err.rstrip().splitlines()[-1].startswith("error: config file not found")


def test_debug_env_var_shows_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LHT_DEBUG", "1")
    code, _, err = run_main(["train", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2
    assert "Traceback" in err


def test_every_lht_error_subclass_maps_to_exit_2(capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise DataError("corpus.jsonl line 3: expected a list of sections")

    monkeypatch.setitem(sys.modules, "lhtcli.training.trainer", types.SimpleNamespace(run_training=boom))
    code, _, err = run_main(["train", "--set", "training.num_steps=1"], capsys)
    assert (code, err.strip()) == (2, "error: corpus.jsonl line 3: expected a list of sections")


def test_keyboard_interrupt_exits_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "lhtcli.training.trainer", types.SimpleNamespace(run_training=interrupted))
    code, _, err = run_main(["train"], capsys)
    assert code == 130
    assert "interrupted" in err and "Traceback" not in err


def test_usage_error_keeps_click_exit_code(capsys):
    code, _, err = run_main(["train", "--device", "gpu"], capsys)
    assert code == 2
    assert "gpu" in err and "Traceback" not in err
    code, _, err = run_main(["trian"], capsys)
    assert code == 2


def test_subprocess_error_has_no_traceback(lht_cmd, subprocess_env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 100\n  n_heads: 3\n")
    proc = subprocess.run(
        [*lht_cmd, "train", "--config", str(bad)], capture_output=True, text=True, env=subprocess_env, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: invalid configuration")
    assert "d_model (100) must be a multiple of n_heads (3)" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- lht train -----------------------------------------------------------------------------------


def test_train_defaults_to_packaged_config(fake_trainer, in_tmp):
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    (call,) = fake_trainer
    assert isinstance(call["cfg"], LHTConfig)
    assert call["cfg"] == load_config(default_config_path())
    assert call["cfg"].experiment_name == "lht_default"
    assert (call["resume"], call["quiet"]) == (None, False)


def test_train_flags_reach_the_config(fake_trainer, in_tmp, write_config):
    path = write_config({"training": {"num_steps": 7}, "device": "cpu"})
    result = runner.invoke(
        app,
        ["train", "-c", str(path), "--set", "training.batch_size=2", "--set", "seed=3", "-q",
         "--device", "cuda", "--time-limit", "1.5", "--resume", "auto"],
    )
    assert result.exit_code == 0, result.output
    (call,) = fake_trainer
    cfg = call["cfg"]
    assert (cfg.training.num_steps, cfg.training.batch_size, cfg.seed) == (7, 2, 3)
    assert cfg.device == "cuda"
    assert cfg.training.time_limit_minutes == 1.5
    assert (call["resume"], call["quiet"]) == ("auto", True)


def test_train_device_flag_beats_set(fake_trainer, in_tmp):
    result = runner.invoke(app, ["train", "--set", "device=cuda", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert fake_trainer[0]["cfg"].device == "cpu"


def test_train_resume_path(fake_trainer, in_tmp):
    ckpt = in_tmp / "last.ckpt"
    ckpt.write_bytes(b"x")
    assert runner.invoke(app, ["train", "--resume", str(ckpt)]).exit_code == 0
    assert fake_trainer[0]["resume"] == str(ckpt)


def test_train_resume_missing_file(fake_trainer, in_tmp, capsys):
    code, _, err = run_main(["train", "--resume", "nope.ckpt"], capsys)
    assert code == 2 and "--resume nope.ckpt" in err
    assert not fake_trainer


def test_train_bad_time_limit(fake_trainer, capsys):
    code, _, err = run_main(["train", "--time-limit", "0"], capsys)
    assert code == 2 and "training.time_limit_minutes" in err
    assert not fake_trainer


def test_train_without_trainer_module_is_not_ready(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lhtcli.training.trainer", None)  # import raises ImportError
    code, _, err = run_main(["train"], capsys)
    assert code == 2
    assert "not implemented yet" in err


# --- stubs ---------------------------------------------------------------------------------------


INSPECTION_ARGS = {
    "visualize": ["--config", "configs/cpu_small.yaml", "--set", "seed=1", "--layer", "all", "--head", "1",
                  "--max-tokens", "30", "--start", "5", "--color-by-level", "-o", "x.png", "--log-to", "wandb",
                  "--json", "--device", "cpu"],
    "entropy": ["--checkpoint", "a.ckpt", "--batches", "2", "--per-head", "--json", "--output", "e.png"],
    "map": ["--checkpoint", "a.ckpt", "--document", "d.md", "--layer", "all", "--head", "0", "--unit", "both",
            "--start", "10", "--span", "500", "-o", "m.png", "--json", "--device", "cpu"],
    "gradcheck": ["--config", "configs/cpu_small.yaml", "--batches", "2", "--strict", "--numerical",
                  "--output", "g.png", "--json", "--device", "auto"],
    "demo": ["--output-dir", "d", "--seed", "1", "--json"],
    "train": ["--config", "configs/cpu_small.yaml", "--set", "seed=1", "--resume", "auto", "--quiet",
              "--device", "cpu", "--time-limit", "2", "--nproc", "2"],
}


@pytest.mark.parametrize("name", sorted(INSPECTION_ARGS))
def test_commands_parse_their_documented_options(name):
    """Parse only (click's make_context): the runs themselves are tested in their own files."""
    group = typer.main.get_command(app)
    command = group.commands[name]
    ctx = command.make_context(name, list(INSPECTION_ARGS[name]))
    assert ctx.params, ctx.params
    assert "json" not in ctx.params or ctx.params["json"] is True


@pytest.mark.parametrize("layer", ["x", "-1", "1.5"])
def test_visualize_rejects_bad_layer(layer):
    result = runner.invoke(app, ["visualize", "--layer", layer])
    assert result.exit_code == 2
    assert "layer" in result.output.lower()


def test_layer_index_helper():
    from lhtcli.commands._common import layer_index

    assert layer_index("3") == 3
    assert layer_index("ALL") is None
    with pytest.raises(typer.BadParameter):
        layer_index("three")


# --- lht config ----------------------------------------------------------------------------------


def test_config_show_round_trips(write_config):
    result = runner.invoke(app, ["config", "show", "--set", "training.num_steps=12", "--set", "experiment_name=007"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["training"]["num_steps"] == 12 and shown["experiment_name"] == "007"
    again = load_config(write_config(result.output, "shown.yaml"))
    assert again == load_config(default_config_path(), ["training.num_steps=12", "experiment_name=007"])


def test_config_validate_ok():
    result = runner.invoke(app, ["config", "validate", "--config", str(REPO / "configs" / "cpu_small.yaml")])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output


def test_config_validate_lists_every_problem(capsys, write_config):
    path = write_config({"training": {"mixed_precision": "fp8", "num_stepz": 3}, "model": {"dropout": 2}})
    code, _, err = run_main(["config", "validate", "--config", str(path)], capsys)
    assert code == 2
    for key in ["training.mixed_precision", "training.num_stepz", "model.dropout"]:
        assert key in err
    assert "Traceback" not in err


def test_config_validate_checks_data_paths(capsys):
    config = REPO / "configs" / "pretrain_hierarchical.yaml"
    code, _, err = run_main(["config", "validate", "--config", str(config)], capsys)
    assert code == 2
    assert "data.path: data/corpus.jsonl does not exist" in err
    assert "data.tokenizer: tokenizer.json does not exist" in err
    code, _, _ = run_main(
        ["config", "validate", "-c", str(config), "--set", "data.path=builtin", "--set", "data.tokenizer=train"],
        capsys,
    )
    assert code == 0


# --- documentation: every lht command shown in README and in help epilogs parses ----------------


def _lht_invocations(text: str) -> list[list[str]]:
    found = []
    for line in text.replace("\\\n", " ").splitlines():  # join backslash-continued lines
        line = line.split(" # ")[0].strip()
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part.split(">")[0], comments=True)
            for i, word in enumerate(words):
                if word == "lht" or word.endswith("/lht"):
                    found.append(words[i + 1 :])
                    break
    return found


def _parse(args: list[str]) -> None:
    """Parse (not run) ``lht ARGS``: every command and option must exist."""
    from typer.main import get_command

    def rest(ctx) -> list[str]:
        protected = getattr(ctx, "protected_args", None)
        if protected is None:
            protected = getattr(ctx, "_protected_args", [])
        return [*protected, *ctx.args]

    command = get_command(app)
    ctx = command.make_context("lht", list(args))
    while isinstance(command, typer.core.TyperGroup) and rest(ctx):
        name, command, remaining = command.resolve_command(ctx, rest(ctx))
        assert command is not None, f"lht {' '.join(args)}: no command {name!r}"
        ctx = command.make_context(name, remaining, parent=ctx)


def test_readme_commands_parse():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme, flags=re.S)
    invocations = [inv for block in blocks for inv in _lht_invocations(block)]
    assert len(invocations) >= 8
    for args in invocations:
        if "--help" in args or "--install-completion" in args or "--show-completion" in args:
            continue
        _parse(args)


def test_readme_quick_start_and_ci_script_agree():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", quick, flags=re.S)
                for line in block.strip().splitlines() if line and not line.startswith("#")]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e '.[dev]' "
        "&& .venv/bin/lht train",
        "bash .ci/run",
    ]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    assert "torch==2.13.0" in ci and "ruff check ." in ci and "python -m pytest -q" in ci
    assert (REPO / ".ci" / "run").stat().st_mode & 0o111


@pytest.mark.parametrize("name", COMMANDS)
def test_epilog_examples_parse(name):
    from typer.main import get_command

    command = get_command(app).commands[name]
    examples = _lht_invocations(command.epilog)
    assert examples, f"lht {name} has no examples"
    for args in examples:
        _parse(args)


def test_config_epilog_examples_parse():
    from typer.main import get_command

    group = get_command(app).commands["config"]
    for command in group.commands.values():
        for args in _lht_invocations(command.epilog):
            _parse(args)


def test_changelog_has_unreleased_added():
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in text
    assert "### Added" in text.split("## [Unreleased]", 1)[1]
