"""What the inspection commands (visualize, entropy, gradcheck) analyse: a model and some text.

* ``--checkpoint CKPT``: the trained model, its config and its tokenizer, all from the checkpoint
  (a ``.ckpt`` file or a folder written by ``lht export``); ``--set`` may change sections other than
  ``model`` (e.g. ``logging.dir``).
* ``--config FILE``: a randomly initialised model (seeded by ``seed``); the tokenizer is
  ``data.tokenizer`` when that is a file, otherwise a WordPiece tokenizer trained in milliseconds on
  the built-in sample document (plus ``--document``, if given).

Text: ``--document FILE`` if given; otherwise, for a checkpoint, the validation split of its corpus
(the batches its training run evaluated on) when that corpus is readable here; otherwise the built-in
sample document.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lhtcli.config import LHTConfig, load_config
from lhtcli.diagnostics.sample_document import SAMPLE_TITLE, sample_document
from lhtcli.errors import ConfigError, DataError, LHTError

if TYPE_CHECKING:
    from lhtcli.core.positions import TokenizedSequence
    from lhtcli.data.batching import MLMBatch
    from lhtcli.data.tokenizer import LHTTokenizer
    from lhtcli.model import LHTEncoder

SAMPLE_VOCAB = 2000  # a WordPiece trained on a few hundred words stops far below this


@dataclass
class LoadedModel:
    model: LHTEncoder
    config: LHTConfig
    tokenizer: LHTTokenizer
    device: torch.device
    source: str  # human-readable: where the weights come from
    step: int = 0  # the checkpoint's training step (0 for a random initialisation)
    checkpoint: Path | None = None

    @property
    def windows(self) -> list[int]:
        return [int(w) for w in self.model.cfg.mlswa.window_size_per_level]


@dataclass
class TextSource:
    description: str
    batches: list[MLMBatch]
    tokens: list[list[str]]  # per batch, the token strings of its first sequence


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but torch sees no CUDA device; use --device cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _build_model(cfg: LHTConfig, vocab_size: int) -> LHTEncoder:
    from lhtcli.model import LHTEncoder

    if cfg.model.vocab_size is not None and cfg.model.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size is {cfg.model.vocab_size} but the tokenizer has {vocab_size} tokens: "
            "set model.vocab_size: null to follow the tokenizer"
        )
    return LHTEncoder(cfg.model.model_copy(update={"vocab_size": vocab_size}))


def sample_tokenizer(extra_documents: list[list[list[str]]] | None = None) -> LHTTokenizer:
    """A WordPiece tokenizer trained on the sample document (and any extra documents): milliseconds.

    The text is given twice: the trainer only merges pairs seen at least twice, and a few hundred
    words would otherwise stay split into letters.
    """
    from lhtcli.data.tokenizer import LHTTokenizer

    documents = [sample_document(), *(extra_documents or [])]
    return LHTTokenizer.train(documents * 2, SAMPLE_VOCAB)


def load_model(
    checkpoint: Path | None,
    config: Path | None,
    sets: list[str] | None = None,
    device: str | None = None,
    document: list[list[str]] | None = None,
) -> LoadedModel:
    """The model to inspect, in eval mode, on the chosen device."""
    if checkpoint is not None and config is not None:
        raise ConfigError(
            "give either --checkpoint (a trained model and its config) or --config (random weights), not both"
        )
    if checkpoint is not None:
        return _from_checkpoint(Path(checkpoint), sets, device)
    from lhtcli.config import default_config_path

    overrides = list(sets or []) + ([f"device={device}"] if device else [])
    cfg = load_config(config or default_config_path(), overrides)
    if cfg.data.tokenizer != "train":
        from lhtcli.data.tokenizer import LHTTokenizer

        tokenizer = LHTTokenizer.from_file(cfg.data.tokenizer)
    else:
        tokenizer = sample_tokenizer([document] if document else None)
    torch.manual_seed(cfg.seed)
    model = _build_model(cfg, tokenizer.vocab_size)
    target = resolve_device(cfg.device)
    model.to(target).eval()
    name = str(config) if config is not None else "the packaged cpu_small.yaml"
    return LoadedModel(model, cfg, tokenizer, target, f"random initialisation from {name} (seed {cfg.seed})")


def checkpoint_paths(checkpoint: Path | None, checkpoints: list[Path] | None) -> list[Path]:
    """The checkpoints a diagnostic was given (``--checkpoint`` and/or positional): none, one, or two to compare."""
    paths = ([checkpoint] if checkpoint is not None else []) + list(checkpoints or [])
    if len(paths) > 2:
        raise ConfigError(f"give one or two checkpoints to compare, got {len(paths)}")
    return paths


def load_pair(
    paths: list[Path], config: Path | None, sets: list[str] | None, device: str | None,
    document: list[list[str]] | None,
) -> list[LoadedModel]:
    """Two checkpoints to compare on the same tokens: each carries its config, and they share a tokenizer."""
    if config is not None:
        raise ConfigError("comparing two checkpoints: drop --config (each checkpoint carries its own)")
    models = [load_model(p, None, sets, device, document=document) for p in paths]
    if models[0].tokenizer.to_json_str() != models[1].tokenizer.to_json_str():
        raise ConfigError(
            f"{paths[0]} and {paths[1]} use different tokenizers, so they cannot be compared on the same "
            "tokens; compare checkpoints of one run"
        )
    return models


def _from_checkpoint(path: Path, sets: list[str] | None, device: str | None) -> LoadedModel:
    """A ``.ckpt`` file of ``lht train`` or a folder written by ``lht export`` (safetensors: no code runs)."""
    from lhtcli.data.tokenizer import LHTTokenizer
    from lhtcli.training.checkpoint import check_model_compatible, load_checkpoint
    from lhtcli.training.export import is_export_dir, load_export_dir, load_weights

    exported = is_export_dir(path)
    ckpt = load_export_dir(path) if exported else load_checkpoint(path, map_location="cpu")
    cfg = ckpt.config
    overrides = list(sets or []) + ([f"device={device}"] if device else [])
    if overrides:
        changed = load_config(None, overrides, base=cfg.to_dict())
        if changed.model != cfg.model:
            raise ConfigError("the model comes from the checkpoint: --set model.* cannot change it")
        cfg = changed
    tokenizer = LHTTokenizer.from_json_str(ckpt.tokenizer_json, source=f"the tokenizer in {path}")
    model = _build_model(cfg, tokenizer.vocab_size)
    if exported:
        load_weights(model, ckpt.model_state, path)
    else:
        check_model_compatible(ckpt, model)
        model.load_state_dict(ckpt.model_state)
    target = resolve_device(cfg.device)
    model.to(target).eval()
    return LoadedModel(model, cfg, tokenizer, target, f"{path} (step {ckpt.step})", ckpt.step, path)


def read_document(document: Path | None) -> tuple[str, list[list[str]]]:
    """(description, nested document) of ``--document`` or the built-in sample."""
    if document is None:
        return f'the built-in sample document "{SAMPLE_TITLE}"', sample_document()
    from lhtcli.data.documents import load_document_file

    doc = load_document_file(document)
    if not any(sentence.strip() for section in doc for sentence in section):
        raise DataError(f"{document} holds no text to analyse")
    return str(document), doc


def document_sequences(loaded: LoadedModel, doc: list[list[str]]) -> list[TokenizedSequence]:
    from lhtcli.core.positions import build_sequences

    tok = loaded.tokenizer
    sequences = build_sequences(tok.encode_document(doc), loaded.model.cfg.max_seq_len, tok.doc_id)
    if not sequences or all(len(s.input_ids) <= 1 for s in sequences):
        raise DataError("the document has no tokens after tokenisation")
    return sequences


def document_batches(
    loaded: LoadedModel, doc: list[list[str]], batches: int, masked: bool, mlm_seed: int | None = None
) -> list[MLMBatch]:
    """The document's sequences in batches of ``training.batch_size`` (up to ``batches`` batches).

    With ``masked`` every batch is MLM-masked; when the document fills fewer than ``batches``
    batches, its batches are repeated with fresh masks so that ``batches`` passes are still made.
    """
    from lhtcli.data.batching import MLMBatch, batch_generator, collate, make_batch

    sequences = document_sequences(loaded, doc)
    size = loaded.config.training.batch_size
    groups = [sequences[i : i + size] for i in range(0, len(sequences), size)]
    seed = loaded.config.seed if mlm_seed is None else mlm_seed
    result = []
    for index in range(batches if masked else min(batches, len(groups))):
        group = groups[index % len(groups)]
        if masked:
            prob = loaded.config.training.mlm_probability
            result.append(make_batch(group, loaded.tokenizer, prob, batch_generator(seed, index)))
        else:
            ids, positions = collate(group, loaded.tokenizer.pad_id)
            result.append(MLMBatch(ids, torch.full_like(ids, -100), positions))
    return result


def validation_batches(loaded: LoadedModel, batches: int) -> list[MLMBatch]:
    """The first ``batches`` validation batches of the checkpoint's run (same split and masks)."""
    from lhtcli.data.batching import fixed_batches
    from lhtcli.data.documents import iter_corpus, split_by_document

    cfg = loaded.config
    _, val_docs = split_by_document(lambda: iter_corpus(cfg.data), cfg.data.validation_fraction, cfg.seed)
    tcfg = cfg.training
    return fixed_batches(
        val_docs(),
        loaded.tokenizer,
        loaded.model.cfg.max_seq_len,
        tcfg.batch_size,
        tcfg.validation_mlm_probability,
        cfg.seed + 1,
        batches,
    )


def text_source(loaded: LoadedModel, document: Path | None, batches: int, masked: bool) -> TextSource:
    """Batches to analyse: ``--document``, else a checkpoint's validation data, else the sample."""
    if document is None and loaded.checkpoint is not None and loaded.config.data.validation_fraction > 0:
        try:
            found = validation_batches(loaded, batches)
        except LHTError:
            found = []  # the run's corpus is not readable here: fall back to the sample
        if found:
            if not masked:
                found = [unmasked(b) for b in found]
            return TextSource(
                f"{len(found)} validation batch(es) of {loaded.config.data.path}",
                found,
                _token_strings(loaded, found),
            )
    description, doc = read_document(document)
    found = document_batches(loaded, doc, batches, masked)
    return TextSource(description, found, _token_strings(loaded, found))


def unmasked(batch: MLMBatch) -> MLMBatch:
    """The same batch with its original tokens restored and no labels."""
    from lhtcli.data.batching import MLMBatch

    ids = batch.original_ids()
    return MLMBatch(ids, torch.full_like(ids, -100), batch.positions)


def _token_strings(loaded: LoadedModel, batches: list[MLMBatch]) -> list[list[str]]:
    tok = loaded.tokenizer
    return [[tok.id_to_token(int(i)) for i in b.input_ids[0].tolist()] for b in batches]


__all__ = [
    "LoadedModel",
    "TextSource",
    "document_batches",
    "document_sequences",
    "load_model",
    "read_document",
    "resolve_device",
    "sample_tokenizer",
    "text_source",
    "unmasked",
    "validation_batches",
]
