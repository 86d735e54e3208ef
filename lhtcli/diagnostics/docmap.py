"""Whole-document attention maps: attention pooled to sentence x sentence or section x section.

A document longer than ``model.max_seq_len`` is split into sequences as training splits it
(DESIGN.md section 2); each sequence gets its own ``[DOC]``. Token indices here are *document*
indices: the position in the concatenation of every sequence's tokens (each ``[DOC]`` included), so
``--start/--span`` address any part of any length of document.

Units: every sequence contributes a ``[DOC]`` unit (when it has one) followed by its sentences
(or sections); with ``unit="tokens"`` every token is a unit. The map entry ``[i, j]`` is the mean,
over the query tokens of unit i inside the shown range, of the attention probability those tokens
give the keys of unit j inside the range: with the whole document shown every row sums to 1. The
probabilities are exact (:func:`lhtcli.core.pairs.pooled_attention_maps`: the kernels' log-sum-exps and
the allowed pairs block by block), so memory stays linear in the document length: the largest tensor
is the ``[H, U, U]`` map itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lhtcli.core.pairs import pooled_attention_maps

if TYPE_CHECKING:
    from lhtcli.core.positions import TokenizedSequence

UNITS = ("sentences", "sections", "tokens")
LABEL_TOKENS = 3  # words of a sentence/section shown in its label


@dataclass
class DocumentLayout:
    """Where every sequence, token and unit sits in document coordinates."""

    sequences: list[TokenizedSequence]
    offsets: list[int]  # document index of each sequence's first token
    tokens: list[str]  # token strings in document order
    num_tokens: int

    @classmethod
    def build(cls, sequences: Sequence[TokenizedSequence], name: Callable[[int], str]) -> DocumentLayout:
        offsets, tokens, total = [], [], 0
        for seq in sequences:
            offsets.append(total)
            tokens += [name(i) for i in seq.input_ids]
            total += len(seq.input_ids)
        return cls(list(sequences), offsets, tokens, total)

    def unit_ids(self, unit: str) -> tuple[list[list[int]], list[int], list[str], list[int]]:
        """Per sequence, each token's unit; the first document index, label and sequence of each unit."""
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
        per_seq, starts, labels, owners = [], [], [], []
        ordinal = 0
        for s, (seq, offset) in enumerate(zip(self.sequences, self.offsets, strict=True)):
            enums = [e.tolist() for e in seq.positions.level_enums]
            ids = []
            for i in range(len(seq.input_ids)):
                is_doc = seq.positions.has_doc_token and i == 0
                level = 1 if unit == "sentences" else 2
                # a sequence's first token after [DOC] always opens a sentence and a section there
                after_doc = seq.positions.has_doc_token and i == 1
                opens = level < len(enums) and enums[level][i] != 0
                begins = unit == "tokens" or is_doc or after_doc or opens or not ids
                if begins:
                    starts.append(offset + i)
                    owners.append(s)
                    if unit == "tokens":
                        labels.append(self.tokens[offset + i])
                    elif is_doc:
                        labels.append("[DOC]")
                    else:
                        ordinal += 1
                        words = " ".join(self.tokens[offset + i : offset + i + LABEL_TOKENS]).replace(" ##", "")
                        labels.append(f"{ordinal}: {words}")
                ids.append(len(starts) - 1)
            per_seq.append(ids)
        return per_seq, starts, labels, owners


@dataclass
class DocumentMap:
    """One layer's pooled attention over a token range of a document."""

    layer: int
    head: int | None  # None = mean over heads
    unit: str
    start: int  # document token range [start, stop)
    stop: int
    labels: list[str]  # per unit shown
    starts: list[int]  # document index where each unit shown begins
    sequence_breaks: list[int]  # unit positions (in the shown list) where a new model sequence begins
    queries: list[int]  # query tokens of each unit inside the range
    matrix: torch.Tensor  # [U, U] float64
    heads: torch.Tensor  # [H, U, U] float64
    doc_units: list[int] = field(default_factory=list)  # positions of [DOC] units in the shown list

    def row_mass(self) -> torch.Tensor:
        """[U]: share of each unit's attention that stays inside the shown range (1 for the whole document)."""
        return self.matrix.sum(-1)

    def summary(self) -> dict[str, float]:
        """Token-weighted shares of attention: own unit, the adjacent units, farther units, [DOC] units."""
        m, q = self.matrix, torch.tensor(self.queries, dtype=torch.float64)
        u = m.shape[0]
        if u == 0 or float(q.sum()) == 0:
            return {"own": 0.0, "adjacent": 0.0, "farther": 0.0, "doc": 0.0}
        idx = torch.arange(u)
        dist = (idx[:, None] - idx[None, :]).abs()
        doc = torch.zeros(u, dtype=torch.bool)
        doc[self.doc_units] = True
        not_doc = ~doc[None, :]
        weight = q / q.sum()

        def share(sel: torch.Tensor) -> float:
            return float((weight[:, None] * torch.where(sel, m, torch.zeros_like(m))).sum())

        return {
            "own": share((dist == 0) & not_doc),
            "adjacent": share((dist == 1) & not_doc),
            "farther": share((dist > 1) & not_doc),
            "doc": share(doc[None, :].expand(u, u)),
        }

    def top_links(self, count: int = 5, min_distance: int = 2) -> list[tuple[int, int, float]]:
        """The strongest links between units at least ``min_distance`` apart ([DOC] units excluded)."""
        u = self.matrix.shape[0]
        idx = torch.arange(u)
        far = (idx[:, None] - idx[None, :]).abs() >= min_distance
        keep = torch.ones(u, dtype=torch.bool)
        keep[self.doc_units] = False
        ok = far & keep[:, None] & keep[None, :]
        values = torch.where(ok, self.matrix, torch.zeros_like(self.matrix)).flatten()
        top = torch.topk(values, min(count, values.numel()))
        return [(int(i) // u, int(i) % u, float(v)) for v, i in zip(top.values, top.indices, strict=True) if v > 0]

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "head": self.head,
            "unit": self.unit,
            "start": self.start,
            "stop": self.stop,
            "labels": self.labels,
            "unit_starts": self.starts,
            "sequence_breaks": self.sequence_breaks,
            "queries": self.queries,
            "matrix": self.matrix.tolist(),
            "row_mass_inside": self.row_mass().tolist(),
            "summary": self.summary(),
            "top_links": [
                {"from": self.labels[i], "to": self.labels[j], "weight": w} for i, j, w in self.top_links()
            ],
        }


def document_maps(
    model: torch.nn.Module,
    layout: DocumentLayout,
    pad_id: int,
    units: Sequence[str],
    layers: Sequence[int],
    *,
    start: int = 0,
    stop: int | None = None,
    head: int | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> dict[tuple[int, str], DocumentMap]:
    """Maps for every (layer, unit) over document tokens [start, stop), one forward pass per batch of
    the sequences that overlap the range."""
    from lhtcli.data.batching import collate
    from lhtcli.diagnostics.attention_stats import capture_attention

    stop = layout.num_tokens if stop is None else min(stop, layout.num_tokens)
    if not 0 <= start < stop:
        raise ValueError(f"start={start} is outside the document's {layout.num_tokens} tokens")
    windows = [int(w) for w in model.cfg.mlswa.window_size_per_level]
    device = next(model.parameters()).device
    plans = {u: layout.unit_ids(u) for u in units}
    chosen = [
        s for s, (seq, off) in enumerate(zip(layout.sequences, layout.offsets, strict=True))
        if off < stop and off + len(seq.input_ids) > start
    ]
    num_heads = model.cfg.n_heads
    # only the units with a token in range get a row and a column (a token map of a 2k span of a long
    # document stays [H, 2k, 2k]); the others are renumbered -1
    shown: dict[str, list[int]] = {}
    remap: dict[str, torch.Tensor] = {}
    for u in units:
        unit_starts = plans[u][1]
        ends = unit_starts[1:] + [layout.num_tokens]
        shown[u] = [i for i, (a, e) in enumerate(zip(unit_starts, ends, strict=True)) if a < stop and e > start]
        remap[u] = torch.full((len(unit_starts),), -1, dtype=torch.long)
        remap[u][torch.tensor(shown[u], dtype=torch.long)] = torch.arange(len(shown[u]))
    sums = {
        (layer, u): torch.zeros(num_heads, len(shown[u]), len(shown[u]), dtype=torch.float64)
        for layer in layers for u in units
    }
    for b in range(0, len(chosen), batch_size):
        group = chosen[b : b + batch_size]
        ids, positions = collate([layout.sequences[s] for s in group], pad_id)
        ids, positions = ids.to(device), positions.to(device)
        captures = capture_attention(model, ids, positions)
        n = ids.shape[1]
        unit_sets = []
        for u in units:
            per_seq = plans[u][0]
            unit_ids = torch.full((len(group), n), -1, dtype=torch.long)
            for row, s in enumerate(group):
                off, length = layout.offsets[s], len(layout.sequences[s].input_ids)
                ids_s = remap[u][torch.tensor(per_seq[s], dtype=torch.long)]
                index = torch.arange(off, off + length)
                unit_ids[row, :length] = torch.where((index >= start) & (index < stop), ids_s, -1)
            unit_sets.append((unit_ids.to(device), len(shown[u])))
        # queries and keys outside the range carry unit -1; with one sequence, skip its rows outright
        first = layout.offsets[group[0]]
        row_range = (0, n) if len(group) > 1 else (max(0, start - first), min(n, stop - first))
        for layer in layers:
            cap = captures[layer]
            q, k = cap.q, cap.k
            if head is not None:
                q, k = q[:, :, head : head + 1], k[:, :, head : head + 1]
            pooled = pooled_attention_maps(
                q, k, positions, windows, cap.max_level, unit_sets, row_range=row_range
            )
            for u, maps in zip(units, pooled, strict=True):
                sums[(layer, u)][: maps.shape[0]] += maps.cpu()
        if on_batch is not None:
            on_batch(len(group))

    result = {}
    for u in units:
        _, unit_starts, labels, owners = plans[u]
        ends = unit_starts[1:] + [layout.num_tokens]
        picked = shown[u]
        counts = [min(ends[i], stop) - max(unit_starts[i], start) for i in picked]  # query tokens in range
        breaks = [p for p, i in enumerate(picked) if p == 0 or owners[i] != owners[picked[p - 1]]]
        doc_units = [p for p, i in enumerate(picked) if labels[i] == "[DOC]"]
        q_counts = torch.tensor(counts, dtype=torch.float64).clamp(min=1)
        for layer in layers:
            heads_sum = sums[(layer, u)]
            if head is not None:
                heads_sum = heads_sum[:1]
            per_head = heads_sum / q_counts[None, :, None]
            result[(layer, u)] = DocumentMap(
                layer,
                head,
                u,
                start,
                stop,
                [labels[i] for i in picked],
                [unit_starts[i] for i in picked],
                breaks,
                counts,
                per_head.mean(0),
                per_head,
                doc_units,
            )
    return result


def capture_map(
    capture: Any,
    positions: Any,
    window_size_per_level: Sequence[int],
    tokens: Sequence[str],
    unit: str = "sentences",
    sample: int = 0,
) -> DocumentMap:
    """The map of one sequence of a batch from a layer capture (what training logs; no forward pass)."""
    from lhtcli.core.positions import TokenizedSequence

    one = positions.batched()[sample : sample + 1]
    n = int(one.real_mask.sum())
    trimmed = one.__class__([e[:, :n] for e in one.level_enums], one.has_doc_token)
    seq = TokenizedSequence(list(range(n)), trimmed[0])
    layout = DocumentLayout.build([seq], lambda i: str(tokens[i]) if i < len(tokens) else str(i))
    per_seq, starts, labels, _ = layout.unit_ids(unit)
    units = torch.tensor([per_seq[0]], dtype=torch.long, device=capture.q.device)
    q, k = capture.q[sample : sample + 1, :n], capture.k[sample : sample + 1, :n]
    pooled = pooled_attention_maps(q, k, trimmed.to(q.device), window_size_per_level, capture.max_level,
                                   [(units, len(starts))])[0].cpu()
    counts = torch.bincount(units[0].cpu(), minlength=len(starts)).tolist()
    per_head = pooled / torch.tensor(counts, dtype=torch.float64).clamp(min=1)[None, :, None]
    doc_units = [i for i, label in enumerate(labels) if label == "[DOC]"]
    return DocumentMap(capture.layer, None, unit, 0, n, labels, starts, [0], counts, per_head.mean(0), per_head,
                       doc_units)


__all__ = ["UNITS", "DocumentLayout", "DocumentMap", "capture_map", "document_maps"]
