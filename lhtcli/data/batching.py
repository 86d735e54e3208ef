"""From documents to MLM batches: tokenise, split, shuffle, pad, mask.

``MLMBatchStream`` is an endless, reproducible stream: the shuffle of every epoch and the masks of
every batch follow from the seed and the batch index alone, so a run resumed from a checkpoint sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import count, islice
from typing import Any

import torch

from lhtcli.core.positions import HierarchicalPositions, TokenizedSequence, build_sequences
from lhtcli.data.documents import Document
from lhtcli.data.masking import IGNORE_INDEX, mask_tokens
from lhtcli.data.tokenizer import LHTTokenizer
from lhtcli.errors import DataError


@dataclass(frozen=True)
class MLMBatch:
    """Masked inputs, labels (-100 where not predicted) and positions, all [B, N]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: HierarchicalPositions

    def to(self, device: torch.device | str) -> MLMBatch:
        return MLMBatch(self.input_ids.to(device), self.labels.to(device), self.positions.to(device))

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens, ``[DOC]`` included."""
        return int(self.positions.real_mask.sum())

    @property
    def num_masked(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def original_ids(self) -> torch.Tensor:
        """The token ids before masking."""
        return torch.where(self.labels != IGNORE_INDEX, self.labels, self.input_ids)


def collate(sequences: list[TokenizedSequence], pad_id: int) -> tuple[torch.Tensor, HierarchicalPositions]:
    """Right-pad sequences to the longest one: ids [B, N] (``pad_id``) and positions [B, N] (0)."""
    if not sequences:
        raise ValueError("cannot collate an empty list of sequences")
    length = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence.input_ids)] = torch.tensor(sequence.input_ids, dtype=torch.long)
    return input_ids, HierarchicalPositions.batch([s.positions for s in sequences], pad_to=length)


def special_token_mask(
    input_ids: torch.Tensor, positions: HierarchicalPositions, special_ids: Iterable[int]
) -> torch.Tensor:
    """True where a token must never be masked: padding and special tokens such as ``[DOC]``."""
    specials = torch.tensor(sorted(special_ids), dtype=torch.long, device=input_ids.device)
    return ~positions.real_mask | torch.isin(input_ids, specials)


def make_batch(
    sequences: list[TokenizedSequence],
    tokenizer: LHTTokenizer,
    mlm_probability: float,
    generator: torch.Generator,
) -> MLMBatch:
    input_ids, positions = collate(sequences, tokenizer.pad_id)
    special = special_token_mask(input_ids, positions, tokenizer.special_ids)
    masked, labels = mask_tokens(
        input_ids,
        special,
        tokenizer.mask_id,
        tokenizer.vocab_size,
        tokenizer.special_ids,
        mlm_probability,
        generator,
    )
    return MLMBatch(masked, labels, positions)


def documents_to_sequences(
    docs: Iterable[Document], tokenizer: LHTTokenizer, max_seq_len: int
) -> Iterator[TokenizedSequence]:
    """Every document as one or more sequences of at most ``max_seq_len`` tokens; nothing is dropped."""
    for doc in docs:
        yield from build_sequences(tokenizer.encode_document(doc), max_seq_len, tokenizer.doc_id)


def derived_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed for one purpose (``"mask", batch_index``), independent of Python's hash salt."""
    text = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, "mask", batch_index))


def _buffer_shuffle(items: Iterable[TokenizedSequence], size: int, rng: random.Random) -> Iterator[TokenizedSequence]:
    """Streaming shuffle: each incoming item replaces a random one of ``size`` waiting items."""
    buffer: list[TokenizedSequence] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class MLMBatchStream:
    """An endless iterator of ``MLMBatch`` over epochs of the training documents.

    Sequences pass through a seeded shuffle buffer (a new order every epoch); every
    ``sort_window`` batches' worth of sequences is sorted by length before batching, so batches
    hold sequences of similar length and carry little padding, and the batches of a window are
    then shuffled. Batch ``i`` is masked with a generator seeded from ``(seed, i)``.

    When a whole epoch fits in ``cache_max_tokens`` tokens, it is tokenised once and kept.
    """

    def __init__(
        self,
        documents_factory: Callable[[], Iterable[Document]],
        tokenizer: LHTTokenizer,
        max_seq_len: int,
        batch_size: int,
        mlm_probability: float,
        seed: int,
        shuffle_buffer: int = 1000,
        sort_window: int = 8,
        cache_max_tokens: int = 2_000_000,
    ) -> None:
        if batch_size < 1 or shuffle_buffer < 1 or sort_window < 1:
            raise ValueError("batch_size, shuffle_buffer and sort_window must be at least 1")
        self.documents_factory = documents_factory
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.sort_window = sort_window
        self.cache_max_tokens = cache_max_tokens
        self._cache: list[TokenizedSequence] | None = None
        self._batches = 0
        self._epoch = 0
        self._groups: Iterator[list[TokenizedSequence]] | None = None

    # ------------------------------------------------------------------ state

    @property
    def batches_served(self) -> int:
        return self._batches

    @property
    def epoch(self) -> int:
        """The epoch the most recent batch was drawn from (0-based)."""
        return self._epoch

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["batches"]`` batches, exactly as an uninterrupted stream would."""
        target = int(state["batches"])
        if target < 0:
            raise ValueError(f"batches must be >= 0, got {target}")
        self._groups = self._sequence_groups()
        # Skipped batches are neither padded nor masked: masks depend only on the batch index.
        for _ in islice(self._groups, target):
            pass
        self._batches = target

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> MLMBatchStream:
        return self

    def __next__(self) -> MLMBatch:
        if self._groups is None:
            self._groups = self._sequence_groups()
        sequences = next(self._groups)
        batch = make_batch(sequences, self.tokenizer, self.mlm_probability, batch_generator(self.seed, self._batches))
        self._batches += 1
        return batch

    def _epoch_sequences(self) -> Iterator[TokenizedSequence]:
        if self._cache is not None:
            yield from self._cache
            return
        collected: list[TokenizedSequence] | None = []
        tokens = 0
        for sequence in documents_to_sequences(self.documents_factory(), self.tokenizer, self.max_seq_len):
            if collected is not None:
                tokens += len(sequence.input_ids)
                collected.append(sequence)
                if tokens > self.cache_max_tokens:
                    collected = None
            yield sequence
        if collected is not None:
            self._cache = collected

    def _shuffled_sequences(self) -> Iterator[tuple[int, TokenizedSequence]]:
        for epoch in count():
            rng = random.Random(derived_seed(self.seed, "shuffle", epoch))
            produced = False
            for sequence in _buffer_shuffle(self._epoch_sequences(), self.shuffle_buffer, rng):
                produced = True
                yield epoch, sequence
            if not produced:
                raise DataError(
                    "the training documents hold no text to train on; check data.path "
                    "(and data.validation_fraction, which may have held out every document)"
                )

    def _sequence_groups(self) -> Iterator[list[TokenizedSequence]]:
        window_rng = random.Random(derived_seed(self.seed, "windows"))
        source = self._shuffled_sequences()
        window_size = self.batch_size * self.sort_window
        while True:
            window = list(islice(source, window_size))
            window.sort(key=lambda item: len(item[1].input_ids))
            groups = [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
            window_rng.shuffle(groups)
            for group in groups:
                self._epoch = max(epoch for epoch, _ in group)
                yield [sequence for _, sequence in group]


def fixed_batches(
    documents: Iterable[Document],
    tokenizer: LHTTokenizer,
    max_seq_len: int,
    batch_size: int,
    mlm_probability: float,
    seed: int,
    max_batches: int,
) -> list[MLMBatch]:
    """Up to ``max_batches`` masked batches of ``documents`` in order, the same every call (validation)."""
    sequences = documents_to_sequences(documents, tokenizer, max_seq_len)
    batches: list[MLMBatch] = []
    for index in range(max_batches):
        group = list(islice(sequences, batch_size))
        if not group:
            break
        batches.append(make_batch(group, tokenizer, mlm_probability, batch_generator(seed, index)))
    return batches
