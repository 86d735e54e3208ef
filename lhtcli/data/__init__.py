"""Corpora, tokenizer, MLM masking and batching (DESIGN.md section 7)."""

from lhtcli.data.baselines import NgramBaselines, baseline_accuracies, fit_ngram_baselines
from lhtcli.data.batching import MLMBatch, MLMBatchStream, collate, documents_to_sequences, fixed_batches
from lhtcli.data.builtin_corpus import builtin_documents
from lhtcli.data.documents import (
    BadRecordReport,
    Document,
    iter_corpus,
    load_document_file,
    parse_document,
    read_jsonl,
    read_text_folder,
    split_by_document,
    split_sentences,
)
from lhtcli.data.masking import IGNORE_INDEX, mask_tokens
from lhtcli.data.tokenizer import LHTTokenizer

__all__ = [
    "IGNORE_INDEX",
    "BadRecordReport",
    "Document",
    "LHTTokenizer",
    "MLMBatch",
    "MLMBatchStream",
    "NgramBaselines",
    "baseline_accuracies",
    "builtin_documents",
    "collate",
    "documents_to_sequences",
    "fit_ngram_baselines",
    "fixed_batches",
    "iter_corpus",
    "load_document_file",
    "mask_tokens",
    "parse_document",
    "read_jsonl",
    "read_text_folder",
    "split_by_document",
    "split_sentences",
]
