"""Export a checkpoint to a Hugging Face style folder, and load such a folder back.

``lht export`` writes what the Hugging Face ecosystem expects of a model folder:

* ``config.json``: the familiar keys (``model_type``, ``hidden_size``, ``num_hidden_layers``, ...)
  for people and tools that read them, plus ``lht_config``, the run's whole resolved config, which is
  what loading uses;
* ``model.safetensors``: the weights, with the MLM decoder's tied copy of the token embedding left
  out (as ``transformers`` does); metadata ``{"format": "pt"}``;
* ``tokenizer.json``: the run's tokenizer, loadable with ``tokenizers.Tokenizer.from_file``.

Safetensors is a JSON header plus raw little-endian tensor bytes: loading it parses data and never
runs code. The folder is written next to its destination and renamed into place, so an interrupted
export leaves nothing half-written, and an existing non-empty folder is replaced only with ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lhtcli.config import config_from_dict
from lhtcli.errors import CheckpointError, LHTError
from lhtcli.training.checkpoint import Checkpoint, load_checkpoint

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
MODEL_TYPE = "lht"
EXPORT_FORMAT_VERSION = 1


class ExportError(LHTError):
    """The export destination cannot be used as given."""


@dataclass
class ExportResult:
    directory: Path
    files: list[Path]
    parameters: int
    step: int


def is_export_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _untied_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without tensors that share storage with an earlier one (the tied MLM decoder)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model_state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def hf_config(ckpt: Checkpoint, vocab_size: int) -> dict[str, Any]:
    m = ckpt.config.model
    return {
        "architectures": ["LHTForMaskedLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": vocab_size,
        "hidden_size": m.d_model,
        "num_attention_heads": m.n_heads,
        "num_hidden_layers": m.num_layers,
        "intermediate_size": m.d_ff,
        "max_position_embeddings": m.max_seq_len,
        "hidden_act": "gelu",
        "hidden_dropout_prob": m.dropout,
        "position_embedding_type": "rope" if m.rope else "absolute",
        "mlswa_window_size_per_level": list(m.mlswa.window_size_per_level),
        "mlswa_layer_max_level": m.mlswa.layer_max_level,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "lht_export_format": EXPORT_FORMAT_VERSION,
        "lht_step": ckpt.step,
        "lht_config": ckpt.config.to_dict(),
    }


def _check_destination(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} is a file; give a folder path (it is created)")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ExportError(
            f"--output {output} exists and is not empty; choose a new folder or pass --force to replace it"
        )


def export_checkpoint(checkpoint: Path, output: Path, force: bool = False) -> ExportResult:
    """Write ``config.json``, ``model.safetensors`` and ``tokenizer.json`` of ``checkpoint`` into ``output``."""
    from safetensors.torch import save_file

    output = Path(output)
    _check_destination(output, force)  # before the (slower) load: fail fast
    ckpt = load_checkpoint(checkpoint)
    state = _untied_state(ckpt.model_state)
    vocab_size = int(ckpt.model_state["token_embedding.weight"].shape[0])
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config(ckpt, vocab_size), indent=2) + "\n", encoding="utf-8")
        (staging / TOKENIZER_FILE).write_text(ckpt.tokenizer_json, encoding="utf-8")
        _replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = [output / name for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)]
    return ExportResult(output, files, sum(t.numel() for t in state.values()), ckpt.step)


def _replace_dir(staging: Path, output: Path) -> None:
    """Move the finished ``staging`` folder to ``output``; an old ``output`` is removed only afterwards."""
    if output.is_dir() and any(output.iterdir()):
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if output.is_dir():
            output.rmdir()
        os.replace(staging, output)


def load_export_dir(path: Path) -> Checkpoint:
    """An exported folder as a ``Checkpoint`` (weights, config, tokenizer; no optimizer state)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE} is not readable JSON: {exc}") from None
    lht_model = isinstance(meta, dict) and meta.get("model_type") == MODEL_TYPE
    if not lht_model or not isinstance(meta.get("lht_config"), dict):
        raise CheckpointError(f"{path} is not a folder written by lht export (config.json has no lht model)")
    try:
        config = config_from_dict(meta["lht_config"])
    except (ValueError, TypeError, LHTError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path / CONFIG_FILE} holds an unreadable lht_config: {first}") from None
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path / WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None
    tokenizer_file = path / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{path} has no {TOKENIZER_FILE}; re-export the checkpoint with lht export")
    try:
        tokenizer_json = tokenizer_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {tokenizer_file}: {exc}") from None
    step = meta.get("lht_step", 0)
    return Checkpoint(step=step if isinstance(step, int) else 0, config=config, model_state=state,
                      tokenizer_json=tokenizer_json, path=path)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load an exported (untied) state: every parameter must be present or tied to one that is."""
    expected = model.state_dict()
    tied = _untied_state(expected)
    for name, tensor in state.items():
        if name not in expected:
            raise CheckpointError(f"{source}: parameter {name!r} does not exist in this model (different config?)")
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: parameter {name!r} has shape {tuple(tensor.shape)} but its config implies "
                f"{tuple(expected[name].shape)}"
            )
    missing = [name for name in tied if name not in state]
    if missing:
        raise CheckpointError(f"{source} lacks parameters {missing[:3]}; re-export the checkpoint")
    model.load_state_dict(state, strict=False)
