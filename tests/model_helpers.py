"""A small encoder in training and one batch for it, shared by tests that compare two computation paths."""

from __future__ import annotations

import torch

from lhtcli.config import ModelConfig


def small_training_setup(vocab: int = 50):
    """(encoder in training mode with dropout 0.1, ids, positions, labels on ~30% of the tokens)."""
    from lhtcli.core.positions import positions_from_lengths
    from lhtcli.model import LHTEncoder

    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_heads=2, num_layers=2, d_ff=64, dropout=0.1, max_seq_len=40,
                      mlswa=dict(num_levels=2, window_size_per_level=[4, 2], layer_max_level=[0, 1]))
    torch.manual_seed(0)
    encoder = LHTEncoder(cfg).train()
    positions = positions_from_lengths([[5, 7], [9, 3, 6]])
    ids = torch.randint(5, vocab, (1, positions.seq_len))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    return encoder, ids, positions, labels


def loss_and_gradients(encoder, ids, positions, labels, return_logits: bool = False):
    """One forward+backward with the same dropout masks every time: (loss, {parameter name: gradient})."""
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = encoder(ids, positions, labels=labels, return_logits=return_logits).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
