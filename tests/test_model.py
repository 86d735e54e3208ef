import pytest
import torch

from lhtcli.config import ModelConfig
from lhtcli.core import HierarchicalPositions, positions_from_lengths
from lhtcli.fused.dropout import Dropout
from lhtcli.fused.qkv import split_rotated
from lhtcli.model import LHTEncoder, RotaryEmbedding, apply_rotary


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=64, d_model=32, n_heads=4, num_layers=3, d_ff=64, dropout=0.0, max_seq_len=64,
        mlswa=dict(num_levels=3, window_size_per_level=[3, 1, 1], layer_max_level=[0, 1, 2]),
    )
    base.update(overrides)
    return ModelConfig(**base)


def padded_batch():
    docs = [[[3, 2], [4, 1, 2]], [[5, 5, 5], [2], [1, 1]]]
    positions = [positions_from_lengths(d) for d in docs]
    batch = HierarchicalPositions.batch(positions)
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(batch.batch_size, batch.seq_len, dtype=torch.long)
    singles = []
    for row, p in enumerate(positions):
        row_ids = torch.randint(5, 64, (p.seq_len,), generator=g)
        ids[row, : p.seq_len] = row_ids
        singles.append((row_ids, p))
    return ids, batch, singles


@pytest.mark.parametrize("backend", ["compact", "dense"])
@pytest.mark.parametrize("rope", [True, False])
def test_padding_does_not_change_real_outputs(backend, rope):
    torch.manual_seed(0)
    cfg = tiny_config(rope=rope, mlswa=dict(num_levels=3, window_size_per_level=[3, 1, 1],
                                            layer_max_level=[0, 1, 2], backend=backend))
    model = LHTEncoder(cfg).eval()
    ids, batch, singles = padded_batch()
    out = model(ids, batch)
    for row, (row_ids, p) in enumerate(singles):
        alone = model(row_ids[None], p)
        torch.testing.assert_close(out.hidden[row, : p.seq_len], alone.hidden[0], atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(out.hidden[row, p.seq_len :]) == 0


def test_forward_backward_with_labels_gives_finite_gradients():
    torch.manual_seed(0)
    model = LHTEncoder(tiny_config(dropout=0.1)).train()
    ids, batch, _ = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[:, 1:4] = ids[:, 1:4]
    out = model(ids, batch, labels=labels)
    assert out.mlm_logits.shape == (*ids.shape, 64)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_compact_and_dense_backends_agree():
    torch.manual_seed(1)
    ids, batch, _ = padded_batch()
    compact = LHTEncoder(tiny_config()).eval()
    dense_cfg = tiny_config(mlswa=dict(num_levels=3, window_size_per_level=[3, 1, 1],
                                       layer_max_level=[0, 1, 2], backend="dense"))
    dense = LHTEncoder(dense_cfg).eval()
    dense.load_state_dict(compact.state_dict())
    torch.testing.assert_close(compact(ids, batch).mlm_logits, dense(ids, batch).mlm_logits, atol=1e-5, rtol=1e-5)


def test_capture_returns_rotated_q_k_per_layer_only_on_request():
    model = LHTEncoder(tiny_config()).eval()
    ids, batch, _ = padded_batch()
    assert model(ids, batch).captures == []
    captures = model(ids, batch, capture=True).captures
    assert [c.layer for c in captures] == [0, 1, 2]
    assert [c.max_level for c in captures] == [0, 1, 2]
    assert captures[0].q.shape == (2, batch.seq_len, 4, 8)  # [B, N, H, D]


def test_parameter_count_and_weight_tying():
    model = LHTEncoder(tiny_config())
    assert model.mlm_head.embedding.weight is model.token_embedding.weight
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.flops_per_token(64) > 6 * model.num_parameters() * 0.5


def test_rejects_too_long_sequence():
    model = LHTEncoder(tiny_config(max_seq_len=8))
    p = positions_from_lengths([[20]])
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, p.seq_len, dtype=torch.long), p)


def test_masked_only_head_gives_the_same_loss():
    torch.manual_seed(0)
    model = LHTEncoder(tiny_config()).eval()
    ids, batch, _ = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[:, 2:6] = ids[:, 2:6]
    full = model(ids, batch, labels=labels)
    masked = model(ids, batch, labels=labels, return_logits=False)
    torch.testing.assert_close(masked.loss, full.loss)
    assert masked.mlm_logits.shape == (int((labels != -100).sum()), 64)



def _loss_and_grads(model, ids, batch, labels, return_logits):
    model.zero_grad(set_to_none=True)
    out = model(ids, batch, labels=labels, return_logits=return_logits)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["compact", "dense"])
def test_training_forward_on_labelled_rows_has_the_full_loss_and_gradients(dtype, backend, request):
    """return_logits=False runs the last layer's projection and MLP on the labelled rows only: the loss
    and every parameter's gradient must equal the full computation's (float32 through the native passes)."""
    if dtype == torch.float32:
        request.getfixturevalue("kernel")
    torch.manual_seed(0)
    model = LHTEncoder(tiny_config(mlswa=dict(num_levels=3, window_size_per_level=[3, 1, 1],
                                              layer_max_level=[0, 1, 2], backend=backend))).to(dtype).train()
    ids, batch, _ = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4, 8]] = ids[0, [1, 4, 8]]
    labels[1, [0, 9]] = ids[1, [0, 9]]
    full, full_grads = _loss_and_grads(model, ids, batch, labels, True)
    pruned, pruned_grads = _loss_and_grads(model, ids, batch, labels, False)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(pruned.loss, full.loss, **tol)
    assert pruned.hidden.shape == (5, 32) and pruned.mlm_logits.shape == (5, 64)
    torch.testing.assert_close(pruned.hidden, full.hidden[labels != -100], **tol)
    assert pruned_grads.keys() == full_grads.keys()
    assert full_grads["blocks.2.mlp.fc.weight"].abs().sum() > 0
    for name, grad in full_grads.items():
        torch.testing.assert_close(pruned_grads[name], grad, **tol, msg=name)


def test_training_forward_with_no_labelled_rows_gives_a_nan_loss_and_no_error():
    model = LHTEncoder(tiny_config()).train()
    ids, batch, _ = padded_batch()
    out = model(ids, batch, labels=torch.full_like(ids, -100), return_logits=False)
    assert out.hidden.shape == (0, 32) and torch.isnan(out.loss)


def test_flops_per_token_counts_the_last_layer_on_the_head_rows_only():
    model = LHTEncoder(tiny_config())
    cfg = model.cfg
    last_layer_tail = 2 * (cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff)  # projection + MLP, forward
    assert model.flops_per_token(64) - model.flops_per_token(64, head_fraction=0.25) == pytest.approx(
        3 * 0.75 * (last_layer_tail + 2 * cfg.d_model * (cfg.d_model + cfg.vocab_size))
    )

def _pairwise_rotation(x, angles):
    """RoPE as written in the paper: pair (x[2i], x[2i+1]) turned by angle i, in real arithmetic."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


def test_rotary_equals_the_pairwise_rotation_on_strided_views_in_float64():
    torch.manual_seed(0)
    batch, n, heads, dim = 2, 7, 3, 8
    qkv = torch.randn(batch, n, 3, heads, dim, dtype=torch.float64).permute(2, 0, 3, 1, 4)  # the model's view
    token_pos = torch.arange(n).expand(batch, n)
    rope = RotaryEmbedding(dim)
    rotation = rope(token_pos)
    angles = (token_pos.float()[..., None] * rope.inv_freq)[:, None].double()
    for x in (qkv[:2], qkv[1], qkv[0].contiguous()):
        assert torch.allclose(apply_rotary(x, rotation), _pairwise_rotation(x, angles), atol=1e-6, rtol=0)
        assert apply_rotary(x, rotation).dtype == torch.float64


def test_rotary_scores_depend_only_on_the_offset_and_gradients_flow():
    torch.manual_seed(0)
    dim = 16
    rope = RotaryEmbedding(dim)
    q, k = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    rotation = rope(torch.arange(40)[None])[0, 0]  # [N, D/2]
    def score(i, j):
        return apply_rotary(q, rotation[i]) @ apply_rotary(k, rotation[j])
    assert score(3, 1) == pytest.approx(float(score(30, 28)), abs=1e-5)
    assert score(3, 1) != pytest.approx(float(score(3, 2)), abs=1e-3)
    x = torch.randn(2, 5, dim, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, rotation[:5].to(torch.complex128)), (x,))


def test_rotary_keeps_half_precision_inputs_in_their_dtype():
    x = torch.randn(2, 4, 8).to(torch.bfloat16)
    rotation = RotaryEmbedding(8)(torch.arange(4)[None])[0, 0]
    out = apply_rotary(x, rotation)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), apply_rotary(x.float(), rotation), atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dropout_drops_p_of_the_values_scales_the_rest_and_gradients_follow_the_mask(dtype):
    torch.manual_seed(0)
    layer = Dropout(0.25)
    x = torch.rand(1000, 1000, dtype=torch.float64).add_(0.5).to(dtype).requires_grad_(True)
    y = layer(x)
    assert y.dtype == dtype
    dropped = y == 0
    assert abs(dropped.double().mean().item() - 0.25) < 0.003
    for lane in range(4):  # each 16-bit quarter of a 64-bit draw is an independent uniform source
        assert abs(dropped.flatten()[lane::4].double().mean().item() - 0.25) < 0.005
    kept = ~dropped
    assert torch.allclose(y[kept].double(), x[kept].double() / 0.75, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    y.sum().backward()
    assert torch.equal(x.grad == 0, dropped)
    torch.manual_seed(1)
    first = layer(x.detach())
    torch.manual_seed(1)
    assert torch.equal(layer(x.detach()), first)  # seeded: training stays reproducible


def test_dropout_keeps_the_expectation_for_a_p_that_is_not_a_multiple_of_its_resolution():
    torch.manual_seed(0)
    x = torch.ones(4_000_000)
    y = Dropout(0.1).train()(x)
    assert abs((y == 0).double().mean().item() - 0.1) < 0.001
    assert abs(y.double().mean().item() - 1.0) < 0.002


def test_dropout_is_the_identity_in_eval_and_at_zero():
    x = torch.randn(50, 50)
    assert Dropout(0.0).train()(x) is x
    assert Dropout(0.5).eval()(x) is x
    with pytest.raises(ValueError):
        Dropout(1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_split_rotated_matches_split_rotate_unbind_with_gradients(dtype):
    """The packed split with its one-pass backward gives the composed ops' values and gradients, for
    gradients of any layout (head-major views as SDPA returns them) and for unused outputs."""
    torch.manual_seed(0)
    batch, n, heads, dim = 2, 9, 3, 8
    qkv = torch.randn(batch, n, 3, heads, dim, dtype=torch.float64).to(dtype)
    rotation = RotaryEmbedding(dim)(torch.arange(n).expand(batch, n))[:, 0]  # [B, N, D/2]

    def composed(packed):
        qk, v = packed.split([2, 1], dim=2)
        q, k = apply_rotary(qk, rotation[:, :, None, None]).unbind(2)
        return q, k, v.squeeze(2)

    grads = [torch.randn(batch, heads, n, dim, dtype=torch.float64).to(dtype).transpose(1, 2) for _ in range(3)]
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-6, "rtol": 1e-6}
    for used in ([0, 1, 2], [0, 2], [1]):
        leaves = [qkv.clone().requires_grad_(True) for _ in range(2)]
        got, want = split_rotated(leaves[0], rotation), composed(leaves[1])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **tol)
        sum((got[i] * grads[i]).sum() for i in used).backward()
        sum((want[i] * grads[i]).sum() for i in used).backward()
        torch.testing.assert_close(leaves[0].grad, leaves[1].grad, **tol)
        assert leaves[0].grad.abs().sum() > 0


def test_split_rotated_passes_gradcheck():
    torch.manual_seed(0)
    qkv = torch.randn(1, 5, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    rotation = RotaryEmbedding(4)(torch.arange(5)[None])[:, 0]
    assert torch.autograd.gradcheck(lambda t: split_rotated(t, rotation), (qkv,))
    q, k, v = split_rotated(qkv, None)
    assert torch.equal(v, qkv[:, :, 2])
