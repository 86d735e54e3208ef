"""Corpora in the Hugging Face ecosystem's formats: a ``datasets`` dataset saved to disk, Parquet files.

Both need the optional ``hf`` extra (``pip install 'lhtcli[hf]'``: ``datasets``, which brings
``pyarrow``); the libraries are imported only when ``data.path`` names such an input. Rows stream
in batches of ``ROW_BATCH``: a saved dataset is memory-mapped Arrow and a Parquet file is read one
row group at a time, so memory stays bounded however large the corpus is. Nothing is written (no
cache files) and nothing is fetched.

The ``data.text_field`` column holds either plain text (split into sections and sentences by
``documents.text_to_document``) or nested lists ``[[sentence, ...], ...]``, taken as they are.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lhtcli.data.documents import BadRecordReport, Document, accept_record, value_to_document
from lhtcli.errors import DataError, LHTError

EXTRA_HINT = "install the optional extra: pip install 'lhtcli[hf]'"
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")
ROW_BATCH = 256


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS)


def parquet_files(path: Path) -> list[Path]:
    """``path`` itself if it is a .parquet file, else the .parquet files under the folder (sorted)."""
    if path.is_file():
        return [path] if path.suffix.lower() == ".parquet" else []
    return sorted(p for p in path.rglob("*.parquet") if p.is_file())


def _import(module: str, path: Path) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"data.path {str(path)!r} needs the {module.split('.')[0]!r} library; {EXTRA_HINT}") from None


def _missing_column(path: Path, text_field: str, columns: Iterable[str]) -> DataError:
    names = ", ".join(repr(c) for c in columns) or "none"
    return DataError(
        f"{path} has no column {text_field!r} (columns: {names}); set data.text_field to the column holding the text"
    )


def _saved_dataset(path: Path, split: str) -> Any:
    """The ``datasets.Dataset`` saved under ``path`` (``split`` of a saved DatasetDict)."""
    datasets = _import("datasets", path)
    datasets.disable_progress_bars()  # our own display reports progress; tqdm bars would garble it
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a damaged folder
        raise DataError(f"cannot read the saved dataset {path}: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            splits = ", ".join(repr(s) for s in loaded) or "none"
            raise DataError(f"{path} has no split {split!r} (splits: {splits}); set data.split to one of them")
        loaded = loaded[split]
    return loaded


def _parquet_schema_names(file: Path) -> list[str]:
    pq = _import("pyarrow.parquet", file)
    try:
        return list(pq.ParquetFile(file).schema_arrow.names)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"cannot read {file} as Parquet: {exc}") from None


def check_hf_input(path: Path, text_field: str, split: str) -> None:
    """Fail now (not mid-training) when the input cannot be opened or lacks the text column."""
    if is_saved_dataset(path):
        dataset = _saved_dataset(path, split)
        if text_field not in dataset.column_names:
            raise _missing_column(path, text_field, dataset.column_names)
        return
    for file in parquet_files(path):
        names = _parquet_schema_names(file)
        if text_field not in names:
            raise _missing_column(file, text_field, names)


def hf_rows(path: Path, text_field: str, split: str) -> Iterator[tuple[str, Any]]:
    """(where, value) of the text column, row by row, read lazily in batches of ``ROW_BATCH`` rows."""
    if is_saved_dataset(path):
        dataset = _saved_dataset(path, split).select_columns([text_field])
        for start, batch in _numbered(dataset.iter(batch_size=ROW_BATCH)):
            for offset, value in enumerate(batch[text_field]):
                yield f"{path} row {start + offset + 1}", value
        return
    pq = _import("pyarrow.parquet", path)
    for file in parquet_files(path):
        try:
            reader = pq.ParquetFile(file)
            batches = reader.iter_batches(batch_size=ROW_BATCH, columns=[text_field])
            for start, batch in _numbered(b.column(0).to_pylist() for b in batches):
                for offset, value in enumerate(batch):
                    yield f"{file} row {start + offset + 1}", value
        except LHTError:
            raise
        except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file surfaces while reading
            raise DataError(f"cannot read {file} as Parquet: {exc}") from None


def _numbered(batches: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    """(index of the first row, batch) for batches of rows (a dict of columns or a list)."""
    start = 0
    for batch in batches:
        yield start, batch
        start += len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)


def documents_from_rows(
    rows: Iterable[tuple[str, Any]], skip_bad_records: bool = False, report: BadRecordReport | None = None
) -> Iterator[Document]:
    """Documents of (where, column value) rows, pulled one at a time; empty texts are skipped."""
    for where, value in rows:
        document = accept_record(where, value_to_document(value), skip_bad_records, report)
        if document is not None:
            yield document


def read_hf_input(
    path: Path, text_field: str, split: str, skip_bad_records: bool = False, report: BadRecordReport | None = None
) -> Iterator[Document]:
    """The documents of a saved dataset or Parquet file(s), streamed."""
    return documents_from_rows(hf_rows(path, text_field, split), skip_bad_records, report)
