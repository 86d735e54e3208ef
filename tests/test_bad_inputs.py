"""Bad input never crashes ``lht``: a table of broken corpora, tokenizers, configs and checkpoints.

Each row runs the real CLI entry point (in-process) and expects DESIGN.md section 9: exit code 2,
``error: ...`` on stderr naming the file and line or the config field, no traceback. Data errors are
one line; a config error is a header plus one line per problem (``config validate`` lists them all).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from training_helpers import tiny_overrides, write_corpus

from lhtcli.cli import main
from lhtcli.data.documents import load_document_file, read_jsonl
from lhtcli.errors import DataError

GOOD_LINES = 24  # write_corpus's documents: a bad line appended to them is line 25


@dataclass
class Bad:
    """One bad input: files to write (bytes, or None for a directory), overrides, expected text."""

    files: dict[str, bytes | None] = field(default_factory=dict)
    sets: dict[str, object] = field(default_factory=dict)
    expect: tuple[str, ...] = ()
    argv: tuple[str, ...] = ()
    config_error: bool = False
    good_prefix: bool = False  # write the good corpus first, so the bad record is line 25


def line(record: bytes, *expect: str) -> Bad:
    return Bad(files={"bad.jsonl": record}, sets={"data.path": "bad.jsonl"},
               expect=(f"bad.jsonl line {GOOD_LINES + 1}:", *expect), good_prefix=True)


def corpus_file(name: str, content: bytes | None, *expect: str) -> Bad:
    return Bad(files={name: content}, sets={"data.path": name}, expect=(name, *expect))


def tokenizer(content: bytes | None, *expect: str, name: str = "tok.json") -> Bad:
    files = {name: content} if content is not False else {}
    return Bad(files=files, sets={"data.tokenizer": name}, expect=(name, *expect))


def setting(key: str, value: object, *expect: str, **more: object) -> Bad:
    return Bad(sets={key: value, **more}, expect=(key.split(".")[-1], *expect), config_error=True)


def _foreign_tokenizer_without_mask() -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[CLS]": 1, "[PAD]": 2, "word": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[UNK]", "[CLS]", "[PAD]"])
    return tok.to_str().encode()


CASES: dict[str, Bad] = {
    # ---- JSON lines: syntax, shape, encoding (the file and line are named)
    "malformed_json": line(b'{"text": [["A b."]', "invalid JSON"),
    "trailing_garbage": line(b'{"text": [["A b."]]} extra', "invalid JSON"),
    "single_quotes": line(b"{'text': [['A b.']]}", "invalid JSON"),
    "deeply_nested": line(b'{"text": ' + b"[" * 50_000, "nested too deeply"),
    "array_not_object": line(b'[["A b."]]', "expected a JSON object", "a list"),
    "bare_number_line": line(b"17", "expected a JSON object", "a number"),
    "missing_text_field": line(b'{"body": [["A b."]]}', "no 'text' field", "'body'"),
    "text_is_number": line(b'{"text": 42}', "the text is a number (42)", "plain text"),
    "text_is_null": line(b'{"text": null}', "the text is null"),
    "text_is_object": line(b'{"text": {"a": [["b"]]}}', "the text is an object"),
    "section_is_string": line(b'{"text": ["One.", "Two."]}', "section 1 is a string"),
    "section_is_null": line(b'{"text": [["A b."], null]}', "section 2 is null"),
    "section_is_number": line(b'{"text": [["A b."], 7]}', "section 2 is a number (7)"),
    "sentence_is_number": line(b'{"text": [["A b.", 3]]}', "section 1, sentence 2 is a number (3)"),
    "sentence_is_null": line(b'{"text": [[null]]}', "sentence 1 is null"),
    "sentence_is_list": line(b'{"text": [[["too", "deep"]]]}', "sentence 1 is a list"),
    "sentence_is_bool": line(b'{"text": [[true]]}', "a boolean"),
    "sentence_is_nan": line(b'{"text": [["A b.", NaN]]}', "a number (nan)"),
    "empty_document": line(b'{"text": []}', "the document has no text"),
    "empty_sentences": line(b'{"text": [["", "   "], []]}', "the document has no text"),
    "non_utf8_bytes": line(b'{"text": [["caf\xe9 au lait."]]}', "not valid UTF-8 (byte"),
    # ---- whole corpus files
    "empty_file": corpus_file("bad.jsonl", b"", "holds no documents"),
    "blank_lines_only": corpus_file("bad.jsonl", b"\n   \n\t\n", "holds no documents"),
    "utf16_file": corpus_file("bad.jsonl", json.dumps({"text": [["Hi there."]]}).encode("utf-16"),
                              "line 1", "not valid UTF-8"),
    "corpus_missing": Bad(sets={"data.path": "missing.jsonl"}, expect=("missing.jsonl", "does not exist")),
    "corpus_wrong_suffix": corpus_file("corpus.csv", b"a,b\n", "unsupported data.path"),
    "folder_without_text": Bad(files={"docs": None}, sets={"data.path": "docs"}, expect=("docs", "without .txt")),
    "text_file_non_utf8": Bad(files={"docs": None, "docs/a.txt": b"Fine.\n\xff\xfe broken\n"},
                              sets={"data.path": "docs"}, expect=("a.txt", "not valid UTF-8")),
    "text_file_blank": corpus_file("notes.txt", b"\n\n   \n", "has no text"),
    # ---- tokenizer files that are not tokenizers
    "tokenizer_not_json": tokenizer(b"this is not json", "not a Hugging Face tokenizer.json"),
    "tokenizer_other_json": tokenizer(b'{"hello": [1, 2, 3]}', "not a Hugging Face tokenizer.json"),
    "tokenizer_json_list": tokenizer(b"[1, 2]", "not a Hugging Face tokenizer.json"),
    "tokenizer_binary": tokenizer(bytes(range(256)), "not UTF-8"),
    "tokenizer_missing": tokenizer(False, "not found"),  # type: ignore[arg-type]
    "tokenizer_directory": tokenizer(None, "is a directory", name="tokdir"),
    "tokenizer_without_mask": tokenizer(_foreign_tokenizer_without_mask(), "no mask token", "[MASK]"),
    # ---- config values out of range (the field is named)
    "negative_window": setting("model.mlswa.window_size_per_level", "[4, -2, 1]", ">= 0"),
    "window_wrong_length": setting("model.mlswa.window_size_per_level", "[4, 2]", "2 entries but num_levels is 3"),
    "window_not_a_list": setting("model.mlswa.window_size_per_level", "oops", "valid list"),
    "window_null_entry": setting("model.mlswa.window_size_per_level", "[4, null, 1]", "window_size_per_level.1"),
    "layer_max_level_longer": setting("model.mlswa.layer_max_level", "[1, 2, 2]", "3 entries but num_layers is 2"),
    "layer_max_level_shorter": setting("model.mlswa.layer_max_level", "[1]", "1 entries but num_layers is 2"),
    "layer_max_level_too_high": setting("model.mlswa.layer_max_level", "[1, 3]", "num_levels - 1 = 2", "[3]"),
    "layer_max_level_negative": setting("model.mlswa.layer_max_level", "[1, -1]", "[-1]"),
    "d_model_not_multiple": setting("model.d_model", 30, "multiple of n_heads (4)", **{"model.n_heads": 4}),
    "num_steps_zero": setting("training.num_steps", 0, "greater than or equal to 1"),
    "batch_size_text": setting("training.batch_size", "lots", "valid integer", "'lots'"),
    "learning_rate_negative": setting("training.learning_rate", -1, "greater than 0"),
    "validation_fraction_one": setting("data.validation_fraction", 1.5, "less than 1"),
    "unknown_key": setting("training.num_stpes", 3, "unknown key"),
    # ---- files given on the command line
    "config_file_bad_value": Bad(files={"bad.yaml": b"training:\n  keep_checkpoints: 0\n"}, argv=("-c", "bad.yaml"),
                                 expect=("bad.yaml", "training.keep_checkpoints"), config_error=True),
    "config_file_malformed": Bad(files={"bad.yaml": b"model: [1, 2\n"}, argv=("-c", "bad.yaml"),
                                 expect=("bad.yaml", "not valid YAML", "line")),
    "resume_from_text_file": Bad(files={"notes.ckpt": b"just some notes\n"}, argv=("--resume", "notes.ckpt"),
                                 expect=("notes.ckpt", "not a readable lht checkpoint")),
    "resume_from_empty_file": Bad(files={"zero.ckpt": b""}, argv=("--resume", "zero.ckpt"),
                                  expect=("zero.ckpt", "empty")),
}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_gives_one_clear_error(case: Bad, in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = write_corpus(in_tmp / "corpus.jsonl")
    for name, content in case.files.items():
        path = in_tmp / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((corpus.read_bytes() if case.good_prefix else b"") + content)
    overrides = tiny_overrides(corpus, **{"training.num_steps": 2, **case.sets})
    argv = ["train", "-q", *case.argv] + [a for o in overrides for a in ("--set", o)]
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for text in case.expect:
        assert text in err, (text, err)
    lines = err.strip().splitlines()
    if case.config_error:  # "invalid configuration (origin):" + one line per problem
        assert len(lines) == 2 and lines[0].startswith("error: invalid configuration"), err
    else:
        assert len(lines) == 1, err
    assert not list(in_tmp.glob("checkpoints/*/*.ckpt"))  # nothing was trained, nothing half-written


def test_one_enormous_sentence_is_trained_on_not_fatal(in_tmp: Path) -> None:
    """Outcome 'recovered': a valid but huge sentence (and a 200k-character word) is split into sequences."""
    from lhtcli.config import load_config
    from lhtcli.training.trainer import run_training

    corpus = write_corpus(in_tmp / "corpus.jsonl")
    words = " ".join(["token"] * 20_000) + " " + "x" * 200_000 + "."
    with corpus.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": [[words]]}) + "\n")
    assert sum(1 for _ in read_jsonl(corpus)) == GOOD_LINES + 1
    cfg = load_config(None, tiny_overrides(corpus, **{"training.num_steps": 2, "training.eval_every": 2}))
    assert run_training(cfg, quiet=True).steps == 2


# ----------------------------------------------------------------------------- property-based: the JSONL reader

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=25,
)
records = st.one_of(
    json_values.map(lambda v: json.dumps({"text": v}).encode()),  # the field holds anything
    json_values.map(lambda v: json.dumps(v).encode()),  # the line holds anything
    st.binary(max_size=40),  # arbitrary bytes
)


@st.composite
def jsonl_files(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(records, min_size=0, max_size=5))
    data = b"\n".join(lines)
    if data and draw(st.booleans()):  # cut the file anywhere, or flip one byte
        cut = draw(st.integers(0, len(data) - 1))
        data = data[:cut] if draw(st.booleans()) else data[:cut] + bytes([data[cut] ^ 0xA5]) + data[cut + 1 :]
    return data


def _assert_document(document: object) -> None:
    assert isinstance(document, list) and document
    for section in document:
        assert isinstance(section, list) and section
        assert all(isinstance(s, str) and s.strip() for s in section)


_scratch = Path(tempfile.mkdtemp(prefix="lht-bad-inputs-"))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jsonl_files())
def test_jsonl_reader_parses_or_names_the_line(data: bytes) -> None:
    """Random nested structures, bytes and damaged files: documents or a one-line DataError, nothing else."""
    path = _scratch / "random.jsonl"
    path.write_bytes(data)
    try:
        for document in read_jsonl(path):
            _assert_document(document)
    except DataError as exc:
        message = str(exc)
        assert message.startswith(f"{path} line ") and "\n" not in message, message


@settings(max_examples=150, deadline=None)
@given(st.one_of(json_values.map(lambda v: json.dumps({"text": v})), json_values.map(json.dumps),
                 st.text(max_size=30)))
def test_document_file_parses_or_explains(text: str) -> None:
    """``--document FILE.json`` with anything in it: a document or a one-line DataError naming the file."""
    path = _scratch / "doc.json"
    path.write_text(text, encoding="utf-8")
    try:
        _assert_document(load_document_file(path))
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc), str(exc)


# ----------------------------------------------------------------------------- the inspection commands

# Files a case may ask for, made from a finished tiny run's checkpoint ({ckpt} in argv is that checkpoint).
def _files(ckpt: Path) -> dict[str, Callable[[], bytes | None]]:
    import random

    import torch

    def foreign() -> bytes:  # another architecture's weights, saved the usual way
        buffer = io.BytesIO()
        torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(10, 4),
                    "bert.encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4)}, buffer)
        return buffer.getvalue()

    return {
        "half.ckpt": lambda: ckpt.read_bytes()[: ckpt.stat().st_size // 2],
        "random.ckpt": lambda: random.Random(18).randbytes(5000),
        "empty.ckpt": lambda: b"",
        "bert.ckpt": foreign,
        "config.yaml": lambda: b"training:\n  num_steps: 3\n",
        "ckptdir": lambda: None,
        "blocker": lambda: b"a file where a directory should go",
        "bad.json": lambda: b'{"text": [["only one"',
        "empty.json": lambda: b"[]",
        "corpus.jsonl": lambda: b'{"text": [["A b."]]}\n{"text": [["C d."]]}\n',
    }


COMMAND_CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # checkpoints: truncated, random, empty, of another architecture, not a checkpoint at all, missing
    "ckpt_truncated": (("visualize", "--checkpoint", "half.ckpt", "-o", "keep.png"),
                       ("half.ckpt", "not a readable lht checkpoint")),
    "ckpt_random_bytes": (("entropy", "--checkpoint", "random.ckpt"), ("random.ckpt", "not a readable lht checkpoint")),
    "ckpt_empty": (("gradcheck", "--checkpoint", "empty.ckpt"), ("empty.ckpt", "empty (0 bytes)")),
    "ckpt_other_architecture": (("visualize", "--checkpoint", "bert.ckpt", "-o", "keep.png"),
                                ("bert.ckpt", "not an lht checkpoint")),
    "ckpt_is_a_config": (("entropy", "--checkpoint", "config.yaml"), ("config.yaml", "not a readable lht checkpoint")),
    "ckpt_missing": (("gradcheck", "--checkpoint", "nowhere.ckpt"), ("checkpoint not found: nowhere.ckpt",)),
    "resume_other_model_shape": (("train", "-q", "--resume", "{ckpt}", "--set", "model.d_model=64"),
                                 ("cannot resume from", "in the checkpoint but")),
    "set_model_with_checkpoint": (("entropy", "--checkpoint", "{ckpt}", "--set", "model.d_model=64"),
                                  ("--set model.* cannot change it",)),
    # --layer / --head / --start beyond the model or the document
    "layer_out_of_range": (("visualize", "--checkpoint", "{ckpt}", "--layer", "7", "-o", "keep.png"),
                           ("--layer 7", "2 layers")),
    "head_out_of_range": (("visualize", "--checkpoint", "{ckpt}", "--head", "9", "-o", "keep.png"),
                          ("--head 9", "2 heads")),
    "start_beyond_document": (("visualize", "--checkpoint", "{ckpt}", "--start", "99999", "-o", "keep.png"),
                              ("--start 99999",)),
    # outputs that cannot be written
    "figure_under_a_file": (("visualize", "--checkpoint", "{ckpt}", "-o", "blocker/x.png"),
                            ("cannot write the figure to blocker/x.png",)),
    "figure_in_proc": (("visualize", "--checkpoint", "{ckpt}", "-o", "/proc/lht-test/x.png"),
                       ("cannot write the figure to /proc/lht-test/x.png",)),
    "entropy_chart_unwritable": (("entropy", "--checkpoint", "{ckpt}", "-o", "blocker/e.png"),
                                 ("cannot write the figure to blocker/e.png",)),
    "gradient_chart_unwritable": (("gradcheck", "--checkpoint", "{ckpt}", "-o", "blocker/g.png"),
                                  ("cannot write the figure to blocker/g.png",)),
    # documents and configs given to the inspection commands
    "document_missing": (("visualize", "--checkpoint", "{ckpt}", "--document", "gone.json", "-o", "keep.png"),
                         ("document file not found: gone.json",)),
    "document_malformed": (("visualize", "--checkpoint", "{ckpt}", "--document", "bad.json", "-o", "keep.png"),
                           ("bad.json is not valid JSON",)),
    "document_empty": (("entropy", "--checkpoint", "{ckpt}", "--document", "empty.json"),
                       ("empty.json", "has no text")),
    "config_not_yaml": (("visualize", "--config", "corpus.jsonl", "-o", "keep.png"),
                        ("corpus.jsonl", "not valid YAML")),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lhtcli.config import load_config
    from lhtcli.training.trainer import run_training

    base = tmp_path_factory.mktemp("finished")
    corpus = write_corpus(base / "corpus.jsonl")
    cfg = load_config(None, tiny_overrides(corpus, **{
        "training.num_steps": 2, "training.save_every": 2, "logging.checkpoint_dir": str(base / "ckpts")}))
    run_training(cfg, quiet=True)
    return cfg.checkpoint_dir() / "last.ckpt"


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(COMMAND_CASES), ids=list(COMMAND_CASES))
def test_bad_input_to_a_command_gives_one_clear_error_and_changes_nothing(
        case: str, finished_run: Path, in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, expect = COMMAND_CASES[case]
    ckpt = in_tmp / "given.ckpt"
    shutil.copyfile(finished_run, ckpt)
    (in_tmp / "keep.png").write_bytes(b"\x89PNG an earlier figure")
    makers = _files(ckpt)
    for name in {a for a in argv if a in makers} | ({"blocker"} if "blocker" in " ".join(argv) else set()):
        content = makers[name]()
        if content is None:
            (in_tmp / name).mkdir()
        else:
            (in_tmp / name).write_bytes(content)
    before = _snapshot(in_tmp)
    code, err = run_cli([a.replace("{ckpt}", str(ckpt)) for a in argv], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for text in expect:
        assert text in lines[0], (text, err)
    assert _snapshot(in_tmp) == before  # nothing written, nothing overwritten


def test_the_tables_hold_at_least_35_distinct_bad_inputs() -> None:
    assert len(CASES) + len(COMMAND_CASES) >= 35
    print(f"\nreliability: bad inputs in the tables: {len(CASES) + len(COMMAND_CASES)}")
