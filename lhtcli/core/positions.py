"""Hierarchical position enumerations (DESIGN.md section 2).

A document is a list of sections, a section a list of sentences. Flattened, it becomes an optional
leading ``[DOC]`` token followed by every sentence's tokens. Each level gets one int64 vector:

* level 0: ``1..N`` on real tokens, ``0`` on padding;
* level 1: the 1-based sentence ordinal on the first token of each sentence, ``0`` elsewhere;
* level 2: the 1-based section ordinal on the first token of each section, ``0`` elsewhere.

``[DOC]`` is 0 on every level above 0; its global links to the top level are a rule of the
attention, flagged here by ``has_doc_token``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

NUM_LEVELS = 3


@dataclass(frozen=True)
class HierarchicalPositions:
    """Per-level enumeration vectors of one sequence ([N] each) or a batch ([B, N] each)."""

    level_enums: list[torch.Tensor]
    has_doc_token: bool = True

    def __post_init__(self) -> None:
        if not self.level_enums:
            raise ValueError("HierarchicalPositions needs at least one level")
        shape = self.level_enums[0].shape
        if len(shape) not in (1, 2):
            raise ValueError(f"level enumerations must be [N] or [B, N], got shape {tuple(shape)}")
        for enum in self.level_enums:
            if enum.shape != shape:
                raise ValueError("every level enumeration must have the same shape")
            if enum.dtype != torch.long:
                raise ValueError(f"level enumerations must be int64, got {enum.dtype}")

    @property
    def num_levels(self) -> int:
        return len(self.level_enums)

    @property
    def is_batched(self) -> bool:
        return self.level_enums[0].dim() == 2

    @property
    def seq_len(self) -> int:
        return self.level_enums[0].shape[-1]

    @property
    def device(self) -> torch.device:
        return self.level_enums[0].device

    def batched(self) -> HierarchicalPositions:
        """The same positions with a batch dimension ([N] becomes [1, N])."""
        if self.is_batched:
            return self
        return HierarchicalPositions([e.unsqueeze(0) for e in self.level_enums], self.has_doc_token)

    @property
    def batch_size(self) -> int:
        return self.batched().level_enums[0].shape[0]

    def stacked(self) -> torch.Tensor:
        """All levels as one tensor [L, B, N] (or [L, N])."""
        return torch.stack(self.level_enums)

    @property
    def real_mask(self) -> torch.Tensor:
        """True on real (non-padding) tokens."""
        return self.level_enums[0] != 0

    def to(self, device: torch.device | str) -> HierarchicalPositions:
        return HierarchicalPositions([e.to(device) for e in self.level_enums], self.has_doc_token)

    def __getitem__(self, index: int | slice) -> HierarchicalPositions:
        """Select rows of a batch."""
        if not self.is_batched:
            raise TypeError("indexing needs batched positions")
        return HierarchicalPositions([e[index] for e in self.level_enums], self.has_doc_token)

    @staticmethod
    def batch(items: Sequence[HierarchicalPositions], pad_to: int | None = None) -> HierarchicalPositions:
        """Right-pad single sequences to a common length (0 = padding) and stack them into [B, N]."""
        if not items:
            raise ValueError("cannot batch an empty list of positions")
        flags = {p.has_doc_token for p in items}
        if len(flags) != 1:
            raise ValueError("cannot batch sequences with and without a [DOC] token")
        levels = {p.num_levels for p in items}
        if len(levels) != 1:
            raise ValueError("cannot batch sequences with different numbers of levels")
        rows = [p.batched() for p in items]
        length = max(p.seq_len for p in rows)
        if pad_to is not None:
            if pad_to < length:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({length})")
            length = pad_to
        num_levels = rows[0].num_levels
        enums = []
        for level in range(num_levels):
            padded = [torch.nn.functional.pad(p.level_enums[level], (0, length - p.seq_len)) for p in rows]
            enums.append(torch.cat(padded, dim=0))
        return HierarchicalPositions(enums, rows[0].has_doc_token)


def positions_from_lengths(doc: Sequence[Sequence[int]], doc_token: bool = True) -> HierarchicalPositions:
    """Positions of a document given as sections -> sentence token counts, e.g. ``[[3, 2], [3, 1]]``.

    Empty sentences and empty sections contribute no token, so they take no ordinal either: an
    ordinal always names a token that exists.
    """
    level0: list[int] = []
    level1: list[int] = []
    level2: list[int] = []
    if doc_token:
        level0.append(1)
        level1.append(0)
        level2.append(0)
    sentence_ordinal = 0
    section_ordinal = 0
    for section in doc:
        section_started = False
        for length in section:
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise ValueError(f"sentence lengths must be non-negative integers, got {length!r}")
            if length == 0:
                continue
            sentence_ordinal += 1
            for offset in range(length):
                level0.append(len(level0) + 1)
                level1.append(sentence_ordinal if offset == 0 else 0)
                if offset == 0 and not section_started:
                    section_ordinal += 1
                    section_started = True
                    level2.append(section_ordinal)
                else:
                    level2.append(0)
    enums = [torch.tensor(values, dtype=torch.long) for values in (level0, level1, level2)]
    return HierarchicalPositions(enums, has_doc_token=doc_token)


@dataclass(frozen=True)
class TokenizedSequence:
    """One model input built from (part of) a document: token ids and their positions."""

    input_ids: list[int]
    positions: HierarchicalPositions


def build_sequences(
    doc_token_ids: Sequence[Sequence[Sequence[int]]],
    max_seq_len: int,
    doc_token_id: int | None,
) -> list[TokenizedSequence]:
    """Flatten a tokenized nested document into one or more sequences of at most ``max_seq_len``.

    Sequences break at sentence boundaries; a sentence longer than a whole sequence is split at
    token boundaries. Every piece gets its own ``[DOC]`` (when ``doc_token_id`` is given) and its
    own enumerations, so its first sentence also opens a section there. No token is dropped.
    """
    capacity = max_seq_len - (1 if doc_token_id is not None else 0)
    if capacity < 1:
        raise ValueError(f"max_seq_len={max_seq_len} leaves no room for tokens after [DOC]")

    # Greedy packing over (section, sentence) pieces; an over-long sentence becomes several pieces.
    sequences: list[list[list[list[int]]]] = []  # sequence -> sections -> sentences -> ids
    current: list[list[list[int]]] = []
    used = 0

    def flush() -> None:
        nonlocal current, used
        if used:
            sequences.append(current)
        current, used = [], 0

    for section in doc_token_ids:
        new_section = True
        for sentence in section:
            pieces = [list(sentence[i : i + capacity]) for i in range(0, len(sentence), capacity)]
            for piece in pieces:
                if used + len(piece) > capacity:
                    flush()
                    new_section = True
                if new_section or not current:
                    current.append([])
                    new_section = False
                current[-1].append(piece)
                used += len(piece)
    flush()

    result = []
    for sections in sequences:
        ids = [doc_token_id] if doc_token_id is not None else []
        for section in sections:
            for sentence in section:
                ids.extend(sentence)
        lengths = [[len(s) for s in section] for section in sections]
        result.append(TokenizedSequence(ids, positions_from_lengths(lengths, doc_token=doc_token_id is not None)))
    return result
