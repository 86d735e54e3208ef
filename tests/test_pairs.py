"""Block-wise exact pair probabilities (core/pairs.py) against the float64 dense reference."""

from __future__ import annotations

import pytest
import torch
from test_probing import dense_reference, random_batch

from lhtcli.core.mask import MASKED, pair_level_map
from lhtcli.core.pairs import iter_pair_blocks, mlswa_pair_stats, pooled_attention
from lhtcli.core.probing import mlswa_attention_probs, mlswa_row_stats

CASES = [([3, 1, 1], 2, True), ([3, 1, 1], 1, True), ([2, 1, 1], 0, False), ([2, 1], 1, False), ([4], 0, True)]


def qk(positions, heads=2, dim=8, seed=7):
    gen = torch.Generator().manual_seed(seed)
    b, n = positions.batch_size, positions.seq_len
    return (torch.randn(b, n, heads, dim, generator=gen, dtype=torch.float64) * 2 for _ in range(2))


@pytest.mark.parametrize(("windows", "max_level", "doc"), CASES)
def test_blocks_cover_every_allowed_pair_once_with_exact_probabilities(windows, max_level, doc):
    positions = random_batch(seed=max_level + 5 * doc, doc_token=doc)
    q, k = qk(positions)
    probs_ref, _, _, _ = dense_reference(q, k, positions, windows, max_level)  # [B, N, H, N]
    levels = pair_level_map(positions, windows, max_level)
    rebuilt = torch.zeros_like(probs_ref)
    seen = torch.zeros(levels.shape, dtype=torch.long)
    for blk in iter_pair_blocks(q, k, positions, windows, max_level, block_rows=3):
        owned = blk.codes != MASKED
        assert torch.equal(blk.codes[owned], levels[:, blk.rows][:, :, blk.keys][owned])
        head_major = rebuilt.permute(0, 2, 1, 3)  # a view [B, H, N, N]
        head_major[:, :, blk.rows[:, None], blk.keys[None, :]] += blk.probs.permute(0, 2, 1, 3)
        seen[:, blk.rows[:, None], blk.keys[None, :]] += owned.long()
    assert torch.equal(seen, (levels != MASKED).long())  # each allowed pair exactly once
    torch.testing.assert_close(rebuilt, probs_ref, rtol=1e-10, atol=1e-12)


def test_sink_mass_and_max_logit_match_dense():
    positions = random_batch(seed=4, doc_token=True)
    windows = [3, 1, 1]
    q, k = qk(positions, seed=9)
    stats = mlswa_row_stats(q, k, positions, windows)
    pair = mlswa_pair_stats(q, k, positions, windows, lse=stats.lse, sink_tokens=2)
    probs = mlswa_attention_probs(q, k, positions, windows)  # [B, N, H, N]
    torch.testing.assert_close(pair.sink_mass, probs[..., :2].sum(-1), rtol=1e-10, atol=1e-12)
    allowed = pair_level_map(positions, windows) != MASKED
    assert torch.equal(pair.sink_visible, allowed[..., :2].any(-1))
    scores = torch.einsum("bnhd,bkhd->bnhk", q, k) / 8**0.5
    ref_max = scores.masked_fill(~allowed[:, :, None], float("-inf")).amax(-1)
    torch.testing.assert_close(pair.max_logit, ref_max)


def test_pooled_map_sums_dense_probabilities_per_unit_and_zoom():
    positions = random_batch(seed=8, doc_token=True, batch=1)
    windows = [3, 1, 1]
    q, k = qk(positions, seed=2)
    n = positions.seq_len
    units = torch.arange(n)[None] % 3
    units[0, positions.real_mask[0].logical_not()] = -1
    pooled = pooled_attention(q, k, positions, windows, None, units, 3)
    probs = mlswa_attention_probs(q, k, positions, windows)[0]  # [N, H, N]
    onehot = torch.nn.functional.one_hot(units[0].clamp(min=0), 3).double() * (units[0] >= 0)[:, None]
    ref = torch.einsum("qu,qhk,kv->huv", onehot, probs, onehot)
    torch.testing.assert_close(pooled, ref, rtol=1e-10, atol=1e-12)
    zoom = pooled_attention(q, k, positions, windows, None, units, 3, row_range=(2, 5))
    ref_zoom = torch.einsum("qu,qhk,kv->huv", onehot[2:5], probs[2:5], onehot)
    torch.testing.assert_close(zoom, ref_zoom, rtol=1e-10, atol=1e-12)
