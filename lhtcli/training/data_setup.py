"""Corpus -> tokenizer -> training stream and fixed validation batches for one run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from lhtcli.config import LHTConfig
from lhtcli.data.baselines import baseline_accuracies, fit_ngram_baselines
from lhtcli.data.batching import MLMBatch, MLMBatchStream, documents_to_sequences, fixed_batches
from lhtcli.data.documents import BadRecordReport, iter_corpus, split_by_document
from lhtcli.data.tokenizer import LHTTokenizer
from lhtcli.errors import DataError


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
    val_list = list(val_docs())
    val_batches = fixed_batches(
        val_list, tokenizer, max_len, tcfg.batch_size, tcfg.mlm_probability, cfg.seed + 1, tcfg.eval_batches
    )
    stats: dict[str, Any] = {
        "source": "built-in corpus (Python documentation)" if cfg.data.path == "builtin" else str(Path(cfg.data.path)),
        "val_documents": len(val_list),
    }
    if cfg.data.path == "builtin" or Path(cfg.data.path).is_dir():
        stats["train_documents"] = sum(1 for _ in train_docs())
    if stats.get("train_documents") == 0:
        raise DataError(f"data.path {cfg.data.path!r} holds no training documents (all were held out or empty)")

    def baselines() -> dict[str, float]:
        sequences = documents_to_sequences(train_docs(), tokenizer, max_len)
        model = fit_ngram_baselines(sequences, special_ids=tokenizer.special_ids)
        return baseline_accuracies(model, val_batches)

    return DataBundle(tokenizer, stream, val_batches, stats, baselines, report)
