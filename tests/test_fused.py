"""The fused fast paths (lhtcli/fused/) against the reference model (lhtcli/model.py): the same weights in
both modes give the same loss, gradients, hidden states and captures.

Each fused piece is also held against float64 math of its own: dropout in test_model.py and
test_native_kernel.py (Philox masks), q/k/v + RoPE, bias + GELU, the MLM loss and the residual + LayerNorm
in test_native_elementwise.py, the labelled-rows-only last layer in test_model.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lhtcli.config import ModelConfig
from lhtcli.core.positions import HierarchicalPositions, positions_from_lengths
from lhtcli.model import LHTEncoder


def _pair(dtype: torch.dtype, rope: bool = True, dropout: float = 0.0):
    cfg = ModelConfig(vocab_size=70, d_model=32, n_heads=2, num_layers=3, d_ff=64, dropout=dropout,
                      max_seq_len=48, rope=rope,
                      mlswa=dict(num_levels=3, window_size_per_level=[3, 1, 1], layer_max_level=[0, 1, 2]))
    torch.manual_seed(0)
    fused = LHTEncoder(cfg).to(dtype).train()
    reference = copy.deepcopy(fused)
    reference.fused = False
    return fused, reference


def _batch():
    positions = HierarchicalPositions.batch([positions_from_lengths(d) for d in ([[4, 6], [5, 3, 2]], [[7], [2, 9]])])
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 70, (positions.batch_size, positions.seq_len), generator=gen) * positions.real_mask
    labels = torch.where((torch.rand(ids.shape, generator=gen) < 0.3) & positions.real_mask, ids, -100)
    labels[:, 1] = ids[:, 1]
    return ids, positions, labels


def _run(model, ids, positions, labels, return_logits):
    model.zero_grad(set_to_none=True)
    out = model(ids, positions, labels=labels, return_logits=return_logits, capture=True)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("return_logits", [True, False])
@pytest.mark.parametrize("rope", [True, False])
def test_fused_and_reference_agree_in_float32_through_the_native_kernels(kernel, return_logits, rope):
    fused, reference = _pair(torch.float32, rope)
    ids, positions, labels = _batch()
    got, got_grads = _run(fused, ids, positions, labels, return_logits)
    want, want_grads = _run(reference, ids, positions, labels, return_logits)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.hidden, want.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.mlm_logits, want.mlm_logits, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    for g, w in zip(got.captures, want.captures, strict=True):
        assert (g.layer, g.max_level) == (w.layer, w.max_level)
        torch.testing.assert_close(g.q, w.q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.k, w.k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("return_logits", [True, False])
def test_fused_and_reference_agree_in_float64(return_logits):
    """float64 takes PyTorch's ops inside the fused pieces: only the plumbing (norms carried between
    blocks, labelled rows only, the one-pass q/k/v backward) differs, and it is exact."""
    fused, reference = _pair(torch.float64)
    ids, positions, labels = _batch()
    got, got_grads = _run(fused, ids, positions, labels, return_logits)
    want, want_grads = _run(reference, ids, positions, labels, return_logits)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.mlm_logits, want.mlm_logits, atol=1e-12, rtol=1e-10)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-12, rtol=1e-9, msg=name)


def test_switching_modes_keeps_parameters_and_eval_outputs():
    fused, _ = _pair(torch.float32, dropout=0.1)
    ids, positions, _ = _batch()
    fused.eval()
    with torch.no_grad():
        a = fused(ids, positions).mlm_logits
        fused.fused = False
        b = fused(ids, positions).mlm_logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dropout_rates_agree_between_modes():
    """The fused dropout draws other masks than nn.Dropout, at the same rate and scale."""
    from lhtcli.fused.dropout import dropout

    torch.manual_seed(0)
    x = torch.ones(200_000)
    fused, reference = dropout(x, 0.1), torch.nn.functional.dropout(x, 0.1)
    for y in (fused, reference):
        assert abs((y == 0).double().mean().item() - 0.1) < 0.004
        assert abs(y.double().mean().item() - 1.0) < 0.005
