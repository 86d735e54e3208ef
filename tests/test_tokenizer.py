"""The WordPiece tokenizer: training, special tokens, serialisation, loading foreign files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lhtcli.data.tokenizer import SPECIAL_TOKENS, LHTTokenizer, learn_wordpiece_vocab
from lhtcli.errors import DataError

CORPUS = [
    [["The cat sat on the mat.", "The dog sat on the log."], ["Cats and dogs are friends."]],
    [["A hierarchical transformer reads long documents.", "Sections contain sentences."]],
    [["Sentences contain tokens.", "Tokens are pieces of words like unbelievable."]],
]


@pytest.fixture(scope="module")
def tokenizer() -> LHTTokenizer:
    return LHTTokenizer.train(CORPUS, vocab_size=200)


def test_trained_special_ids(tokenizer: LHTTokenizer) -> None:
    assert [tokenizer.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.doc_id, tokenizer.mask_id) == (0, 1, 2, 4)
    assert tokenizer.special_ids == frozenset(range(5))
    assert 5 < tokenizer.vocab_size <= 200


def test_training_is_deterministic() -> None:
    first = LHTTokenizer.train(CORPUS, vocab_size=120).to_json_str()
    for _ in range(3):
        assert LHTTokenizer.train(CORPUS, vocab_size=120).to_json_str() == first


def test_vocab_learner_ties_and_limits() -> None:
    vocab = learn_wordpiece_vocab(Counter({"ab": 3, "cd": 3}), vocab_size=100)
    # Alphabet first, then merges; the tie between ("a","##b") and ("c","##d") goes to the smaller pair.
    assert vocab[:5] == list(SPECIAL_TOKENS)
    assert vocab[-2:] == ["ab", "cd"]
    assert len(learn_wordpiece_vocab(Counter({"abcdefgh": 5}), vocab_size=8)) == 8


def test_encode_document_shape_and_no_special_tokens(tokenizer: LHTTokenizer) -> None:
    encoded = tokenizer.encode_document(CORPUS[0])
    assert [len(section) for section in encoded] == [2, 1]
    flat = [i for section in encoded for sentence in section for i in sentence]
    assert flat and not set(flat) & tokenizer.special_ids
    assert tokenizer.decode_ids(encoded[0][0]) == "the cat sat on the mat."


def test_literal_special_token_text_stays_text(tokenizer: LHTTokenizer) -> None:
    ids = tokenizer.encode_text("the [MASK] sat")
    assert tokenizer.mask_id not in ids


def test_round_trip_through_json(tokenizer: LHTTokenizer, tmp_path: Path) -> None:
    again = LHTTokenizer.from_json_str(tokenizer.to_json_str())
    assert again.to_json_str() == tokenizer.to_json_str()
    assert again.encode_document(CORPUS[1]) == tokenizer.encode_document(CORPUS[1])
    path = tmp_path / "run" / "tokenizer.json"
    tokenizer.save(path)
    assert LHTTokenizer.from_file(path).encode_document(CORPUS[2]) == tokenizer.encode_document(CORPUS[2])


@pytest.mark.parametrize("content", [b"garbage \x00\xff", b"not json at all", b'{"version": "1.0"}', b"[1, 2]"])
def test_from_file_rejects_non_tokenizers(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match="tokenizer"):
        LHTTokenizer.from_file(path)


def test_from_file_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        LHTTokenizer.from_file(tmp_path / "nope.json")


def foreign_tokenizer(tokens: list[str], specials: list[str]) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(specials + tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0] if "<unk>" in specials else None))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    return tok


def test_foreign_tokenizer_with_roberta_style_tokens(tmp_path: Path) -> None:
    tok = foreign_tokenizer(["hello", "world"], ["<unk>", "<s>", "</s>", "<pad>", "<mask>"])
    tok.enable_padding(length=32)
    tok.enable_truncation(4)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = LHTTokenizer.from_file(path)
    assert (loaded.doc_id, loaded.mask_id, loaded.pad_id, loaded.unk_id) == (1, 4, 3, 0)
    # Padding and truncation of the file are switched off: a sentence keeps all its tokens.
    assert loaded.encode_document([["hello world hello world hello world"]]) == [[[5, 6, 5, 6, 5, 6]]]


@pytest.mark.parametrize("missing, label", [("[MASK]", "mask"), ("[PAD]", "padding"), ("[CLS]", "document")])
def test_foreign_tokenizer_missing_token_is_named(tmp_path: Path, missing: str, label: str) -> None:
    specials = [t for t in ["[UNK]", "[CLS]", "[PAD]", "[MASK]"] if t != missing]
    path = tmp_path / "tokenizer.json"
    foreign_tokenizer(["word"], specials).save(str(path))
    with pytest.raises(DataError, match=f"no {label}") as info:
        LHTTokenizer.from_file(path)
    assert missing in str(info.value)


def test_training_on_empty_corpus_fails_clearly() -> None:
    with pytest.raises(DataError, match="no text"):
        LHTTokenizer.train([[["   "]]], vocab_size=100)


def test_serialised_form_is_plain_json(tokenizer: LHTTokenizer) -> None:
    data = json.loads(tokenizer.to_json_str())
    assert data["model"]["type"] == "WordPiece"
    assert data["padding"] is None and data["truncation"] is None
