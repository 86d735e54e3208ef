"""Experiment configuration (DESIGN.md section 6).

Precedence, highest first: ``--set section.key=value`` > ``LHT_`` environment variables (nested with
``__``, e.g. ``LHT_TRAINING__NUM_STEPS=10``) > the YAML file > defaults. Unknown keys are errors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from lhtcli.errors import ConfigError

DEFAULT_CONFIG_NAME = "cpu_small.yaml"
PACKAGED_CONFIGS = Path(__file__).parent / "configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MLSWAConfig(_Section):
    num_levels: int = Field(3, ge=1, le=3, description="hierarchy levels: tokens, sentences, sections")
    window_size_per_level: list[int] = Field(default_factory=lambda: [256, 64, 16])
    layer_max_level: list[int] | None = Field(
        None, description="highest active level per layer; null = every level in every layer"
    )
    backend: Literal["auto", "dense", "compact", "flex"] = "auto"

    @field_validator("window_size_per_level")
    @classmethod
    def _windows_non_negative(cls, value: list[int]) -> list[int]:
        if any(w < 0 for w in value):
            raise ValueError(f"every window must be >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _windows_match_levels(self) -> MLSWAConfig:
        if len(self.window_size_per_level) != self.num_levels:
            raise ValueError(
                f"window_size_per_level has {len(self.window_size_per_level)} entries but num_levels is "
                f"{self.num_levels}: give one window per level"
            )
        if self.layer_max_level is not None:
            bad = [m for m in self.layer_max_level if not 0 <= m < self.num_levels]
            if bad:
                raise ValueError(
                    f"layer_max_level values must be between 0 and num_levels - 1 = {self.num_levels - 1}, "
                    f"got {bad}"
                )
        return self


class ModelConfig(_Section):
    vocab_size: int | None = Field(None, ge=8, description="null = follow the tokenizer")
    d_model: int = Field(768, ge=8)
    n_heads: int = Field(12, ge=1)
    num_layers: int = Field(12, ge=1)
    d_ff: int = Field(3072, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_seq_len: int = Field(8192, ge=8)
    rope: bool = True
    rope_theta: float = Field(10000.0, gt=0)
    mlswa: MLSWAConfig = Field(default_factory=MLSWAConfig)

    @model_validator(mode="after")
    def _shapes_agree(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.rope and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"rope needs an even head size, got d_model / n_heads = {self.d_model // self.n_heads}")
        levels = self.mlswa.layer_max_level
        if levels is not None and len(levels) != self.num_layers:
            raise ValueError(
                f"model.mlswa.layer_max_level has {len(levels)} entries but num_layers is {self.num_layers}: "
                "give one entry per layer (or null for all levels everywhere)"
            )
        return self

    def max_levels(self) -> list[int]:
        """The highest active level of each layer."""
        if self.mlswa.layer_max_level is None:
            return [self.mlswa.num_levels - 1] * self.num_layers
        return list(self.mlswa.layer_max_level)


class TrainingConfig(_Section):
    batch_size: int = Field(4, ge=1)
    grad_accum_steps: int = Field(16, ge=1)
    num_steps: int = Field(100000, ge=1)
    warmup_steps: int = Field(1000, ge=0)
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr as a fraction of the peak")
    learning_rate: float = Field(1.0e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    save_every: int = Field(5000, ge=1)
    eval_every: int = Field(1000, ge=1)
    eval_batches: int = Field(20, ge=1)
    log_viz_every: int = Field(1000, ge=0, description="0 = no visualisations")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoint-{step}.ckpt files kept")
    max_bad_steps: int = Field(5, ge=1, description="consecutive NaN/Inf steps before the run stops")
    mixed_precision: Literal["bf16", "fp16", "none"] = "bf16"
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    mlm_probability_end: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="masking rate at the end of training, reached linearly after the warmup; null = constant",
    )
    eval_mlm_probability: float | None = Field(
        None, gt=0.0, lt=1.0, description="masking rate of the validation batches; null = mlm_probability"
    )
    time_limit_minutes: float | None = Field(None, gt=0, description="stop cleanly after this long")

    @property
    def validation_mlm_probability(self) -> float:
        return self.mlm_probability if self.eval_mlm_probability is None else self.eval_mlm_probability


class DataConfig(_Section):
    path: str = "builtin"
    text_field: str = "text"
    split: str = Field("train", description="split of a saved Hugging Face DatasetDict")
    tokenizer: str = "train"
    tokenizer_vocab_size: int = Field(8000, ge=64, description="vocabulary of a trained tokenizer")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    skip_bad_records: bool = False
    shuffle_buffer: int = Field(1000, ge=1)
    builtin_docstrings: bool = Field(True, description="add stdlib docstrings to the builtin corpus")
    builtin_stdlib: bool = Field(
        False, description="add the rest of the stdlib's docstrings and its source comments to the builtin corpus"
    )


class LoggingConfig(_Section):
    backend: Literal["tensorboard", "wandb", "both", "none"] = "tensorboard"
    dir: str = "runs"
    checkpoint_dir: str = "checkpoints"


class WandbConfig(_Section):
    project: str = "lht"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = Field(default_factory=list)
    offline: bool = False


class LHTConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LHT_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    experiment_name: str = Field("lht_default", pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)

    def run_dir(self) -> Path:
        return Path(self.logging.dir) / self.experiment_name

    def checkpoint_dir(self) -> Path:
        return Path(self.logging.checkpoint_dir) / self.experiment_name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set training.num_steps=100")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: the key is empty")
    return path, _parse_value(raw)


def _parse_value(raw: str) -> Any:
    """A command-line or environment value: YAML for null, lists and mappings; numbers and booleans
    stay text so that string keys keep them verbatim (``--set experiment_name=007``) while pydantic
    still converts them for numeric and boolean keys."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, bool | int | float):
        return raw.strip()
    return value


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# LHT_ variables that steer the process, not the experiment: never read as config keys.
PROCESS_VARIABLES = ("LHT_DEBUG", "LHT_NATIVE_KERNEL", "LHT_KERNEL_CACHE", "LHT_CPU_MATMUL")
CPU_MATMUL_CHOICES = ("auto", "mkl", "onednn")


def cpu_matmul_setting() -> str:
    """``LHT_CPU_MATMUL`` (the fp32 GEMM library of CPU projections): auto (unset), mkl or onednn."""
    value = os.environ.get("LHT_CPU_MATMUL", "").strip().lower() or "auto"
    if value not in CPU_MATMUL_CHOICES:
        raise ConfigError(
            f"environment variable LHT_CPU_MATMUL is {value!r}; set it to one of "
            f"{', '.join(CPU_MATMUL_CHOICES)} or unset it"
        )
    return value


def _env_data(sources: dict[str, str] | None = None) -> dict[str, Any]:
    """LHT_* variables as nested dict, so that they merge under --set and above the file.

    ``sources`` (if given) receives ``dotted.key -> "environment variable LHT_..."`` for error messages.
    """
    data: dict[str, Any] = {}
    for name, raw in sorted(os.environ.items()):
        if not name.startswith("LHT_") or name in PROCESS_VARIABLES or name.startswith("_LHT_"):
            continue
        path = [p.lower() for p in name[len("LHT_") :].split("__") if p]
        if not path:
            continue
        if sources is not None:
            sources[".".join(path)] = f"environment variable {name}"
        value = _parse_value(raw)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} conflicts with another LHT_ variable")
        node[path[-1]] = value
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file to --config)")
    if path.is_dir():
        raise ConfigError(f"--config expects a YAML file, got the directory {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, training:, ...)")
    return data


def _source_of(path: str, sources: dict[str, str]) -> str:
    """Where the value at ``path`` came from, when an override (env or --set) set it (or a key below it)."""
    for key, where in sources.items():
        if key == path or path.startswith(key + "."):
            return f" [from {where}]"
    inside = [where for key, where in sources.items() if key.startswith(path + ".")]
    return f" [overridden in this section by: {', '.join(inside)}]" if inside else ""


def format_validation_error(exc: ValidationError, origin: str, sources: dict[str, str] | None = None) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        where = _source_of(path, sources or {}) if err["loc"] else ""
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (check the spelling; see configs/*.yaml for every key){where}")
            continue
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {path}: {message}{shown}{where}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> LHTConfig:
    """Resolve a configuration from defaults < ``base`` < YAML file < environment < ``--set`` overrides."""
    cpu_matmul_setting()  # a bad process variable fails here, before any work starts
    data: dict[str, Any] = dict(base or {})
    origin = "built-in defaults"
    if path is not None:
        data = _deep_merge(data, read_yaml(Path(path)))
        origin = str(path)
    sources: dict[str, str] = {}
    data = _deep_merge(data, _env_data(sources))
    for item in overrides or []:
        keys, value = _parse_override(item)
        sources[".".join(keys)] = f"--set {item}"
        node: dict[str, Any] = {}
        leaf = node
        for key in keys[:-1]:
            leaf = leaf.setdefault(key, {})
        leaf[keys[-1]] = value
        data = _deep_merge(data, node)
    try:
        # Environment values are already merged into ``data`` (with the right precedence), so the
        # settings class must not read them a second time.
        return LHTConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin, sources)) from exc


def default_config_path() -> Path:
    return PACKAGED_CONFIGS / DEFAULT_CONFIG_NAME


def config_from_dict(data: dict[str, Any]) -> LHTConfig:
    """Rebuild a resolved config (e.g. from a checkpoint) without reading the environment."""
    try:
        return LHTConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "checkpoint")) from exc
