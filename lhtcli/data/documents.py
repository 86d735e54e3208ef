"""Reading hierarchical documents (DESIGN.md section 7).

A ``Document`` is a list of sections, a section a list of sentence strings. Every reader yields
documents lazily so that a corpus larger than memory can stream through training.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lhtcli.errors import DataError

if TYPE_CHECKING:
    from lhtcli.config import DataConfig

Document = list[list[str]]

SHAPE_HINT = 'expected a list of sections, each a list of sentence strings, e.g. [["One.", "Two."], ["Three."]]'
SKIP_HINT = "fix the line or set data.skip_bad_records: true"
TEXT_SUFFIXES = (".txt", ".md")


@dataclass
class BadRecordReport:
    """Records skipped with ``data.skip_bad_records``: how many, and the first few reasons."""

    count: int = 0
    messages: list[str] = field(default_factory=list)
    max_messages: int = 5

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.messages) < self.max_messages:
            self.messages.append(message)

    def summary(self) -> str:
        if not self.count:
            return "no bad records"
        more = f" (first {len(self.messages)} shown)" if self.count > len(self.messages) else ""
        return f"skipped {self.count} bad record(s){more}: " + "; ".join(self.messages)


# ----------------------------------------------------------------------------- sentences

# Lower-cased words ending in "." after which a capitalised word does not start a new sentence.
ABBREVIATIONS = frozenset(
    {
        "e.g.", "i.e.", "etc.", "vs.", "cf.", "mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "jr.", "sr.",
        "no.", "fig.", "figs.", "eq.", "al.", "approx.", "inc.", "ltd.", "co.", "corp.", "dept.", "est.",
        "vol.", "ch.", "sec.", "p.", "pp.", "u.s.", "u.k.", "a.m.", "p.m.", "resp.", "ca.", "viz.",
    }
)  # fmt: skip
_BOUNDARY = re.compile(r"[.!?][\"')\]\u201d\u2019]*\s+(?=[\"'(\[\u201c\u2018]?[A-Z0-9])")
_SPACES = re.compile(r"\s+")


def normalize_whitespace(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences after ``. ! ?`` followed by whitespace and a capital, digit or quote."""
    text = normalize_whitespace(text)
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        space = text.rfind(" ", start, match.start())
        word = text[space + 1 if space >= 0 else start : match.start() + 1]
        # An initial such as "J. Smith" is not a sentence end either.
        if word.lower() in ABBREVIATIONS or (len(word) == 2 and word[0].isupper() and word[1] == "."):
            continue
        sentence = text[start : match.end()].strip()
        if sentence:
            sentences.append(sentence)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


# ----------------------------------------------------------------------------- shape validation


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _shape_problem(obj: Any) -> Document | str:
    """The cleaned document, or a sentence saying what is wrong with its shape."""
    if not isinstance(obj, list):
        return f"the document is {_describe(obj)}; {SHAPE_HINT}"
    document: Document = []
    for i, section in enumerate(obj):
        if not isinstance(section, list):
            return f"section {i + 1} is {_describe(section)}, not a list of sentences; {SHAPE_HINT}"
        sentences: list[str] = []
        for j, sentence in enumerate(section):
            if not isinstance(sentence, str):
                return f"section {i + 1}, sentence {j + 1} is {_describe(sentence)}, not a string; {SHAPE_HINT}"
            if sentence.strip():
                sentences.append(sentence)
        if sentences:
            document.append(sentences)
    if not document:
        return "the document has no text (every section and sentence is empty)"
    return document


def parse_document(obj: Any, where: str, hint: str = "") -> Document:
    """Validate a nested JSON value as a document; empty sentences and sections are dropped.

    ``where`` names the source in the error (``"corpus.jsonl line 17"``); ``hint`` is appended to it.
    """
    result = _shape_problem(obj)
    if isinstance(result, str):
        raise DataError(f"{where}: {result}" + (f"; {hint}" if hint else ""))
    return result


# ----------------------------------------------------------------------------- JSONL


def value_to_document(value: Any) -> Document | None | str:
    """A record's text value as a document: plain text is split (``text_to_document``), nested lists
    are taken as they are. ``None`` for text without words (an empty row: nothing to train on), else
    a sentence saying what is wrong."""
    if isinstance(value, str):
        return text_to_document(value) or None
    if not isinstance(value, list):
        return f"the text is {_describe(value)}; expected plain text or nested lists ({SHAPE_HINT})"
    return _shape_problem(value)


def accept_record(
    where: str, result: Document | None | str, skip_bad_records: bool, report: BadRecordReport | None
) -> Document | None:
    """One parsed record: a document passes, None (an empty text) is dropped silently, and a problem message
    is an error, or with ``data.skip_bad_records`` a warning in ``report`` and the record dropped."""
    if not isinstance(result, str):
        return result
    if not skip_bad_records:
        raise DataError(f"{where}: {result}; {SKIP_HINT}")
    if report is not None:
        report.add(f"{where}: {result}")
    return None


def _parse_jsonl_line(raw: bytes, text_field: str, first: bool) -> Document | None | str:
    """A document, ``None`` for a blank line (or a record without text), or a problem description."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 (byte {exc.start}); save the file as UTF-8"
    if first:
        line = line.removeprefix("\ufeff")
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return "invalid JSON (nested too deeply)"
    if not isinstance(obj, dict):
        return f"expected a JSON object with a {text_field!r} field, got {_describe(obj)}"
    if text_field not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        return f"no {text_field!r} field (keys: {keys}); set data.text_field to the field holding the text"
    return value_to_document(obj[text_field])


def read_jsonl(
    path: str | Path,
    text_field: str = "text",
    skip_bad_records: bool = False,
    report: BadRecordReport | None = None,
) -> Iterator[Document]:
    """Documents of a JSONL file, one JSON object per line, read line by line."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path} line {number}"
            document = accept_record(where, _parse_jsonl_line(raw, text_field, number == 1), skip_bad_records, report)
            if document is not None:
                yield document


# ----------------------------------------------------------------------------- plain text and Markdown

_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_LIST_MARKER = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def parse_text(text: str, markdown: bool = False) -> Document:
    """Sections from Markdown headings (``markdown=True``) or, without headings, blank-line blocks.

    A heading's text opens its section as a sentence; fenced code blocks are skipped.
    """
    # Each entry: (starts a heading section, paragraph text).
    paragraphs: list[tuple[bool, str]] = []
    block: list[str] = []
    in_fence = False

    def flush() -> None:
        if block:
            paragraphs.append((False, " ".join(block)))
            block.clear()

    for line in text.splitlines():
        if markdown and _FENCE.match(line):
            flush()
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if not line.strip():
            flush()
            continue
        if markdown:
            heading = _ATX_HEADING.match(line)
            if heading:
                flush()
                paragraphs.append((True, heading.group(2)))
                continue
            if _SETEXT_UNDERLINE.match(line) and len(block) == 1:
                paragraphs.append((True, block.pop()))
                continue
            # Table rows and rules carry no sentences.
            if line.lstrip().startswith("|") or _TABLE_RULE.match(line) or _SETEXT_UNDERLINE.match(line):
                continue
            line = _LIST_MARKER.sub("", line)
        block.append(line.strip())
    flush()

    has_headings = any(is_heading for is_heading, _ in paragraphs)
    document: Document = []
    for is_heading, paragraph in paragraphs:
        sentences = split_sentences(paragraph)
        if not sentences:
            continue
        if not document or is_heading or not has_headings:
            document.append([])
        document[-1].extend(sentences)
    return [section for section in document if section]


def text_to_document(text: str) -> Document:
    """Plain text from a JSONL field or a dataset column: the README's rules ("Plain text").

    Markdown headings (``# Title``) open sections; without any heading every blank-line separated
    paragraph is a section. Sentences end at ``. ! ?`` before a capital, digit or quote.
    """
    return parse_text(text, markdown=True)


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None


def text_files(folder: str | Path) -> list[Path]:
    """The .txt/.md files under ``folder`` (recursive), in a stable sorted order."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())


def read_text_folder(path: str | Path) -> Iterator[Document]:
    """One document per .txt/.md file under ``path``; files without text are skipped."""
    for file in text_files(path):
        document = parse_text(_read_text_file(file), markdown=file.suffix.lower() == ".md")
        if document:
            yield document


# ----------------------------------------------------------------------------- single documents and corpora

DOCUMENT_FILE_HINT = 'give a .json file holding [["sentence", ...], ...] or {"text": [[...]]}, or a .txt/.md file'


def load_document_file(path: str | Path) -> Document:
    """The document of ``--document FILE``: .json (nested list or object with "text"), .jsonl, .txt, .md."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"document file not found: {path}; {DOCUMENT_FILE_HINT}")
    if path.is_dir():
        raise DataError(f"--document expects a file, got the directory {path}; {DOCUMENT_FILE_HINT}")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        document = parse_text(_read_text_file(path), markdown=suffix == ".md")
        if not document:
            raise DataError(f"{path} has no text; {DOCUMENT_FILE_HINT}")
        return document
    if suffix == ".jsonl":
        for document in read_jsonl(path):
            return document
        raise DataError(f"{path} has no records; {DOCUMENT_FILE_HINT}")
    if suffix != ".json":
        raise DataError(f"unsupported document file type {path.suffix or '(none)'!r}: {path}; {DOCUMENT_FILE_HINT}")
    text = _read_text_file(path)
    if not text.strip():
        raise DataError(f"{path} is empty; {DOCUMENT_FILE_HINT}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); {DOCUMENT_FILE_HINT}") from None
    except RecursionError:
        raise DataError(f"{path} is not valid JSON (nested too deeply); {DOCUMENT_FILE_HINT}") from None
    if isinstance(obj, dict):
        if "text" not in obj:
            raise DataError(f'{path}: the JSON object has no "text" field; {DOCUMENT_FILE_HINT}')
        obj = obj["text"]
    return parse_document(obj, str(path))


def _non_empty(documents: Iterator[Document], message: str) -> Iterator[Document]:
    """Pass ``documents`` through; a DataError with ``message`` when there are none at all."""
    empty = True
    for document in documents:
        empty = False
        yield document
    if empty:
        raise DataError(message)


CORPUS_HINT = (
    "give 'builtin', a .jsonl/.json file, a folder of .txt/.md files, a .parquet file (or a folder of them) "
    "or a Hugging Face dataset folder written by save_to_disk"
)


def _read_json_array(path: Path, text_field: str, skip_bad_records: bool,
                     report: BadRecordReport | None) -> Iterator[Document]:
    """A .json file holding one JSON array of records (read whole: use JSON Lines for a large corpus)."""
    text = _read_text_file(path)
    try:
        records = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        detail = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise DataError(f"{path} is not valid JSON ({detail}); give JSON Lines or one JSON array of records") from None
    for number, record in enumerate(records, start=1):
        if isinstance(record, dict) and text_field in record:
            result = value_to_document(record[text_field])
        elif isinstance(record, dict):
            keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
            result = f"no {text_field!r} field (keys: {keys}); set data.text_field to the field holding the text"
        else:
            result = f"expected a JSON object with a {text_field!r} field, got {_describe(record)}"
        document = accept_record(f"{path} record {number}", result, skip_bad_records, report)
        if document is not None:
            yield document


def _json_is_array(path: Path) -> bool:
    """Whether a .json file is one JSON array rather than JSON Lines (what ``Dataset.to_json`` writes)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    return head.startswith(b"[")


def iter_corpus(data_cfg: DataConfig, report: BadRecordReport | None = None) -> Iterator[Document]:
    """The documents named by ``data.path`` (``CORPUS_HINT`` lists the kinds of input).

    The path (and, for datasets and Parquet, the text column) is checked now; the documents are
    read lazily, so a corpus larger than memory streams.
    """
    if data_cfg.path == "builtin":
        from lhtcli.data.builtin_corpus import builtin_documents

        return iter(builtin_documents(data_cfg.builtin_docstrings, data_cfg.builtin_stdlib))
    from lhtcli.data import hf_inputs

    path = Path(data_cfg.path).expanduser()
    name = repr(data_cfg.path)
    empty = f"data.path {name} holds no documents (it is empty, has only blank records or every record was skipped)"
    if not path.exists():
        raise DataError(f"data.path {name} does not exist; {CORPUS_HINT}")
    if hf_inputs.is_saved_dataset(path) or hf_inputs.parquet_files(path) and not (path.is_dir() and text_files(path)):
        field, split = data_cfg.text_field, data_cfg.split
        hf_inputs.check_hf_input(path, field, split)
        return _non_empty(hf_inputs.read_hf_input(path, field, split, data_cfg.skip_bad_records, report), empty)
    if path.is_dir():
        if not text_files(path):
            raise DataError(f"data.path {name} is a folder without .txt, .md or .parquet files; {CORPUS_HINT}")
        return _non_empty(read_text_folder(path), f"data.path {name}: no .txt/.md file in it has text")
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or suffix == ".json" and not _json_is_array(path):
        return _non_empty(read_jsonl(path, data_cfg.text_field, data_cfg.skip_bad_records, report), empty)
    if suffix == ".json":
        return _non_empty(_read_json_array(path, data_cfg.text_field, data_cfg.skip_bad_records, report), empty)
    if suffix in TEXT_SUFFIXES:
        document = parse_text(_read_text_file(path), suffix == ".md")
        if not document:
            raise DataError(f"data.path {name} has no text")
        return iter([document])
    raise DataError(f"unsupported data.path {name} (type {path.suffix or 'none'!r}); {CORPUS_HINT}")


# ----------------------------------------------------------------------------- train/validation split


def _digest(document: Document) -> bytes:
    encoded = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.blake2b(encoded, digest_size=16).digest()


def _score(digest: bytes, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the seed and the document's content."""
    mixed = hashlib.blake2b(digest, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(mixed, "big") / 2**64


def split_documents(
    documents: Iterable[Document],
    validation_fraction: float,
    seed: int,
    part: Literal["train", "validation"],
) -> Iterator[Document]:
    """One side of a deterministic split by document, decided while streaming.

    A document is held out when a hash of the seed and its content falls below
    ``validation_fraction``, so identical documents always land on the same side. With a non-zero
    fraction and at least two documents, the first document is always held out, so validation is
    never empty; a one-document corpus is all training.
    """
    want_validation = part == "validation"
    if validation_fraction <= 0:
        if not want_validation:
            yield from documents
        return
    iterator = iter(documents)
    first = next(iterator, None)
    if first is None:
        return
    second = next(iterator, None)
    if second is None:
        if not want_validation:
            yield first
        return
    if want_validation:
        yield first
    first_digest = _digest(first)

    def rest() -> Iterator[Document]:
        yield second
        yield from iterator

    for document in rest():
        digest = _digest(document)
        held_out = digest == first_digest or _score(digest, seed) < validation_fraction
        if held_out == want_validation:
            yield document


def split_by_document(
    documents_factory: Callable[[], Iterable[Document]],
    validation_fraction: float,
    seed: int,
) -> tuple[Callable[[], Iterator[Document]], Callable[[], Iterator[Document]]]:
    """Re-iterable (training, validation) document sources over the same corpus; they never overlap."""

    def train() -> Iterator[Document]:
        return split_documents(documents_factory(), validation_fraction, seed, "train")

    def validation() -> Iterator[Document]:
        return split_documents(documents_factory(), validation_fraction, seed, "validation")

    return train, validation
