"""MLM masking statistics, sequence building, collation and the resumable batch stream."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from lhtcli.core.positions import TokenizedSequence, build_sequences, positions_from_lengths
from lhtcli.data.batching import (
    MLMBatch,
    MLMBatchStream,
    collate,
    documents_to_sequences,
    fixed_batches,
    make_batch,
)
from lhtcli.data.masking import IGNORE_INDEX, mask_tokens
from lhtcli.data.tokenizer import LHTTokenizer
from lhtcli.errors import DataError

SPECIALS = {0, 1, 2, 3, 4}
VOCAB = 50
MASK_ID = 4


def random_batch(rows: int = 64, length: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (rows, length), generator=g)
    ids[:, 0] = 2  # [DOC]
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=g)
    padding = torch.arange(length)[None, :] >= lengths[:, None]
    ids[padding] = 0
    special = padding | (ids == 2)
    return ids, special


def test_masking_statistics() -> None:
    ids, special = random_batch()
    masked, labels = mask_tokens(ids, special, MASK_ID, VOCAB, SPECIALS, 0.15, torch.Generator().manual_seed(1))
    chosen = labels != IGNORE_INDEX
    maskable = (~special).sum().item()
    assert maskable > 10_000
    assert abs(chosen.sum().item() / maskable - 0.15) < 0.01
    n = chosen.sum().item()
    as_mask = (masked[chosen] == MASK_ID).sum().item() / n
    unchanged = (masked[chosen] == ids[chosen]).sum().item() / n
    replaced = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) < 0.03
    # A random replacement can draw the original token (1 in 45 here), which counts as unchanged.
    assert abs(unchanged - 0.1) < 0.03
    assert abs(replaced - 0.1) < 0.03
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_masking_never_touches_special_positions_nor_draws_special_ids() -> None:
    ids, special = random_batch(seed=3)
    for seed in range(5):
        masked, labels = mask_tokens(ids, special, MASK_ID, VOCAB, SPECIALS, 0.5, torch.Generator().manual_seed(seed))
        assert torch.equal(masked[special], ids[special])
        assert (labels[special] == IGNORE_INDEX).all()
        replaced = (masked != ids) & (masked != MASK_ID)
        assert replaced.any()
        assert not torch.isin(masked[replaced], torch.tensor(sorted(SPECIALS))).any()


def test_masking_is_deterministic_given_the_generator() -> None:
    ids, special = random_batch(rows=4, length=64)
    first = mask_tokens(ids, special, MASK_ID, VOCAB, SPECIALS, 0.15, torch.Generator().manual_seed(5))
    second = mask_tokens(ids, special, MASK_ID, VOCAB, SPECIALS, 0.15, torch.Generator().manual_seed(5))
    other = mask_tokens(ids, special, MASK_ID, VOCAB, SPECIALS, 0.15, torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[1], other[1])


def test_masking_always_chooses_at_least_one_target() -> None:
    ids = torch.tensor([[2, 7, 8, 0]])
    special = torch.tensor([[True, False, False, True]])
    for seed in range(20):
        _, labels = mask_tokens(ids, special, MASK_ID, VOCAB, SPECIALS, 0.01, torch.Generator().manual_seed(seed))
        assert (labels != IGNORE_INDEX).sum() >= 1
        assert (labels[special] == IGNORE_INDEX).all()


# ----------------------------------------------------------------------------- sequences and batches

CORPUS = [
    [["The cat sat on the mat.", "The dog sat on the log."], ["Cats and dogs are friends."]],
    [["A hierarchical transformer reads long documents.", "Sections contain sentences."]],
    [["Sentences contain tokens.", "Tokens are pieces of words."], ["Short."], ["Another section here."]],
    [["Numbers like 1, 2 and 3 are tokens too.", "So are commas, colons: and dots."]],
]


@pytest.fixture(scope="module")
def tokenizer() -> LHTTokenizer:
    return LHTTokenizer.train(CORPUS, vocab_size=300)


def long_document(n_sections: int = 6) -> list[list[str]]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    return [
        [" ".join(words[(s + k) % 10] for k in range(3 + (s * j) % 17)) + "." for j in range(5)]
        + ([" ".join(words * 6)] if s == 2 else [])  # one sentence longer than a whole sequence
        for s in range(n_sections)
    ]


def test_splitting_a_long_document_loses_no_token(tokenizer: LHTTokenizer) -> None:
    doc = long_document()
    flat = [i for section in tokenizer.encode_document(doc) for sentence in section for i in sentence]
    sequences = list(documents_to_sequences([doc], tokenizer, max_seq_len=24))
    assert len(sequences) > 3
    assert all(len(s.input_ids) <= 24 and s.input_ids[0] == tokenizer.doc_id for s in sequences)
    assert [i for s in sequences for i in s.input_ids[1:]] == flat


def test_collate_right_pads(tokenizer: LHTTokenizer) -> None:
    a = TokenizedSequence([2, 10, 11, 12], positions_from_lengths([[2, 1]]))
    b = TokenizedSequence([2, 13], positions_from_lengths([[1]]))
    ids, positions = collate([a, b], pad_id=0)
    assert ids.tolist() == [[2, 10, 11, 12], [2, 13, 0, 0]]
    assert positions.level_enums[0].tolist() == [[1, 2, 3, 4], [1, 2, 0, 0]]
    assert positions.real_mask.sum().item() == 6


def test_make_batch_properties(tokenizer: LHTTokenizer) -> None:
    sequences = list(documents_to_sequences(CORPUS, tokenizer, 64))
    batch = make_batch(sequences, tokenizer, 0.3, torch.Generator().manual_seed(0))
    real = sum(len(s.input_ids) for s in sequences)
    assert batch.num_tokens == real
    assert 0 < batch.num_masked < real
    assert (batch.input_ids[:, 0] == tokenizer.doc_id).all()
    assert (batch.labels[:, 0] == IGNORE_INDEX).all()
    assert (batch.labels[~batch.positions.real_mask] == IGNORE_INDEX).all()
    restored = batch.original_ids()
    expected, _ = collate(sequences, tokenizer.pad_id)
    assert torch.equal(restored, expected)
    moved = batch.to("cpu")
    assert isinstance(moved, MLMBatch) and torch.equal(moved.labels, batch.labels)


def batches_equal(a: MLMBatch, b: MLMBatch) -> bool:
    return (
        torch.equal(a.input_ids, b.input_ids)
        and torch.equal(a.labels, b.labels)
        and torch.equal(a.positions.stacked(), b.positions.stacked())
    )


def many_documents() -> list[list[list[str]]]:
    return [
        [[f"Document {i} talks about cats.", "Dogs sat on mats."] * (1 + i % 3), ["Another section here."]]
        for i in range(40)
    ]


@pytest.mark.parametrize("cache_max_tokens", [0, 10**6])
def test_stream_resume_is_exact(tokenizer: LHTTokenizer, cache_max_tokens: int) -> None:
    docs = many_documents()

    def stream() -> MLMBatchStream:
        return MLMBatchStream(
            lambda: iter(docs), tokenizer, 32, 3, 0.15, seed=11, shuffle_buffer=7, cache_max_tokens=cache_max_tokens
        )

    uninterrupted = list(islice(stream(), 70))  # several epochs
    first = stream()
    taken = list(islice(first, 25))
    state = first.state_dict()
    assert state == {"batches": 25}
    resumed = stream()
    resumed.load_state_dict(state)
    after = list(islice(resumed, 45))
    assert all(batches_equal(a, b) for a, b in zip(taken + after, uninterrupted, strict=True))
    assert resumed.state_dict() == {"batches": 70}
    assert resumed.epoch > 0


def test_stream_epochs_cover_every_sequence_and_reshuffle(tokenizer: LHTTokenizer) -> None:
    docs = many_documents()
    expected = sorted(tuple(s.input_ids) for s in documents_to_sequences(docs, tokenizer, 32))
    stream = MLMBatchStream(lambda: iter(docs), tokenizer, 32, 1, 0.15, seed=2, shuffle_buffer=5, sort_window=1)
    epochs = [[tuple(next(stream).original_ids()[0].tolist()) for _ in expected] for _ in range(2)]
    assert sorted(epochs[0]) == expected and sorted(epochs[1]) == expected
    assert epochs[0] != epochs[1]


def test_stream_seed_changes_order(tokenizer: LHTTokenizer) -> None:
    docs = many_documents()
    a = next(MLMBatchStream(lambda: iter(docs), tokenizer, 32, 4, 0.15, seed=1))
    b = next(MLMBatchStream(lambda: iter(docs), tokenizer, 32, 4, 0.15, seed=2))
    assert not batches_equal(a, b)


def test_stream_without_text_fails_clearly(tokenizer: LHTTokenizer) -> None:
    stream = MLMBatchStream(lambda: iter([]), tokenizer, 32, 2, 0.15, seed=0)
    with pytest.raises(DataError, match="no text"):
        next(stream)


def test_fixed_batches_are_deterministic(tokenizer: LHTTokenizer) -> None:
    docs = many_documents()
    first = fixed_batches(docs, tokenizer, 32, 4, 0.15, seed=5, max_batches=6)
    again = fixed_batches(iter(docs), tokenizer, 32, 4, 0.15, seed=5, max_batches=6)
    assert len(first) == 6
    assert all(batches_equal(a, b) for a, b in zip(first, again, strict=True))
    few = fixed_batches(docs[:1], tokenizer, 512, 4, 0.15, seed=5, max_batches=6)
    assert len(few) == 1 and few[0].batch_size == 1


def test_build_sequences_and_stream_agree_on_doc_token(tokenizer: LHTTokenizer) -> None:
    encoded = tokenizer.encode_document(CORPUS[2])
    (sequence,) = build_sequences(encoded, 64, tokenizer.doc_id)
    assert sequence.positions.level_enums[2].tolist().count(0) == len(sequence.input_ids) - 3


def test_validation_batches_use_their_own_masking_rate(tmp_path) -> None:
    """training.eval_mlm_probability keeps validation comparable when the training rate changes."""
    from training_helpers import tiny_overrides, write_corpus

    from lhtcli.config import load_config
    from lhtcli.training.data_setup import prepare_data

    corpus = write_corpus(tmp_path / "c.jsonl", documents=40)
    overrides = tiny_overrides(corpus, **{"training.mlm_probability": 0.5, "training.eval_mlm_probability": 0.1,
                                          "training.eval_batches": 4, "logging.dir": str(tmp_path / "runs")})
    bundle = prepare_data(load_config(None, overrides), write_files=False)

    def rate(batches) -> float:
        maskable = sum(int(b.positions.real_mask.sum()) - b.batch_size for b in batches)  # all but [DOC]
        return sum(b.num_masked for b in batches) / maskable

    assert rate(bundle.val_batches) == pytest.approx(0.1, abs=0.04)
    assert rate(list(islice(bundle.train_stream, 4))) == pytest.approx(0.5, abs=0.08)
