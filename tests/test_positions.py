import pytest
import torch

from lhtcli.core import HierarchicalPositions, build_sequences, positions_from_lengths


def enums(p: HierarchicalPositions) -> list[list[int]]:
    return [e.tolist() for e in p.level_enums]


def test_design_example_exactly():
    # [DOC] + 9 tokens; sentences start at tokens 1, 4, 6, 9; sections at 1, 6 (DESIGN.md section 2)
    p = positions_from_lengths([[3, 2], [3, 1]])
    assert enums(p) == [
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        [0, 1, 0, 0, 2, 0, 3, 0, 0, 4],
        [0, 1, 0, 0, 0, 0, 2, 0, 0, 0],
    ]
    assert p.has_doc_token


def test_without_doc_token():
    p = positions_from_lengths([[2], [1]], doc_token=False)
    assert enums(p) == [[1, 2, 3], [1, 0, 2], [1, 0, 2]]
    assert not p.has_doc_token


def test_empty_sentences_and_sections_take_no_ordinal():
    p = positions_from_lengths([[0, 2, 0], [], [0], [1]])
    assert enums(p) == [[1, 2, 3, 4], [0, 1, 0, 2], [0, 1, 0, 2]]


def test_one_token_sentences_single_section():
    p = positions_from_lengths([[1, 1, 1]])
    assert enums(p) == [[1, 2, 3, 4], [0, 1, 2, 3], [0, 1, 0, 0]]


def test_many_sections():
    p = positions_from_lengths([[1]] * 50)
    assert p.level_enums[2].tolist() == [0] + list(range(1, 51))
    assert p.level_enums[1].tolist() == [0] + list(range(1, 51))


def test_rejects_bad_lengths():
    with pytest.raises(ValueError):
        positions_from_lengths([[2, -1]])
    with pytest.raises(ValueError):
        positions_from_lengths([[2, 1.5]])


def test_batch_pads_with_zeros_and_to_device():
    a = positions_from_lengths([[2]])
    b = positions_from_lengths([[1, 1], [3]])
    batch = HierarchicalPositions.batch([a, b])
    assert batch.batch_size == 2 and batch.seq_len == 6
    assert batch.level_enums[0][0].tolist() == [1, 2, 3, 0, 0, 0]
    assert batch.real_mask.sum().item() == 3 + 6
    assert batch.to("cpu").level_enums[1].device.type == "cpu"
    assert HierarchicalPositions.batch([a], pad_to=8).seq_len == 8
    with pytest.raises(ValueError):
        HierarchicalPositions.batch([b], pad_to=3)


def test_batch_rejects_mixed_doc_flags():
    with pytest.raises(ValueError):
        HierarchicalPositions.batch([positions_from_lengths([[1]]), positions_from_lengths([[1]], doc_token=False)])


def test_build_sequences_splits_at_sentence_boundaries_and_keeps_every_token():
    doc = [[[10, 11, 12], [13, 14]], [[15, 16, 17, 18], [19]], [[20] * 9]]
    seqs = build_sequences(doc, max_seq_len=6, doc_token_id=2)
    flat = [t for section in doc for sentence in section for t in sentence]
    assert [t for s in seqs for t in s.input_ids[1:]] == flat
    for s in seqs:
        assert s.input_ids[0] == 2
        assert len(s.input_ids) <= 6
        assert s.positions.seq_len == len(s.input_ids)
        # each piece opens a section and a sentence right after its [DOC]
        assert s.positions.level_enums[1][1] == 1 and s.positions.level_enums[2][1] == 1
    # the first sequence holds the two whole sentences of section 1 (5 tokens)
    assert seqs[0].input_ids == [2, 10, 11, 12, 13, 14]
    # a sentence longer than a sequence is split at token boundaries
    assert any(s.input_ids[1:] == [20] * 5 for s in seqs)


def test_build_sequences_single_sequence_matches_lengths():
    doc = [[[5, 6], [7]], [[8]]]
    (seq,) = build_sequences(doc, max_seq_len=16, doc_token_id=1)
    expected = positions_from_lengths([[2, 1], [1]])
    assert seq.input_ids == [1, 5, 6, 7, 8]
    assert all(torch.equal(a, b) for a, b in zip(seq.positions.level_enums, expected.level_enums, strict=True))
