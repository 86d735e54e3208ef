"""More built-in text: every pure-Python standard-library module's docstrings and source comments.

The curated docstring list in ``builtin_corpus`` holds about 0.63M characters of prose; the rest of
the standard library (~490 modules on CPython 3.11) adds about 0.29M in docstrings and 0.69M in
comments (block comments are English prose explaining the code), after de-duplication. Everything
is read from source (``ast`` and a line scan); nothing is imported, so nothing runs.
"""

from __future__ import annotations

import ast
import bisect
import importlib.util
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from lhtcli.data.documents import normalize_whitespace

# Packages that distributions ship separately (Debian: idle, tk, lib2to3, distutils) or that hold
# tests, demos or data: left out so the corpus is the same on every CPython install of one version.
SKIPPED_PACKAGES = frozenset(
    {"test", "idlelib", "tkinter", "turtledemo", "turtle", "lib2to3", "ensurepip", "distutils", "pydoc_data",
     "this", "antigravity", "__phello__", "__hello__"}
)  # fmt: skip
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "__phello__"})

# Comment lines that carry no prose: pragmas, shebangs, encodings, separators.
_PRAGMA = re.compile(r"^(!|-\*-|\s*(noqa|type:|pragma|fmt:|pylint:|XXX\s*$|TODO\s*$))", re.IGNORECASE)
# Commented-out code rather than a sentence about it.
_CODE_COMMENT = re.compile(
    r"^\s*(>>>|\.\.\.\s|(def|class|if|elif|else|for|while|return|import|from|try|except|with|raise|yield|print)\b.*[:)]$"
    r"|[\w.\[\]]+\s*[-+*/|&]?=\s*\S|.*[;{}]\s*$)"
)
_SEPARATOR = re.compile(r"^[\W_]{3,}$")


def stdlib_module_files() -> list[tuple[str, Path]]:
    """(dotted module name, source file) of every pure-Python stdlib module, sorted by name."""
    modules: list[tuple[str, Path]] = []
    for name in sorted(sys.stdlib_module_names):
        if name in SKIPPED_PACKAGES:
            continue
        try:
            spec = importlib.util.find_spec(name)  # top-level names only: finding imports nothing
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        origin = Path(spec.origin)
        if not spec.submodule_search_locations:
            modules.append((name, origin))
            continue
        root = origin.parent
        for file in sorted(root.rglob("*.py")):
            relative = file.relative_to(root)
            if any(part in _SKIPPED_DIRS for part in relative.parts[:-1]):
                continue
            parts = [name, *relative.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules.append((".".join(parts), file))
    return sorted(modules)


def read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def parse_source(source: str) -> ast.Module | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for an odd escape: the corpus prints nothing
            return ast.parse(source)
    except (SyntaxError, ValueError):
        return None


_TRIPLE_QUOTE = re.compile(r'"""|\'\'\'')


def _comment_blocks(source: str) -> Iterator[tuple[int, list[str]]]:
    """(first line, lines) of each run of consecutive full-line comments; a bare ``#`` line splits runs.

    A line scan rather than ``tokenize`` (3x slower over the whole standard library): triple quotes
    toggle a "inside a string" state so that ``#`` lines of a docstring are not taken for comments.
    An odd quote inside a one-line string can flip that state; the corpus then gains or loses a few
    lines, the same ones on every run.
    """
    block: list[str] = []
    start = last = -2
    in_string = False
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.lstrip()
        if not in_string and stripped.startswith("#"):
            text = stripped.lstrip("# \t").rstrip()  # "# # nested" comments lose every hash
            if number != last + 1 or not text:
                if block:
                    yield start, block
                block, start = [], number
            if text:
                block.append(text)
            last = number
        if len(_TRIPLE_QUOTE.findall(line)) % 2:
            in_string = not in_string
    if block:
        yield start, block


def _prose(lines: list[str]) -> str | None:
    kept = [ln for ln in lines if not _PRAGMA.match(ln) and not _CODE_COMMENT.match(ln) and not _SEPARATOR.match(ln)]
    if len(kept) < len(lines) / 2 or not kept:
        return None  # mostly code: the rest is probably code too
    paragraph = normalize_whitespace(" ".join(kept))
    words = paragraph.split()
    letters = sum(map(str.isalpha, paragraph))
    if len(words) < 4 or letters < 0.7 * len(paragraph.replace(" ", "")):
        return None
    return paragraph


def comment_sections(source: str, tree: ast.Module | None) -> list[list[str]]:
    """Prose comment paragraphs grouped by the top-level statement (class, function) they sit in."""
    starts = [node.lineno for node in (tree.body if tree else []) if isinstance(node, ast.ClassDef | ast.FunctionDef)]
    sections: dict[int, list[str]] = {}
    for line, lines in _comment_blocks(source):
        paragraph = _prose(lines)
        if paragraph:
            sections.setdefault(bisect.bisect_right(starts, line), []).append(paragraph)
    return [sections[key] for key in sorted(sections)]
