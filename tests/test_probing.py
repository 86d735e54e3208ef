"""Exact attention probes against a float64 dense reference built from the mask definition."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lhtcli.core.mask import DOC_LINK, MASKED, pair_level_map
from lhtcli.core.positions import HierarchicalPositions, positions_from_lengths
from lhtcli.core.probing import (
    mlswa_attention_entropy,
    mlswa_attention_probs,
    mlswa_level_mass,
    mlswa_row_stats,
)


def random_batch(seed: int, doc_token: bool, batch: int = 3) -> HierarchicalPositions:
    rng = random.Random(seed)
    items = []
    for _ in range(batch):
        doc = [[rng.randint(1, 5) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 5))]
        items.append(positions_from_lengths(doc, doc_token=doc_token))
    longest = max(p.seq_len for p in items)
    return HierarchicalPositions.batch(items, pad_to=longest + 3)  # every row has padding


def dense_reference(q, k, positions, windows, max_level):
    """float64 probabilities [B, R, H, N], entropy [B, N, H] and per-level mass [B, N, H, L] from the dense
    pair-level map; q and k are [B, N, H, D] like the probes'."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    levels = pair_level_map(positions, windows, max_level).long()  # [B, N, N]
    allowed = levels != MASKED
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores, -1, keepdim=True)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    probs = torch.where(allowed[:, None], probs, torch.zeros_like(probs))
    logp = torch.where(probs > 0, torch.log(probs), torch.zeros_like(probs))
    entropy = -(probs * logp).sum(-1)
    top = len(windows) - 1
    codes = torch.where(levels == DOC_LINK, torch.full_like(levels, top), levels)
    mass = torch.stack([(probs * (codes == lvl)[:, None]).sum(-1) for lvl in range(len(windows))], -1)
    return probs.transpose(1, 2), entropy.transpose(1, 2), allowed.sum(-1), mass.transpose(1, 2)


CASES = [
    (windows, max_level, doc)
    for windows in ([3, 1, 1], [2, 1], [4])
    for max_level in range(len(windows))
    for doc in (True, False)
]


@pytest.mark.parametrize(("windows", "max_level", "doc"), CASES)
def test_probes_match_dense_reference(windows, max_level, doc):
    positions = random_batch(seed=len(windows) * 10 + max_level * 2 + doc, doc_token=doc)
    b, n = positions.batch_size, positions.seq_len
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(b, n, 2, 8, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(b, n, 2, 8, generator=gen, dtype=torch.float64) * 2
    probs_ref, entropy_ref, counts_ref, mass_ref = dense_reference(q, k, positions, windows, max_level)
    real = positions.real_mask

    probs = mlswa_attention_probs(q, k, positions, windows, max_level)
    torch.testing.assert_close(probs, probs_ref, rtol=1e-10, atol=1e-12)
    row_real = real[:, :, None].expand(b, n, 2)
    sums = probs.sum(-1)[row_real]
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert (probs[~row_real] == 0).all()

    entropy, counts = mlswa_attention_entropy(q, k, positions, windows, max_level)
    torch.testing.assert_close(entropy, entropy_ref, rtol=1e-9, atol=1e-10)
    assert torch.equal(counts, counts_ref)
    assert (counts[~real] == 0).all()

    mass = mlswa_level_mass(q, k, positions, windows, max_level)
    torch.testing.assert_close(mass, mass_ref, rtol=1e-9, atol=1e-12)
    assert not torch.isnan(mass).any()
    assert (mass[..., max_level + 1 :] == 0).all()


def test_chosen_rows_and_float32_inputs():
    positions = random_batch(seed=3, doc_token=True, batch=2)
    b, n = positions.batch_size, positions.seq_len
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(b, n, 3, 4, generator=gen)
    k = torch.randn(b, n, 3, 4, generator=gen)
    windows = [2, 1, 1]
    rows = torch.tensor([0, 5, n - 1])
    full = mlswa_attention_probs(q, k, positions, windows)
    chosen = mlswa_attention_probs(q, k, positions, windows, rows=rows)
    assert chosen.dtype == torch.float32
    assert chosen.shape == (b, 3, 3, n)  # [B, R, H, N]
    torch.testing.assert_close(chosen, full[:, rows])
    # float32 inputs, float64 maths: entropy near zero stays accurate
    probs_ref, entropy_ref, _, _ = dense_reference(q, k, positions, windows, 2)
    entropy, _ = mlswa_attention_entropy(q, k, positions, windows)
    assert entropy.dtype == torch.float64
    torch.testing.assert_close(entropy, entropy_ref, rtol=1e-9, atol=1e-10)


def test_peaked_rows_keep_entropy_digits():
    """Nearly one-hot rows: small entropies keep their digits (absolute error at float64 rounding)."""
    positions = positions_from_lengths([[6, 6]]).batched()
    n = positions.seq_len
    k = torch.randn(1, n, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    q = k * 30.0  # each query prefers its own key by a wide margin
    _, entropy_ref, _, _ = dense_reference(q, k, positions, [3, 1, 1], 2)
    entropy, _ = mlswa_attention_entropy(q, k, positions, [3, 1, 1])
    torch.testing.assert_close(entropy, entropy_ref, rtol=1e-6, atol=1e-12)
    assert entropy.max() < 1.0


def test_row_stats_normalised_entropy_and_single_key_rows():
    # window 0 at every level and no [DOC]: each token sees only itself -> count 1 -> NaN normalised
    positions = positions_from_lengths([[2, 1]], doc_token=False).batched()
    q = torch.randn(1, positions.seq_len, 1, 4, generator=torch.Generator().manual_seed(6))
    stats = mlswa_row_stats(q, q, positions, [0, 0, 0])
    assert stats.key_counts.tolist() == [[1, 1, 1]]
    assert torch.all(stats.entropy == 0)
    assert torch.isnan(stats.normalized_entropy).all()
    # uniform attention: normalised entropy is 1
    positions = positions_from_lengths([[5]], doc_token=True).batched()
    zeros = torch.zeros(1, positions.seq_len, 2, 4)
    stats = mlswa_row_stats(zeros, zeros, positions, [8, 1, 1])
    torch.testing.assert_close(stats.normalized_entropy, torch.ones(1, 6, 2, dtype=torch.float64))


def test_size_limit_and_bad_arguments(monkeypatch):
    import lhtcli.core.probing as probing

    positions = positions_from_lengths([[4, 4]]).batched()
    q = torch.randn(1, positions.seq_len, 2, 4, generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(probing, "MAX_PROB_ELEMENTS", 10)
    with pytest.raises(ValueError, match="select fewer query rows"):
        mlswa_attention_probs(q, q, positions, [2, 1, 1])
    with pytest.raises(ValueError, match="rows must be"):
        mlswa_attention_probs(q, q, positions, [2, 1, 1], rows=[99])
    with pytest.raises(ValueError, match=r"\[B, N, H, D\]"):
        mlswa_attention_entropy(q[0], q[0], positions, [2, 1, 1])
    with pytest.raises(ValueError, match="max_level"):
        mlswa_level_mass(q, q, positions, [2, 1, 1], max_level=3)


@pytest.mark.parametrize("doc", [True, False])
@pytest.mark.parametrize("max_level", [0, 1, 2])
def test_flash_statistics_path_equals_the_explicit_one(doc: bool, max_level: int):
    """The fused-kernel path mlswa_row_stats takes on CPU gives the explicit path's out, lse and level lses."""
    from lhtcli.core.attention import build_mlswa_plan, compact_attention, flash_compact_result

    rng = random.Random(max_level + 10 * doc)
    docs = [[[rng.randint(1, 9) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(2, 6))]
            for _ in range(2)]
    items = [positions_from_lengths(d, doc_token=doc) for d in docs]
    positions = HierarchicalPositions.batch(items, pad_to=max(p.seq_len for p in items) + 2)
    windows = [4, 2, 1]
    plan = build_mlswa_plan(positions, windows, max_level)
    assert plan.levels[0].is_prefix
    b, n = positions.batch_size, positions.seq_len
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(b, 2, n, 8, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
    fast = flash_compact_result(q, k, k, plan, collect_levels=True)  # the kernels are head-major
    slow = compact_attention(q, k, k, plan, collect_levels=True)
    torch.testing.assert_close(fast.out, slow.out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.lse, slow.lse, rtol=1e-12, atol=1e-12)
    assert fast.level_lse is not None and slow.level_lse is not None
    for got, want in zip(fast.level_lse, slow.level_lse, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # the probes are token-major
    _, entropy_ref, _, mass_ref = dense_reference(q, k, positions, windows, max_level)
    stats = mlswa_row_stats(q, k, positions, windows, max_level, plan=plan)
    torch.testing.assert_close(stats.entropy, entropy_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(stats.level_mass, mass_ref, rtol=1e-9, atol=1e-12)
