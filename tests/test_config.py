"""Configuration loading: precedence, environment, unknown keys, validation messages, shipped configs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lhtcli.config import LHTConfig, default_config_path, load_config
from lhtcli.errors import ConfigError, LHTError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# --- shipped configs -----------------------------------------------------------------------------


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"cpu_small.yaml", "pretrain_hierarchical.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, LHTConfig)
    assert len(cfg.model.max_levels()) == cfg.model.num_layers


def test_packaged_default_matches_repo_copy():
    packaged = default_config_path()
    assert packaged.is_file(), "lhtcli/configs/cpu_small.yaml must ship with the package"
    assert packaged.read_bytes() == (REPO / "configs" / "cpu_small.yaml").read_bytes(), (
        "configs/cpu_small.yaml and lhtcli/configs/cpu_small.yaml differ: copy one over the other"
    )


def test_default_config_contents():
    cfg = load_config(default_config_path())
    assert cfg.experiment_name == "lht_default"
    assert cfg.device == "auto"
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_heads, m.num_layers, m.d_ff, m.max_seq_len) == (None, 128, 4, 2, 512, 512)
    assert m.mlswa.window_size_per_level == [32, 8, 4]
    assert m.mlswa.layer_max_level == [2, 2]
    assert cfg.training.lr_schedule == "cosine"
    assert cfg.training.time_limit_minutes == 5
    assert (cfg.data.path, cfg.data.tokenizer) == ("builtin", "train")
    assert (cfg.logging.backend, cfg.logging.dir) == ("tensorboard", "runs")


def test_default_config_comments_every_key():
    for number, line in enumerate(default_config_path().read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert " # " in line, f"cpu_small.yaml line {number} has no comment: {line!r}"


def test_default_config_sets_every_key():
    def keys(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from keys(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    written = set(keys(yaml.safe_load(default_config_path().read_text())))
    assert written == set(keys(LHTConfig().to_dict())), "cpu_small.yaml should list every config key"


def test_pretrain_config_is_research_scale():
    cfg = load_config(REPO / "configs" / "pretrain_hierarchical.yaml")
    m = cfg.model
    assert (m.d_model, m.n_heads, m.num_layers, m.d_ff, m.max_seq_len) == (768, 12, 12, 3072, 8192)
    assert m.mlswa.window_size_per_level == [256, 64, 16]
    assert m.max_levels() == [2] * 12
    assert (cfg.data.path, cfg.data.tokenizer) == ("data/corpus.jsonl", "tokenizer.json")
    head = (REPO / "configs" / "pretrain_hierarchical.yaml").read_text().split("\n\n")[0]
    assert "data.path" in head and "data.tokenizer" in head and "lht train --config" in head


# --- precedence ----------------------------------------------------------------------------------


def test_precedence_file_env_set(write_config, monkeypatch):
    path = write_config({"training": {"num_steps": 11}})
    assert load_config(path).training.num_steps == 11
    monkeypatch.setenv("LHT_TRAINING__NUM_STEPS", "22")
    assert load_config(path).training.num_steps == 22
    assert load_config(path, ["training.num_steps=33"]).training.num_steps == 33


def test_env_overrides_beat_file_only_for_their_key(write_config, monkeypatch):
    path = write_config({"training": {"num_steps": 11, "batch_size": 3}})
    monkeypatch.setenv("LHT_TRAINING__NUM_STEPS", "22")
    cfg = load_config(path)
    assert (cfg.training.num_steps, cfg.training.batch_size) == (22, 3)


def test_defaults_without_file():
    assert load_config().training.num_steps == LHTConfig().training.num_steps


def test_env_nested_list(monkeypatch):
    monkeypatch.setenv("LHT_MODEL__MLSWA__WINDOW_SIZE_PER_LEVEL", "[8,4,2]")
    assert load_config(default_config_path()).model.mlswa.window_size_per_level == [8, 4, 2]


def test_env_top_level_and_bool(monkeypatch):
    monkeypatch.setenv("LHT_DEVICE", "cpu")
    monkeypatch.setenv("LHT_WANDB__OFFLINE", "true")
    cfg = load_config(default_config_path())
    assert cfg.device == "cpu" and cfg.wandb.offline is True


@pytest.mark.parametrize("name", ["LHT_DEBUG", "LHT_NATIVE_KERNEL", "LHT_KERNEL_CACHE"])
def test_process_variables_are_not_config_keys(monkeypatch, name):
    monkeypatch.setenv(name, "0")
    cfg = load_config(default_config_path())
    assert cfg.experiment_name  # loaded without an "unknown key" error


def test_set_parses_yaml_values():
    cfg = load_config(
        default_config_path(),
        ["model.mlswa.window_size_per_level=[16, 4, 2]", "wandb.tags=[a, b]", "wandb.entity=null",
         "training.learning_rate=3e-4", "model.rope=false", "training.time_limit_minutes=null"],
    )
    assert cfg.model.mlswa.window_size_per_level == [16, 4, 2]
    assert cfg.wandb.tags == ["a", "b"] and cfg.wandb.entity is None
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.model.rope is False and cfg.training.time_limit_minutes is None


def test_numeric_looking_strings_stay_strings(monkeypatch):
    monkeypatch.setenv("LHT_WANDB__NAME", "2024")
    cfg = load_config(default_config_path(), ["experiment_name=007", "data.path=123"])
    assert (cfg.experiment_name, cfg.wandb.name, cfg.data.path) == ("007", "2024", "123")


def test_set_without_equals():
    assert "expected section.key=value" in config_error(default_config_path(), ["training.num_steps"])


# --- unknown keys --------------------------------------------------------------------------------


def test_unknown_key_in_file(write_config):
    message = config_error(write_config({"training": {"num_stepz": 3}}))
    assert "training.num_stepz: unknown key" in message


def test_unknown_section_in_file(write_config):
    assert "optimizer: unknown key" in config_error(write_config({"optimizer": {"lr": 1}}))


def test_unknown_key_in_set():
    message = config_error(default_config_path(), ["model.mlswa.windows=[1,2,3]"])
    assert "model.mlswa.windows: unknown key" in message
    assert "--set model.mlswa.windows=[1,2,3]" in message


def test_unknown_key_in_env(monkeypatch):
    monkeypatch.setenv("LHT_TRAINING__NUM_STEPZ", "3")
    message = config_error(default_config_path())
    assert "training.num_stepz: unknown key" in message
    assert "LHT_TRAINING__NUM_STEPZ" in message


# --- validation messages -------------------------------------------------------------------------


def test_d_model_not_multiple_of_heads():
    message = config_error(default_config_path(), ["model.d_model=100", "model.n_heads=3"])
    assert "d_model (100) must be a multiple of n_heads (3)" in message


def test_window_list_wrong_length():
    message = config_error(default_config_path(), ["model.mlswa.window_size_per_level=[8,4]"])
    assert "window_size_per_level has 2 entries but num_levels is 3" in message


def test_negative_window():
    message = config_error(default_config_path(), ["model.mlswa.window_size_per_level=[8,-1,2]"])
    assert "model.mlswa.window_size_per_level" in message and ">= 0" in message


def test_layer_max_level_wrong_length():
    message = config_error(default_config_path(), ["model.mlswa.layer_max_level=[2,2,2]"])
    assert "layer_max_level has 3 entries but num_layers is 2" in message


def test_layer_max_level_above_top_level():
    message = config_error(default_config_path(), ["model.mlswa.layer_max_level=[0,1,2,3]"])
    assert "layer_max_level" in message and "num_levels - 1 = 2" in message and "[3]" in message


def test_bad_enum_value():
    message = config_error(default_config_path(), ["training.mixed_precision=fp8"])
    assert "training.mixed_precision" in message and "'fp8'" in message and "bf16" in message


def test_several_problems_reported_together(write_config):
    message = config_error(write_config({"training": {"mixed_precision": "fp8", "batch_size": 0}, "seed": "x"}))
    for key in ["training.mixed_precision", "training.batch_size", "seed"]:
        assert key in message


def test_non_mapping_yaml(write_config):
    assert "must hold a mapping" in config_error(write_config("- a\n- b\n"))


def test_invalid_yaml_reports_line(write_config):
    message = config_error(write_config("model:\n  d_model: 256\n  n_heads: [4\ntraining: {}\n"))
    assert "not valid YAML" in message and re.search(r"line [34]", message)


def test_missing_file(tmp_path):
    message = config_error(tmp_path / "nope.yaml")
    assert "config file not found" in message and "nope.yaml" in message


def test_directory_instead_of_file(tmp_path):
    assert "directory" in config_error(tmp_path)


def test_empty_file_means_defaults(write_config):
    assert load_config(write_config("")) == LHTConfig()


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, LHTError) and ConfigError.exit_code == 2



# --- through the command line --------------------------------------------------------------------


@pytest.mark.parametrize("debug", [False, True])
def test_bad_config_through_python_dash_m(debug, write_config, subprocess_env):
    path = write_config({"training": {"mixed_precision": "fp8"}})
    args = [sys.executable, "-m", "lhtcli", *(["--debug"] if debug else []), "config", "show", "--config", str(path)]
    proc = subprocess.run(args, capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert proc.returncode == 2
    assert "error: invalid configuration" in proc.stderr and "training.mixed_precision" in proc.stderr
    assert ("Traceback" in proc.stderr) is debug
