"""The ML-SWA allowed-pair rule (DESIGN.md section 3), evaluated densely for chosen query rows.

This is the definition everything else is tested against. It builds [B, R, N] tensors, so it is for
references, small diagnostics and chosen rows — never the training path at long lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lhtcli.core.positions import HierarchicalPositions

# Codes of the pair-level map: the lowest rule that allows a pair.
MASKED = -1
DOC_LINK = 3  # one past the largest level index


def resolve_max_level(windows: Sequence[int], max_level: int | None) -> int:
    top = len(windows) - 1
    if max_level is None:
        return top
    if not 0 <= max_level <= top:
        raise ValueError(f"max_level must be between 0 and {top}, got {max_level}")
    return max_level


def doc_rule_active(positions: HierarchicalPositions, windows: Sequence[int], max_level: int) -> bool:
    """[DOC] is global to the top level's participants, in layers where the top level is active."""
    top = len(windows) - 1
    return positions.has_doc_token and top >= 1 and max_level == top


def level_enums(positions: HierarchicalPositions, windows: Sequence[int]) -> torch.Tensor:
    """The [L, B, N] enumerations the windows refer to (extra levels in ``positions`` are ignored)."""
    if positions.num_levels < len(windows):
        raise ValueError(
            f"{len(windows)} windows given but the positions have only {positions.num_levels} levels"
        )
    return torch.stack(positions.batched().level_enums[: len(windows)])


def pair_level_map(
    positions: HierarchicalPositions,
    windows: Sequence[int],
    max_level: int | None = None,
    rows: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 [B, R, K]: for each (query row, key), the lowest level that allows the pair
    (0 tokens, 1 sentences, 2 sections, ``DOC_LINK`` for the [DOC] rule) or ``MASKED``.

    ``rows`` and ``keys`` are 1-D tensors of query and key indices (all N when None).
    """
    max_level = resolve_max_level(windows, max_level)
    enums = level_enums(positions, windows)
    _, batch, n = enums.shape
    if rows is None:
        rows = torch.arange(n, device=enums.device)
    if keys is None:
        keys = torch.arange(n, device=enums.device)
    rows, keys = rows.to(enums.device), keys.to(enums.device)
    result = torch.full((batch, rows.numel(), keys.numel()), MASKED, dtype=torch.int8, device=enums.device)
    for level in range(max_level, -1, -1):  # lowest level written last wins
        e = enums[level]
        eq = e[:, rows, None]
        ek = e[:, None, keys]
        ok = (eq != 0) & (ek != 0) & ((eq - ek).abs() <= windows[level])
        result = torch.where(ok, torch.tensor(level, dtype=torch.int8, device=e.device), result)
    if doc_rule_active(positions, windows, max_level):
        top = enums[len(windows) - 1]
        doc_real = enums[0][:, 0] != 0  # [B]
        is_doc_query = (rows == 0)[None, :, None] & doc_real[:, None, None]
        top_keys = (top[:, keys] != 0)[:, None, :]
        is_doc_key = keys == 0
        top_queries = (top[:, rows] != 0)[:, :, None]
        doc_pair = (is_doc_query & top_keys) | (top_queries & is_doc_key[None, None, :] & doc_real[:, None, None])
        result = torch.where(doc_pair & (result == MASKED), torch.tensor(DOC_LINK, dtype=torch.int8), result)
    return result


def mlswa_dense_mask(
    positions: HierarchicalPositions,
    window_size_per_level: Sequence[int],
    max_level: int | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool [B, N, N] (or [B, R, N] for chosen ``rows``): True where the query may attend the key."""
    return pair_level_map(positions, window_size_per_level, max_level, rows) != MASKED
