"""ML-SWA whose windows cover the whole sequence is full attention: training follows the same losses.

The ML-SWA run uses the linear-cost compact backend; the reference run replaces every attention call
with plain full attention (``F.scaled_dot_product_attention``, only padding keys masked). Same seed,
same batches, same AdamW steps: the losses must agree step for step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lhtcli.config import ModelConfig
from lhtcli.core.attention import MLSWAContext
from lhtcli.core.positions import HierarchicalPositions, positions_from_lengths
from lhtcli.model import LHTEncoder
from lhtcli.training.optimizer import build_adamw

VOCAB, STEPS = 60, 6


def full_attention(self: MLSWAContext, q, k, v, max_level: int, scale: float | None = None) -> torch.Tensor:
    """Every real query attends every real key: [B, H, N, D] like MLSWAContext.attend."""
    keys = self.positions.real_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=scale)
    return out * self.positions.real_mask[:, None, :, None]  # padded queries give 0, as ML-SWA does


def batches() -> list[tuple[torch.Tensor, HierarchicalPositions, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    positions = HierarchicalPositions.batch(
        [positions_from_lengths([[5, 7], [9, 3, 6]]), positions_from_lengths([[4, 4], [6]])]
    )
    real = positions.real_mask
    result = []
    for _ in range(STEPS):
        ids = torch.randint(5, VOCAB, real.shape, generator=gen).masked_fill(~real, 0)
        chosen = (torch.rand(real.shape, generator=gen) < 0.3) & real
        chosen[:, 0] = False
        result.append((ids, positions, torch.where(chosen, ids, -100)))
    return result


def train() -> list[float]:
    n = 40  # longer than any sequence: every window covers everything
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=2, num_layers=2, d_ff=64, dropout=0.1, max_seq_len=n,
                      mlswa=dict(num_levels=3, window_size_per_level=[n, n, n], layer_max_level=[1, 2],
                                 backend="compact"))
    torch.manual_seed(0)
    model = LHTEncoder(cfg).train()
    opt = build_adamw(model, lr=3e-3, weight_decay=0.01)
    losses = []
    for step, (ids, positions, labels) in enumerate(batches()):
        torch.manual_seed(100 + step)  # the same dropout masks in both runs
        opt.zero_grad(set_to_none=True)
        loss = model(ids, positions, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_covering_windows_train_like_full_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    mlswa = train()
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return full_attention(*args, **kwargs)

    monkeypatch.setattr(MLSWAContext, "attend", counted)
    dense = train()
    assert len(calls) == 2 * STEPS  # every layer of every step ran the reference
    assert mlswa[-1] < mlswa[0]  # it learns
    assert mlswa == pytest.approx(dense, rel=1e-4, abs=1e-5)
