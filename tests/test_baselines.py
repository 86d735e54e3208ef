"""Unigram and two-sided bigram baselines on toy data where the answer is known."""

from __future__ import annotations

import time

import numpy as np
import torch

from lhtcli.core.positions import TokenizedSequence, positions_from_lengths
from lhtcli.data.baselines import baseline_accuracies, fit_ngram_baselines
from lhtcli.data.batching import MLMBatch, collate
from lhtcli.data.masking import IGNORE_INDEX

DOC = 2
MASK = 4


def sequence(ids: list[int]) -> TokenizedSequence:
    return TokenizedSequence([DOC, *ids], positions_from_lengths([[len(ids)]]))


def masked_batch(rows: list[list[int]], masked_at: list[list[int]]) -> MLMBatch:
    """A batch whose listed positions (index into the row, [DOC] excluded) are replaced by [MASK]."""
    ids, positions = collate([sequence(r) for r in rows], pad_id=0)
    labels = torch.full_like(ids, IGNORE_INDEX)
    masked = ids.clone()
    for row, places in enumerate(masked_at):
        for place in places:
            labels[row, place + 1] = ids[row, place + 1]
            masked[row, place + 1] = MASK
    return MLMBatch(masked, labels, positions)


def test_toy_corpus_known_answers() -> None:
    # 10 is the most frequent token; between 20 and 21 there is always 30.
    train = [sequence([20, 30, 21, 10, 10, 10]), sequence([10, 20, 30, 21, 10])]
    model = fit_ngram_baselines(train)
    assert model.unigram == 10
    assert model.num_tokens == 11  # [DOC] is never a target
    # Row 0: masked 30 (context 20/21 -> 30, right) and 10 (context 21/end unseen -> unigram 10, right).
    # Row 1: masked 11, never seen; context (10, end) was seen with 10 -> bigram says 10, wrong.
    batch = masked_batch([[20, 30, 21, 10], [12, 10, 11]], [[1, 3], [2]])
    scores = baseline_accuracies(model, [batch])
    assert scores["unigram"] == 1 / 3
    assert scores["bigram"] == 2 / 3


def test_neighbours_are_the_original_tokens() -> None:
    model = fit_ngram_baselines([sequence([5, 6, 7, 8, 9])] * 3 + [sequence([9, 9])])
    # Masking 6 and 7 together: each is still predicted from its true neighbours (5/7 and 6/8).
    batch = masked_batch([[5, 6, 7, 8, 9]], [[1, 2]])
    assert batch.input_ids[0, 2].item() == MASK
    assert baseline_accuracies(model, [batch]) == {"unigram": 0.0, "bigram": 1.0}


def test_unseen_context_falls_back_to_unigram() -> None:
    model = fit_ngram_baselines([[DOC, 7, 7, 8]])
    batch = masked_batch([[40, 7, 41]], [[1]])
    assert baseline_accuracies(model, [batch]) == {"unigram": 1.0, "bigram": 1.0}
    batch = masked_batch([[10_000, 8, 10_001]], [[1]])  # ids beyond anything seen in training
    assert baseline_accuracies(model, [batch]) == {"unigram": 0.0, "bigram": 0.0}


def test_fit_accepts_batches_and_skips_special_ids() -> None:
    batch = masked_batch([[20, 30, 21], [30, 30]], [[1], []])
    model = fit_ngram_baselines([batch], special_ids={30})
    assert model.unigram in (20, 21)
    assert fit_ngram_baselines([batch]).unigram == 30  # reconstructed from the labels, padding ignored


def test_a_million_tokens_fit_in_seconds() -> None:
    rng = np.random.default_rng(0)
    rows = [rng.integers(5, 8000, size=1000).tolist() for _ in range(1000)]
    start = time.perf_counter()
    model = fit_ngram_baselines(rows)
    assert time.perf_counter() - start < 10
    assert model.num_tokens == 999_000
