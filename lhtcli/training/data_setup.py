"""Corpus -> tokenizer -> training stream and fixed validation batches for one run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from lhtcli.config import LHTConfig
from lhtcli.core.positions import TokenizedSequence
from lhtcli.data.baselines import baseline_accuracies, fit_ngram_baselines
from lhtcli.data.batching import MLMBatch, MLMBatchStream, documents_to_sequences, fixed_batches
from lhtcli.data.documents import BadRecordReport, Document, iter_corpus, split_by_document
from lhtcli.data.tokenizer import LHTTokenizer
from lhtcli.errors import DataError

# The n-gram baselines are fitted on at most this many training tokens (memory stays bounded).
BASELINE_MAX_TOKENS = 5_000_000


class _Counted(Iterator[Document]):
    """Passes documents through and counts how many were pulled."""

    def __init__(self, documents: Iterator[Document]) -> None:
        self.documents, self.count = documents, 0

    def __next__(self) -> Document:
        document = next(self.documents)
        self.count += 1
        return document


def _first_tokens(sequences: Iterator[TokenizedSequence], max_tokens: int) -> Iterator[TokenizedSequence]:
    total = 0
    for sequence in sequences:
        if total >= max_tokens:
            return
        total += len(sequence.input_ids)
        yield sequence


def _small_source(cfg: LHTConfig) -> bool:
    """The built-in corpus or a folder of text files: counting its documents costs a moment."""
    if cfg.data.path == "builtin":
        return True
    from lhtcli.data.documents import text_files
    from lhtcli.data.hf_inputs import is_saved_dataset

    path = Path(cfg.data.path).expanduser()
    return path.is_dir() and not is_saved_dataset(path) and bool(text_files(path))


@dataclass
class DataBundle:
    tokenizer: LHTTokenizer
    train_stream: MLMBatchStream
    val_batches: list[MLMBatch]
    stats: dict[str, Any] = field(default_factory=dict)
    baselines: Callable[[], dict[str, float]] = dict
    bad_records: BadRecordReport | None = None

    def describe(self) -> str:
        parts = [self.stats.get("source", "")]
        if "train_documents" in self.stats:
            parts.append(f"{self.stats['train_documents']:,} training documents")
        if "val_documents" in self.stats:
            parts.append(f"{self.stats['val_documents']:,} held out ({len(self.val_batches)} validation batches)")
        elif "val_documents_used" in self.stats:
            parts.append(f"{len(self.val_batches)} validation batches from {self.stats['val_documents_used']:,} "
                         "held-out documents")
        parts.append(f"vocabulary {self.tokenizer.vocab_size:,}")
        return ", ".join(p for p in parts if p)


def _load_tokenizer(cfg: LHTConfig, train_docs: Callable, tokenizer_json: str | None,
                    console: Console, write_files: bool) -> LHTTokenizer:
    if tokenizer_json is not None:
        return LHTTokenizer.from_json_str(tokenizer_json, source="checkpoint")
    if cfg.data.tokenizer != "train":
        return LHTTokenizer.from_file(cfg.data.tokenizer)
    cache = cfg.run_dir() / "tokenizer.json"
    with console.status("training a WordPiece tokenizer on the training split"):
        tokenizer = LHTTokenizer.train(train_docs(), cfg.data.tokenizer_vocab_size)
    if write_files:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(cache)
    return tokenizer


def prepare_data(cfg: LHTConfig, tokenizer_json: str | None = None, console: Console | None = None,
                 write_files: bool = True) -> DataBundle:
    """Split the corpus by document, build (or restore) the tokenizer, the stream and validation batches.

    ``write_files`` is False on every rank but 0 of a distributed run (one writer per run directory).
    """
    console = console or Console(quiet=True)
    report = BadRecordReport() if cfg.data.skip_bad_records else None

    def corpus():
        return iter_corpus(cfg.data, report)

    train_docs, val_docs = split_by_document(corpus, cfg.data.validation_fraction, cfg.seed)
    tokenizer = _load_tokenizer(cfg, train_docs, tokenizer_json, console, write_files)
    tcfg, max_len = cfg.training, cfg.model.max_seq_len
    stream = MLMBatchStream(
        train_docs, tokenizer, max_len, tcfg.batch_size, tcfg.mlm_probability, cfg.seed, cfg.data.shuffle_buffer
    )
    # Validation reads held-out documents only until its batches are full: a large corpus streams.
    used = _Counted(val_docs())
    val_batches = fixed_batches(
        used, tokenizer, max_len, tcfg.batch_size, tcfg.validation_mlm_probability, cfg.seed + 1, tcfg.eval_batches
    )
    stats: dict[str, Any] = {
        "source": "built-in corpus (Python documentation)" if cfg.data.path == "builtin" else str(Path(cfg.data.path)),
    }
    if _small_source(cfg):
        stats["val_documents"] = sum(1 for _ in val_docs())
        stats["train_documents"] = sum(1 for _ in train_docs())
    else:
        stats["val_documents_used"] = used.count
    if stats.get("train_documents") == 0:
        raise DataError(f"data.path {cfg.data.path!r} holds no training documents (all were held out or empty)")

    def baselines() -> dict[str, float]:
        sequences = _first_tokens(documents_to_sequences(train_docs(), tokenizer, max_len), BASELINE_MAX_TOKENS)
        model = fit_ngram_baselines(sequences, special_ids=tokenizer.special_ids)
        return baseline_accuracies(model, val_batches)

    return DataBundle(tokenizer, stream, val_batches, stats, baselines, report)
