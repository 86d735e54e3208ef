"""Count-based reference points for MLM accuracy.

A model that beats "always the most frequent token" (unigram) has learnt something; one that beats
"the most frequent token between these two neighbours" (two-sided bigram) uses more context than
the adjacent tokens. Both are scored on exactly the masked positions of the validation batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lhtcli.core.positions import TokenizedSequence
from lhtcli.data.batching import MLMBatch
from lhtcli.data.masking import IGNORE_INDEX

BOUNDARY = -1  # the neighbour of the first/last token of a sequence


@dataclass(frozen=True)
class NgramBaselines:
    """Predictions fitted on training tokens; ids are shifted by one so that BOUNDARY becomes 0."""

    unigram: int
    contexts: np.ndarray  # sorted keys (left + 1) * base + (right + 1)
    predictions: np.ndarray  # the most frequent middle token of each context
    base: int
    num_tokens: int

    def context_keys(self, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys of (left, right) pairs and whether each pair could have been seen in training."""
        known = (left + 1 < self.base) & (right + 1 < self.base)
        return (left + 1) * self.base + (right + 1), known

    def predict_bigram(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        keys, known = self.context_keys(left, right)
        found = np.searchsorted(self.contexts, keys)
        found = np.minimum(found, max(len(self.contexts) - 1, 0))
        if len(self.contexts):
            hit = known & (self.contexts[found] == keys)
            return np.where(hit, self.predictions[found], self.unigram)
        return np.full(keys.shape, self.unigram, dtype=np.int64)


TrainingItem = TokenizedSequence | Sequence[int] | MLMBatch


def _rows(item: TrainingItem) -> list[np.ndarray]:
    if isinstance(item, TokenizedSequence):
        return [np.asarray(item.input_ids, dtype=np.int64)]
    if isinstance(item, MLMBatch):
        original = item.original_ids().cpu().numpy()
        lengths = item.positions.real_mask.sum(dim=1).cpu().tolist()
        return [original[i, : int(n)] for i, n in enumerate(lengths)]
    return [np.asarray(list(item), dtype=np.int64)]


def _neighbours(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    edge = np.array([BOUNDARY], dtype=np.int64)
    return np.concatenate([edge, row[:-1]]), np.concatenate([row[1:], edge])


def fit_ngram_baselines(
    sequences: Iterable[TrainingItem], special_ids: Iterable[int] = (), skip_first: bool = True
) -> NgramBaselines:
    """Count training tokens in their (left, right) contexts.

    ``sequences`` may be tokenised sequences, plain id lists or (unmasked or masked) batches.
    The first token of each sequence (``[DOC]``) and ``special_ids`` are never prediction targets,
    since they are never masked; they still serve as neighbours.
    """
    lefts, middles, rights = [], [], []
    for item in sequences:
        for row in _rows(item):
            if row.size == 0:
                continue
            left, right = _neighbours(row)
            start = 1 if skip_first else 0
            lefts.append(left[start:])
            middles.append(row[start:])
            rights.append(right[start:])
    if not middles:
        raise ValueError("no training tokens to fit the baselines on")
    left, middle, right = (np.concatenate(parts) for parts in (lefts, middles, rights))
    specials = np.asarray(sorted(special_ids), dtype=np.int64)
    if specials.size:
        keep = ~np.isin(middle, specials)
        left, middle, right = left[keep], middle[keep], right[keep]
    if middle.size == 0:
        raise ValueError("no ordinary training tokens to fit the baselines on")
    base = int(max(left.max(), middle.max(), right.max())) + 2
    if base**3 >= 2**62:
        raise ValueError(f"token ids up to {base - 2} are too large for the count keys")

    values, counts = np.unique(middle, return_counts=True)
    # Ties go to the smallest id so that the baseline is deterministic.
    unigram = int(values[np.argmax(counts)])

    context = (left + 1) * base + (right + 1)
    triples, triple_counts = np.unique(context * base + middle, return_counts=True)
    triple_context, triple_middle = triples // base, triples % base
    order = np.lexsort((triple_middle, -triple_counts, triple_context))
    triple_context, triple_middle = triple_context[order], triple_middle[order]
    first = np.ones(len(triple_context), dtype=bool)
    first[1:] = triple_context[1:] != triple_context[:-1]
    return NgramBaselines(unigram, triple_context[first], triple_middle[first], base, int(middle.size))


def baseline_accuracies(model: NgramBaselines, val_batches: Iterable[MLMBatch]) -> dict[str, float]:
    """Accuracy of both baselines on the masked positions, with the original (unmasked) neighbours."""
    correct_unigram = correct_bigram = total = 0
    for batch in val_batches:
        original = batch.original_ids().cpu()
        real = batch.positions.real_mask.cpu()
        # Padding is no neighbour: the last real token's right neighbour is the boundary, as in training.
        padded = torch.where(real, original, torch.full_like(original, BOUNDARY)).numpy()
        edge = np.full((padded.shape[0], 1), BOUNDARY, dtype=np.int64)
        left_all = np.concatenate([edge, padded[:, :-1]], axis=1)
        right_all = np.concatenate([padded[:, 1:], edge], axis=1)
        targets = (batch.labels.cpu() != IGNORE_INDEX).numpy()
        labels = batch.labels.cpu().numpy()[targets]
        predicted = model.predict_bigram(left_all[targets], right_all[targets])
        correct_unigram += int((labels == model.unigram).sum())
        correct_bigram += int((labels == predicted).sum())
        total += int(labels.size)
    if total == 0:
        return {"unigram": float("nan"), "bigram": float("nan")}
    return {"unigram": correct_unigram / total, "bigram": correct_bigram / total}
