"""Hugging Face inputs: saved datasets, Parquet, JSON; plain text in a column; lazy streaming."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lhtcli.config import DataConfig
from lhtcli.data.batching import MLMBatchStream
from lhtcli.data.documents import iter_corpus, text_to_document
from lhtcli.data.hf_inputs import documents_from_rows
from lhtcli.data.tokenizer import LHTTokenizer
from lhtcli.errors import DataError

PLAIN = "# Intro\nFirst sentence here. Second one follows.\n\nMore of the intro.\n\n# Next\nThe end is near."
NESTED = [["One.", "Two."], ["Three."]]
PLAIN_DOC = [
    ["Intro", "First sentence here.", "Second one follows.", "More of the intro."],
    ["Next", "The end is near."],
]


def test_plain_text_rules() -> None:
    assert text_to_document(PLAIN) == PLAIN_DOC
    # Without headings every blank-line paragraph is a section; single newlines are spaces.
    assert text_to_document("A b c. D e\nf.\n\nG h.") == [["A b c.", "D e f."], ["G h."]]
    assert text_to_document("  \n\n ") == []


def test_jsonl_accepts_plain_text_and_nested_lists(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    rows = [{"text": PLAIN}, {"text": NESTED}, {"text": ""}, {"text": "Just one line."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert list(iter_corpus(DataConfig(path=str(path)))) == [PLAIN_DOC, NESTED, [["Just one line."]]]


def test_json_lines_and_json_array_files(tmp_path: Path) -> None:
    lines = tmp_path / "lines.json"  # what Dataset.to_json writes
    lines.write_text(json.dumps({"body": PLAIN}) + "\n" + json.dumps({"body": NESTED}) + "\n")
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"body": PLAIN}, {"body": NESTED}]))
    for path in (lines, array):
        assert list(iter_corpus(DataConfig(path=str(path), text_field="body"))) == [PLAIN_DOC, NESTED]
    with pytest.raises(DataError, match="array.json record 1: no 'text' field"):
        list(iter_corpus(DataConfig(path=str(array))))


def test_reading_is_lazy() -> None:
    """The first batch pulls a few records of a (practically) endless source, not the corpus."""
    pulled = 0

    def rows() -> Iterator[tuple[str, str]]:
        nonlocal pulled
        for i in range(10**9):
            pulled += 1
            yield f"row {i}", f"Record number {i} has words. It also has a second sentence."

    tokenizer = LHTTokenizer.train([[["record number has words it also a second sentence"]]], 64)
    stream = MLMBatchStream(lambda: documents_from_rows(rows()), tokenizer, 32, batch_size=2,
                            mlm_probability=0.15, seed=0, shuffle_buffer=8, sort_window=2)
    batch = next(stream)
    assert batch.batch_size == 2
    assert pulled <= 8 + 2 * 2 + 1  # the shuffle buffer, one sort window, and one look-ahead


def test_bad_value_names_the_row() -> None:
    with pytest.raises(DataError, match="data.parquet row 2: the text is a number"):
        list(documents_from_rows([("data.parquet row 1", "Fine."), ("data.parquet row 2", 7)]))


def test_missing_extra_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    with pytest.raises(DataError, match=r"needs the 'pyarrow' library; install the optional extra: .*lhtcli\[hf\]"):
        iter_corpus(DataConfig(path=str(tmp_path / "a.parquet")))


# ----------------------------------------------------------------------------- with the optional libraries


@pytest.fixture
def datasets():
    """The optional ``datasets`` library; the test is skipped without it (``pip install 'lhtcli[hf]'``)."""
    module = pytest.importorskip("datasets")
    module.disable_progress_bars()  # the fixtures' writes would print bars to stderr
    return module


@pytest.fixture
def rows() -> dict[str, list]:
    return {"content": [PLAIN, "", "Another record. With two sentences."], "id": [1, 2, 3]}


EXPECTED = [PLAIN_DOC, [["Another record.", "With two sentences."]]]


def test_saved_dataset_and_dataset_dict(datasets, tmp_path: Path, rows: dict[str, list]) -> None:
    dataset = datasets.Dataset.from_dict(rows)
    dataset.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert list(iter_corpus(DataConfig(path=str(tmp_path / "ds"), text_field="content"))) == EXPECTED
    assert list(iter_corpus(DataConfig(path=str(tmp_path / "dd"), text_field="content"))) == EXPECTED
    assert list(iter_corpus(DataConfig(path=str(tmp_path / "dd"), text_field="content", split="test"))) == [PLAIN_DOC]
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: 'train', 'test'\); set data.split"):
        iter_corpus(DataConfig(path=str(tmp_path / "dd"), text_field="content", split="validation"))


def test_nested_lists_in_a_dataset_are_taken_as_is(datasets, tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"text": [NESTED]}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_corpus(DataConfig(path=str(tmp_path / "ds")))) == [NESTED]


def test_parquet_file_and_folder(datasets, tmp_path: Path, rows: dict[str, list]) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    datasets.Dataset.from_dict(rows).to_parquet(str(folder / "a.parquet"))
    datasets.Dataset.from_dict({"content": ["Last shard text."], "id": [9]}).to_parquet(str(folder / "b.parquet"))
    assert list(iter_corpus(DataConfig(path=str(folder / "a.parquet"), text_field="content"))) == EXPECTED
    assert list(iter_corpus(DataConfig(path=str(folder), text_field="content"))) == [*EXPECTED, [["Last shard text."]]]


def test_missing_column_and_unreadable_files(datasets, tmp_path: Path, rows: dict[str, list]) -> None:
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    for path in (tmp_path / "a.parquet", tmp_path / "ds"):
        with pytest.raises(DataError, match=r"has no column 'text' \(columns: 'content', 'id'\); set data.text_field"):
            iter_corpus(DataConfig(path=str(path)))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="cannot read .*broken.parquet as Parquet"):
        iter_corpus(DataConfig(path=str(broken)))
    (tmp_path / "ds" / "state.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read the saved dataset"):
        iter_corpus(DataConfig(path=str(tmp_path / "ds"), text_field="content"))


def test_cli_reports_a_missing_column_in_one_line(datasets, tmp_path: Path, rows: dict[str, list], capsys) -> None:
    from lhtcli.cli import main

    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "a.parquet"))
    with pytest.raises(SystemExit) as info:
        main(["train", "--set", f"data.path={tmp_path / 'a.parquet'}", "--set", "logging.backend=none",
              "--set", f"logging.dir={tmp_path / 'runs'}", "--set", f"logging.checkpoint_dir={tmp_path / 'ck'}"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2
    assert err.startswith("error: ") and "\n" not in err
    assert "has no column 'text'" in err and "data.text_field" in err
