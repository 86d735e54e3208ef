"""The zero-setup corpus: Python's own documentation, shipped with every CPython.

The language reference topics of ``pydoc_data.topics`` (one document per topic) and, optionally,
the docstrings of a fixed list of pure-Python standard-library modules (one document per module).
Only prose survives: code, grammar productions, doctests and tables are dropped, and a paragraph
seen before anywhere in the corpus is not repeated.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from functools import lru_cache
from pathlib import Path
from typing import TypeGuard

from lhtcli.data.documents import Document, normalize_whitespace, split_sentences
from lhtcli.data.stdlib_source import comment_sections, parse_source, read_source, stdlib_module_files

# The ~120 standard-library modules with the most docstring prose (~1M characters), read from source.
# Modules removed in Python 3.13 are left out so the corpus stays similar across versions.
DOCSTRING_MODULES = (
    "abc", "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.locks", "asyncio.protocols",
    "asyncio.streams", "asyncio.tasks", "asyncio.transports", "asyncio.unix_events", "base64", "bdb",
    "bisect", "bz2", "calendar", "cmd", "code", "codecs", "collections", "concurrent.futures.process",
    "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest",
    "email.charset", "email.header", "email.headerregistry", "email.message", "email.policy", "enum",
    "fileinput", "fractions", "ftplib", "functools", "gettext", "gzip", "heapq", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib.abc", "importlib.metadata",
    "inspect", "ipaddress", "itertools", "json", "json.decoder", "json.encoder", "locale", "logging",
    "logging.config", "logging.handlers", "lzma", "mailbox", "mimetypes", "numbers", "optparse", "os",
    "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "poplib", "pprint", "pydoc", "queue",
    "random", "re", "shelve", "shutil", "site", "smtplib", "socket", "socketserver", "ssl", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "typing", "unittest", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "venv",
    "wave", "wsgiref.handlers", "wsgiref.validate", "xml.etree.ElementTree", "xml.sax.handler",
    "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server", "zipfile", "zoneinfo",
)  # fmt: skip

_UNDERLINE = re.compile(r"^\s*([*=\-~^\"'#+`:.])\1{2,}\s*$")
_TABLE_LINE = re.compile(r"^\s*(\+[-=+]+\+|\|.*\||=+( +=+)+)\s*$")
_BULLET = re.compile(r"^(?:[*\-+•]|\d+\.|\(\d+\)|[a-z]\.)\s+")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.(\s|$)|\$ |%|\{|\}|[\w.]+\(.*\)\s*$)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _blocks(text: str) -> list[tuple[bool, list[str]]]:
    """Blank-line separated blocks, with headings (a line underlined by ``***``/``===``/…) marked."""
    lines = text.expandtabs(8).splitlines()
    blocks: list[tuple[bool, list[str]]] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            blocks.append((False, list(current)))
            current.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        nxt = lines[i + 1].rstrip() if i + 1 < len(lines) else ""
        if line.strip() and not _UNDERLINE.match(line) and _UNDERLINE.match(nxt) and _indent(line) == 0:
            flush()
            blocks.append((True, [line.strip()]))
            i += 2
            continue
        if not line.strip():
            flush()
        elif not _UNDERLINE.match(line):
            current.append(line)
        i += 1
    flush()
    return blocks


def _is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    if len(words) < 3:
        return False
    letters = sum(map(str.isalpha, paragraph))
    return letters >= 0.6 * len(paragraph.replace(" ", ""))


Section = tuple[str | None, list[str]]  # (heading, prose paragraphs)


def prose_sections(text: str) -> list[Section]:
    """Sections of prose paragraphs from reST-like text; code, grammar and tables are dropped.

    A block indented by 3 or more beyond the text of the prose before it is a literal (code) block,
    which is how both the rendered topics and docstrings show examples.
    """
    sections: list[Section] = [(None, [])]
    prose_indent = 0
    for is_heading, lines in _blocks(text):
        if is_heading:
            sections.append((normalize_whitespace(lines[0]), []))
            prose_indent = 0
            continue
        first = lines[0]
        if _indent(first) >= prose_indent + 3:
            continue
        if any("::=" in ln for ln in lines) or _TABLE_LINE.match(first) or _CODE_LINE.match(first):
            continue
        kept = [ln for ln in lines if not _CODE_LINE.match(ln) and not _TABLE_LINE.match(ln)]
        if not kept:
            continue
        # The text of a bullet continues at the indent of its second line.
        prose_indent = _indent(kept[1]) if len(kept) > 1 else _indent(first)
        paragraph = _BULLET.sub("", normalize_whitespace(" ".join(kept)))
        if _is_prose(paragraph):
            sections[-1][1].append(paragraph)
    return [s for s in sections if s[1]]


def _document(sections: list[Section], seen: set[str]) -> Document:
    """Sentences per section, skipping paragraphs already seen; a section left with only its heading goes."""
    document: Document = []
    for heading, paragraphs in sections:
        sentences: list[str] = []
        for paragraph in paragraphs:
            if paragraph in seen:
                continue
            seen.add(paragraph)
            sentences.extend(split_sentences(paragraph))
        if sentences:
            document.append(([heading] if heading else []) + sentences)
    return document


def _topic_documents(seen: set[str]) -> list[Document]:
    from pydoc_data.topics import topics

    documents = []
    for name in sorted(topics):
        document = _document(prose_sections(topics[name]), seen)
        if document:
            documents.append(document)
    return documents


def _module_source(name: str) -> str | None:
    """The module's source text, found without importing it; None for modules written in C."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec else None
    if not origin or not origin.endswith(".py"):
        return None
    try:
        return Path(origin).read_text(encoding="utf-8")
    except OSError:
        return None


def _docstring_sections(name: str) -> list[str]:
    """Docstrings of the module, then of each public class (with its methods) and function, in source order.

    They are read from the source with ``ast`` rather than from imported objects: importing runs
    code, and other libraries monkeypatch stdlib functions (torch replaces ``inspect.getfile``), so
    what an import shows depends on what else was imported; the source does not.
    """
    source = _module_source(name)
    if source is None:
        # A C module (itertools) only contributes its module docstring, which no import changes.
        try:
            doc = importlib.import_module(name).__doc__
        except ImportError:  # a trimmed-down Python may lack a module; the corpus just shrinks
            return []
        return [inspect.cleandoc(doc)] if isinstance(doc, str) else []
    tree = parse_source(source)
    return _tree_docstrings(tree) if tree else []


def _tree_docstrings(tree: ast.Module) -> list[str]:
    entries = [ast.get_docstring(tree) or ""]
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            parts = [ast.get_docstring(node) or ""]
            for member in node.body:
                if _is_def(member) and (not member.name.startswith("_") or member.name == "__init__"):
                    parts.append(ast.get_docstring(member) or "")
            entries.append("\n\n".join(p for p in parts if p))
        elif _is_def(node) and not node.name.startswith("_"):
            entries.append(ast.get_docstring(node) or "")
    return [e for e in entries if e]


def _is_def(node: ast.AST) -> TypeGuard[ast.FunctionDef | ast.AsyncFunctionDef]:
    return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)


def _docstring_document(docstrings: list[str], seen: set[str]) -> Document:
    sections: list[Section] = []
    for doc in docstrings:
        # Headings inside docstrings ("Parameters") only add noise; one section per object.
        paragraphs = [p for _heading, section in prose_sections(doc) for p in section]
        if paragraphs:
            sections.append((None, paragraphs))
    return _document(sections, seen)


def _docstring_documents(seen: set[str]) -> list[Document]:
    documents = [_docstring_document(_docstring_sections(name), seen) for name in DOCSTRING_MODULES]
    return [document for document in documents if document]


def _stdlib_documents(seen: set[str]) -> list[Document]:
    """Docstrings of the stdlib modules not in DOCSTRING_MODULES, then the comments of every module."""
    curated = set(DOCSTRING_MODULES)
    parsed = []
    for name, path in stdlib_module_files():
        source = read_source(path)
        if source is not None:
            parsed.append((name, source, parse_source(source)))
    documents = [
        _docstring_document(_tree_docstrings(tree), seen) for name, _source, tree in parsed
        if tree is not None and name not in curated
    ]
    for _name, source, tree in parsed:
        documents.append(_document([(None, section) for section in comment_sections(source, tree)], seen))
    return [document for document in documents if document]


@lru_cache(maxsize=2)
def _builtin(include_docstrings: bool, include_stdlib: bool) -> tuple[tuple[tuple[str, ...], ...], ...]:
    seen: set[str] = set()
    documents = _topic_documents(seen)
    if include_docstrings:
        documents += _docstring_documents(seen)
    if include_stdlib:
        documents += _stdlib_documents(seen)
    return tuple(tuple(tuple(section) for section in doc) for doc in documents)


def builtin_documents(include_docstrings: bool = True, include_stdlib: bool = False) -> list[Document]:
    """The built-in corpus in a fixed order (a fresh copy each call: callers may modify it).

    ``include_stdlib`` appends the rest of the standard library's docstrings and its source comments
    (``stdlib_source``); the documents before them are unchanged by it.
    """
    return [[list(section) for section in doc] for doc in _builtin(include_docstrings, include_stdlib)]
