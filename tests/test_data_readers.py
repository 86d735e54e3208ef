"""Corpus readers: JSONL, text folders, single document files, the built-in corpus, the split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lhtcli.config import DataConfig
from lhtcli.data.builtin_corpus import builtin_documents, prose_sections
from lhtcli.data.documents import (
    BadRecordReport,
    iter_corpus,
    load_document_file,
    parse_document,
    parse_text,
    read_jsonl,
    read_text_folder,
    split_by_document,
    split_documents,
    split_sentences,
)
from lhtcli.errors import DataError

DOC_A = [["First sentence.", "Second one."], ["New section."]]
DOC_B = [["Only sentence."]]


def write_jsonl(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


# ----------------------------------------------------------------------------- JSONL


def test_read_jsonl_reads_nested_documents_and_drops_empty_parts(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            json.dumps({"text": DOC_A, "id": 1}),
            "",
            "   ",
            json.dumps({"text": [["", "Kept."], [], ["  "], ["Also kept."]]}),
        ],
    )
    assert list(read_jsonl(path)) == [DOC_A, [["Kept."], ["Also kept."]]]


def test_read_jsonl_custom_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"body": DOC_B})])
    assert list(read_jsonl(path, text_field="body")) == [DOC_B]


BAD_LINES = {
    "invalid JSON": b'{"text": [["a"]',
    "JSON object": b'[["a"]]',
    "'text' field": b'{"body": [["a"]]}',
    "the text is a boolean": b'{"text": true}',
    "section 1 is a string": b'{"text": ["plain", "text"]}',
    "a number": b'{"text": [["ok", 3]]}',
    "null": b'{"text": [["ok"], null]}',
    "no text": b'{"text": [[""], []]}',
    "UTF-8": b'{"text": [["caf\xe9"]]}',
}


@pytest.mark.parametrize("expected, line", list(BAD_LINES.items()), ids=list(BAD_LINES))
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, expected: str, line: bytes) -> None:
    path = write_jsonl(tmp_path / "corpus.jsonl", [json.dumps({"text": DOC_A}), b"", line])
    with pytest.raises(DataError) as info:
        list(read_jsonl(path))
    message = str(info.value)
    assert f"{path} line 3:" in message
    assert expected in message
    assert "data.skip_bad_records: true" in message


def test_skip_bad_records_counts_them(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl", [json.dumps({"text": DOC_A}), *BAD_LINES.values(), json.dumps({"text": DOC_B})]
    )
    report = BadRecordReport()
    assert list(read_jsonl(path, skip_bad_records=True, report=report)) == [DOC_A, DOC_B]
    assert report.count == len(BAD_LINES)
    assert len(report.messages) == report.max_messages
    assert "line 2" in report.messages[0]
    assert str(report.count) in report.summary()


def test_read_jsonl_is_lazy(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"text": DOC_A}), b"not json"])
    documents = read_jsonl(path)
    assert next(documents) == DOC_A
    with pytest.raises(DataError, match="line 2"):
        next(documents)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [b"\xef\xbb\xbf" + json.dumps({"text": DOC_B}).encode()])
    assert list(read_jsonl(path)) == [DOC_B]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parse_document_accepts_or_explains_any_json(value: object) -> None:
    try:
        document = parse_document(value, "doc.json")
    except DataError as exc:
        assert str(exc).startswith("doc.json: ")
        return
    assert document and all(section for section in document)
    assert all(isinstance(s, str) and s.strip() for section in document for s in section)


# ----------------------------------------------------------------------------- text and Markdown


def test_split_sentences_respects_abbreviations() -> None:
    text = 'It works, e.g. Here and i.e. There. Mr. Smith met J. Doe! Then "quoted" text? 42 follows. etc. end'
    assert split_sentences(text) == [
        "It works, e.g. Here and i.e. There.",
        "Mr. Smith met J. Doe!",
        'Then "quoted" text?',
        "42 follows. etc. end",
    ]
    assert split_sentences("Version 3.12 is out. Pi is 3.14.") == ["Version 3.12 is out.", "Pi is 3.14."]


def test_markdown_headings_make_sections_and_code_is_skipped() -> None:
    text = "Intro text. More.\n\n# Title\n\nPara one.\n\n```python\nx = 1. Y = 2\n```\nPara two.\n\nSub\n---\n- item.\n"
    assert parse_text(text, markdown=True) == [
        ["Intro text.", "More."],
        ["Title", "Para one.", "Para two."],
        ["Sub", "item."],
    ]


def test_blank_line_blocks_make_sections_without_headings() -> None:
    assert parse_text("A b c. D e.\nf g.\n\n\nH i.\n") == [["A b c.", "D e. f g."], ["H i."]]


def test_read_text_folder_recursive_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Second file.\n")
    (tmp_path / "a.md").write_text("# A\n\nFirst file.\n")
    (tmp_path / "sub" / "c.txt").write_text("Third file.\n\nTwo blocks.\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "ignored.json").write_text("[]")
    assert list(read_text_folder(tmp_path)) == [
        [["A", "First file."]],
        [["Second file."]],
        [["Third file."], ["Two blocks."]],
    ]


def test_non_utf8_text_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(DataError, match="bad.txt is not valid UTF-8"):
        list(read_text_folder(tmp_path))


# ----------------------------------------------------------------------------- single document files


def test_load_document_file_formats(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps(DOC_A))
    (tmp_path / "obj.json").write_text(json.dumps({"text": DOC_B}))
    (tmp_path / "doc.md").write_text("# Head\n\nBody text.\n")
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": DOC_A}) + "\n")
    assert load_document_file(tmp_path / "list.json") == DOC_A
    assert load_document_file(tmp_path / "obj.json") == DOC_B
    assert load_document_file(tmp_path / "doc.md") == [["Head", "Body text."]]
    assert load_document_file(tmp_path / "doc.jsonl") == DOC_A


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.json", None, "not found"),
        ("empty.json", "", "is empty"),
        ("broken.json", "[[", "not valid JSON"),
        ("field.json", '{"body": []}', 'no "text" field'),
        ("shape.json", '["a", "b"]', "section 1 is a string"),
        ("blank.txt", "\n", "has no text"),
        ("doc.csv", "a,b", "unsupported document file type"),
    ],
)
def test_load_document_file_errors_have_a_fix(tmp_path: Path, name: str, content: str | None, expected: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=expected) as info:
        load_document_file(path)
    assert ".json" in str(info.value)  # every message names the accepted formats or the file


# ----------------------------------------------------------------------------- corpus dispatch


def test_iter_corpus_dispatch(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"text": DOC_A})])
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "x.txt").write_text("Some text.\n")
    assert list(iter_corpus(DataConfig(path=str(jsonl)))) == [DOC_A]
    assert list(iter_corpus(DataConfig(path=str(folder)))) == [[["Some text."]]]
    assert len(list(iter_corpus(DataConfig(path="builtin", builtin_docstrings=False, builtin_stdlib=False)))) > 50


def test_iter_corpus_missing_path_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.path"):
        iter_corpus(DataConfig(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="without .txt, .md or .parquet"):
        iter_corpus(DataConfig(path=str(tmp_path)))


def test_iter_corpus_skip_bad_records(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "c.jsonl", [b"oops", json.dumps({"text": DOC_A})])
    report = BadRecordReport()
    assert list(iter_corpus(DataConfig(path=str(jsonl), skip_bad_records=True), report)) == [DOC_A]
    assert report.count == 1


# ----------------------------------------------------------------------------- train/validation split


def numbered_docs(n: int) -> list[list[list[str]]]:
    return [[[f"Document number {i}."]] for i in range(n)]


def test_split_is_disjoint_complete_and_deterministic() -> None:
    docs = numbered_docs(400)
    train, validation = split_by_document(lambda: iter(docs), 0.1, seed=7)
    train_docs, val_docs = list(train()), list(validation())
    assert len(train_docs) + len(val_docs) == len(docs)
    assert not {json.dumps(d) for d in train_docs} & {json.dumps(d) for d in val_docs}
    assert 15 <= len(val_docs) <= 70
    assert list(train()) == train_docs and list(validation()) == val_docs
    _, other_seed = split_by_document(lambda: iter(docs), 0.1, seed=8)
    assert list(other_seed()) != val_docs


def test_split_holds_out_at_least_one_document() -> None:
    docs = numbered_docs(2)
    assert len(list(split_documents(docs, 0.001, 0, "validation"))) >= 1
    assert len(list(split_documents(docs, 0.001, 0, "train"))) >= 1
    assert list(split_documents(docs[:1], 0.5, 0, "train")) == docs[:1]
    assert list(split_documents(docs[:1], 0.5, 0, "validation")) == []
    assert list(split_documents(docs, 0.0, 0, "validation")) == []
    assert list(split_documents(docs, 0.0, 0, "train")) == docs


def test_duplicate_documents_stay_on_one_side() -> None:
    docs = numbered_docs(50) * 2
    val = list(split_documents(docs, 0.2, 3, "validation"))
    train = list(split_documents(docs, 0.2, 3, "train"))
    assert not {json.dumps(d) for d in train} & {json.dumps(d) for d in val}


# ----------------------------------------------------------------------------- built-in corpus


def test_builtin_corpus_is_prose_and_deterministic() -> None:
    topics = builtin_documents(include_docstrings=False)
    everything = builtin_documents(include_docstrings=True)
    assert len(topics) > 50
    assert len(everything) > len(topics)
    assert everything[: len(topics)] == topics
    sentences = [s for doc in everything for section in doc for s in section]
    assert not any(s.lstrip().startswith((">>>", "...")) or "::=" in s for s in sentences)
    assert all(s == s.strip() and "\n" not in s for s in sentences)
    paragraphs_words = sum(len(s.split()) for s in sentences)
    assert paragraphs_words > 30_000
    everything[0][0][0] = "mutated"
    assert builtin_documents(include_docstrings=True)[0][0][0] != "mutated"


def test_rest_parser_drops_code_grammar_and_tables() -> None:
    text = (
        "Title\n*****\n\nSome prose here, about lists:\n\n   x = [1, 2]\n   print(x)\n\n"
        "   stmt ::= expr\n\n+-----+-----+\n| a   | b   |\n+-----+-----+\n\n>>> 1 + 1\n2\n\n"
        "* A bullet with enough words\n  continued here.\n\n  Note: nested prose in the bullet.\n\n"
        "Sub\n===\n\nFinal words are here.\n"
    )
    assert prose_sections(text) == [
        (
            "Title",
            [
                "Some prose here, about lists:",
                "A bullet with enough words continued here.",
                "Note: nested prose in the bullet.",
            ],
        ),
        ("Sub", ["Final words are here."]),
    ]


def test_builtin_stdlib_extends_the_corpus_and_leaves_it_unchanged() -> None:
    base = builtin_documents(include_docstrings=True)
    full = builtin_documents(include_docstrings=True, include_stdlib=True)
    assert full[: len(base)] == base  # the held-out documents of the smaller corpus stay the same

    def chars(docs: list) -> int:
        return sum(len(s) for d in docs for section in d for s in section)

    assert chars(full) > 1.8 * chars(base)
    added = [s for d in full[len(base) :] for section in d for s in section]
    assert all(s == s.strip() and "\n" not in s for s in added)
    # Code is dropped; a docstring's inline example may slip through now and then.
    assert sum(s.startswith(("#", ">>>")) for s in added) <= len(added) / 1000


def test_comment_sections_keep_prose_and_drop_code() -> None:
    import ast

    from lhtcli.data.stdlib_source import comment_sections

    source = (
        "#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n"
        "# This module shows how comments become prose paragraphs.\n# The second line joins the first.\n"
        "import os\n\n"
        "def f():\n"
        '    """Docstring.\n\n    # Not a comment but a line in a string, kept out.\n    """\n'
        "    # x = compute(a, b)\n"
        "    # Explain why the loop below stops early on errors.\n"
        "    return 1  # trailing comments are not paragraphs\n"
        "\n"
        "class C:\n    # Another section starts with the class body.\n    pass\n"
    )
    assert comment_sections(source, ast.parse(source)) == [
        ["This module shows how comments become prose paragraphs. The second line joins the first."],
        ["Explain why the loop below stops early on errors."],
        ["Another section starts with the class body."],
    ]
