"""The native elementwise kernels of a training step against float64 references: bias + GELU
(lhtcli/core/gelu_kernel.cpp) and the model's MLP through it, the attention inputs from the packed q/k/v
projection (lhtcli/core/qkv_kernel.cpp), the MLM loss (lhtcli/core/loss_kernel.cpp) and a block's residual
branch with the LayerNorm after it (lhtcli/core/norm_kernel.cpp). Dropout's are in test_native_kernel.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lhtcli.config import ModelConfig
from lhtcli.fused import gelu, qkv, residual
from lhtcli.fused import loss as fused_loss
from lhtcli.fused.dropout import Dropout
from lhtcli.fused.kernel import kernel_for
from lhtcli.fused.qkv import attention_inputs
from lhtcli.model import MLMHead, RotaryEmbedding, apply_rotary
from tests.model_helpers import loss_and_gradients, small_training_setup


def _reference(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU and its derivative in float64 through erfc, exact in the far tails too (F.gelu's float64
    1 + erf(z / sqrt 2) cancels to 0 below z ~ -8)."""
    z = z.double()
    cdf = 0.5 * torch.special.erfc(-z / math.sqrt(2))
    return z * cdf, cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


@pytest.mark.parametrize("features", [1, 15, 16, 37, 1024])
def test_bias_gelu_forward_matches_float64_with_relative_precision(kernel, features):
    gen = torch.Generator().manual_seed(features)
    h = torch.randn(3, 50, features, generator=gen) * 4
    h.view(-1)[: min(6, h.numel())] = torch.tensor([-30.0, -12.0, -9.0, 0.0, 9.0, 30.0])[: min(6, h.numel())]
    bias = torch.randn(features, generator=gen)
    z = h + bias
    y, derivative = kernel.bias_gelu_forward(h, bias, True)
    want_y, want_d = _reference(z)
    assert y.shape == h.shape and derivative.shape == h.shape
    # relative to each value (the tail included: rounding z^2 before the exp costs ~z^2 * 6e-8), with an
    # absolute floor at float32's smallest normal
    assert ((y.double() - want_y).abs() <= 1e-5 * want_y.abs() + 1e-37).all()
    assert ((y.double() - want_y).abs() <= 1e-6 * want_y.abs() + 1e-37)[z.abs() < 4].all()
    assert (derivative.double() - want_d).abs().max() < 1e-6
    y_only, none = kernel.bias_gelu_forward(h, bias, False)
    assert none.numel() == 0 and torch.equal(y_only, y)


def test_bias_gelu_keeps_the_far_tail_that_float32_erf_loses(kernel):
    z = torch.linspace(-13.0, -6.0, 701)
    y, _ = kernel.bias_gelu_forward(z[None], torch.zeros(z.numel()), False)
    want, _ = _reference(z)
    assert ((y[0].double() - want) / want).abs().max() < 1.5e-5
    torch_error = ((F.gelu(z).double() - want) / want).abs().max()
    assert torch_error > 1e-2  # PyTorch's float32 GELU: an absolute-error erf


@pytest.mark.parametrize("features", [7, 64, 1030])
def test_bias_gelu_backward_is_the_gradient_and_the_bias_gradient_its_column_sums(kernel, features):
    gen = torch.Generator().manual_seed(features + 1)
    h = torch.randn(70, features, generator=gen) * 3
    bias = torch.randn(features, generator=gen)
    grad = torch.randn(70, features, generator=gen)
    _, derivative = kernel.bias_gelu_forward(h, bias, True)
    grad_h, grad_bias = kernel.bias_gelu_backward(grad, derivative)
    _, want_d = _reference(h + bias)
    want_h = grad.double() * want_d
    assert (grad_h.double() - want_h).abs().max() < 2e-6 * grad.abs().max()
    assert (grad_bias.double() - want_h.sum(0)).abs().max() < 1e-5 * want_h.abs().sum(0).max()
    with pytest.raises(RuntimeError, match="one shape"):
        kernel.bias_gelu_backward(grad, derivative[:-1])


@pytest.mark.parametrize("threads", [1, 2])
def test_bias_gradient_does_not_depend_on_the_thread_count(kernel, threads):
    gen = torch.Generator().manual_seed(5)
    grad, derivative = torch.randn(513, 300, generator=gen), torch.rand(513, 300, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = kernel.bias_gelu_backward(grad, derivative)[1]
        torch.set_num_threads(3)
        assert torch.equal(kernel.bias_gelu_backward(grad, derivative)[1], got)
    finally:
        torch.set_num_threads(before)


def test_the_mlp_through_the_kernel_matches_float64_with_gradients(kernel, monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    x = torch.randn(2, 9, 24)
    calls = []
    real_apply = gelu._BiasGELU.apply
    monkeypatch.setattr(gelu._BiasGELU, "apply", lambda *a: calls.append(1) or real_apply(*a))
    leaf = x.clone().requires_grad_(True)
    out = gelu.linear_gelu(leaf, linear)
    assert calls == [1]
    grad = torch.randn(out.shape)
    got = torch.autograd.grad(out, [leaf, linear.weight, linear.bias], grad)

    ref_linear = torch.nn.Linear(24, 40).double()
    ref_linear.load_state_dict(linear.state_dict())
    ref_leaf = x.double().requires_grad_(True)
    ref_out = _reference(ref_linear(ref_leaf))[0]
    want = torch.autograd.grad(ref_out, [ref_leaf, ref_linear.weight, ref_linear.bias], grad.double())
    assert (out.double() - ref_out).abs().max() < 1e-5
    for g, w in zip(got, want, strict=True):
        assert (g.double() - w).abs().max() < 1e-4 * max(1.0, w.abs().max().item())
    with torch.no_grad():  # inference: no derivative kept, the same values
        assert torch.equal(gelu.linear_gelu(x, linear), out.detach())
    assert calls == [1]


def _recording(monkeypatch, function) -> list:
    """Calls of ``function.apply`` (an autograd.Function of lhtcli.fused) from now on."""
    calls = []
    real_apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(a) or real_apply(*a))
    return calls


def _qkv_reference(x, linear, heads, rotation):
    """q, k, v [B, H, N, D] in float64 from PyTorch's ops: the projection, a split, a complex rotation."""
    batch, n, _ = x.shape
    qkv = F.linear(x, linear.weight.double(), linear.bias.double()).view(batch, n, 3, heads, -1)
    q, k, v = qkv.unbind(2)
    if rotation is not None:
        rot = rotation.to(torch.complex128)[:, :, None]
        q, k = (apply_rotary(t, rot) for t in (q, k))
    return [t.transpose(1, 2) for t in (q, k, v)]


@pytest.mark.parametrize(("dim", "rope"), [(64, True), (6, True), (16, False)])  # vectors, scalar tail, no RoPE
def test_native_attention_inputs_match_float64_with_gradients_and_unused_outputs(kernel, monkeypatch, dim, rope):
    torch.manual_seed(dim)
    batch, n, heads, d_model = 2, 37, 3, 20
    linear = torch.nn.Linear(d_model, 3 * heads * dim)
    x = torch.randn(batch, n, d_model)
    rotation = RotaryEmbedding(dim)(torch.randint(0, 4000, (batch, n)))[:, 0] if rope else None  # [B, N, D/2]
    calls = _recording(monkeypatch, qkv._QKVHeads)
    # the attention kernels hand back token-major gradients, SDPA head-major ones: both layouts
    grads = [torch.randn(batch, n, heads, dim).transpose(1, 2), torch.randn(batch, heads, n, dim),
             torch.randn(batch, n, heads, dim).transpose(1, 2)]
    params = [linear.weight, linear.bias]
    for used in ([0, 1, 2], [0, 2], [1]):
        leaf, ref_leaf = x.clone().requires_grad_(True), x.double().requires_grad_(True)
        got = attention_inputs(leaf, linear, heads, rotation)
        want = _qkv_reference(ref_leaf, linear, heads, rotation)
        assert calls and calls[-1][-1] is kernel
        assert all(t.shape == (batch, heads, n, dim) and t.is_contiguous() for t in got)  # head-major
        for g, w in zip(got, want, strict=True):
            assert (g.double() - w).abs().max() < 1e-5
        got_grads = torch.autograd.grad(sum((got[i] * grads[i]).sum() for i in used), [leaf, *params])
        want_grads = torch.autograd.grad(sum((want[i] * grads[i].double()).sum() for i in used), [ref_leaf])
        assert (got_grads[0].double() - want_grads[0]).abs().max() < 1e-4
        ref_linear = torch.nn.Linear(d_model, 3 * heads * dim).double()
        ref_linear.load_state_dict(linear.state_dict())
        ref_out = _qkv_reference(x.double(), ref_linear, heads, rotation)
        want_params = torch.autograd.grad(sum((ref_out[i] * grads[i].double()).sum() for i in used),
                                          [ref_linear.weight, ref_linear.bias])
        for g, w in zip(got_grads[1:], want_params, strict=True):
            assert (g.double() - w).abs().max() < 1e-4 * max(1.0, w.abs().max().item())
        unused = [i for i in range(3) if i not in used]  # their thirds of the bias gradient are exact zeros
        assert all(torch.all(got_grads[2].view(3, -1)[i] == 0) for i in unused)


def test_attention_inputs_bias_gradient_does_not_depend_on_the_thread_count(kernel):
    gen = torch.Generator().manual_seed(3)
    batch, n, heads, dim = 2, 300, 3, 6  # 54 packed columns: column blocks cut heads in the middle
    rot = torch.view_as_real(RotaryEmbedding(dim)(torch.randint(0, 999, (batch, n), generator=gen))[:, 0])
    grads = [torch.randn(batch, heads, n, dim, generator=gen) for _ in range(3)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        packed, bias = kernel.qkv_heads_backward(*grads, rot)
        torch.set_num_threads(3)
        again = kernel.qkv_heads_backward(*grads, rot)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(again[0], packed) and torch.equal(again[1], bias)
    assert torch.allclose(bias.double(), packed.double().sum((0, 1)).flatten(), atol=1e-4)


def _tiny_head(vocab: int = 300, d_model: int = 24) -> MLMHead:
    cfg = ModelConfig(vocab_size=vocab, d_model=d_model, n_heads=2, num_layers=1, d_ff=32, max_seq_len=64)
    head = MLMHead(cfg, torch.nn.Embedding(vocab, d_model))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
        head.norm.weight.add_(1.0)
    return head


@pytest.mark.parametrize("vocab", [300, 8003])  # whole vectors plus the scalar tail; more than one column block
def test_the_mlm_loss_through_the_kernel_matches_float64_with_gradients(kernel, monkeypatch, vocab):
    torch.manual_seed(vocab)
    head = _tiny_head(vocab)
    ref = _tiny_head(vocab).double()
    ref.load_state_dict(head.state_dict())
    hidden = torch.randn(77, 24)
    targets = torch.randint(0, vocab, (77,))
    calls = _recording(monkeypatch, fused_loss._BiasCrossEntropy)
    leaf, ref_leaf = hidden.clone().requires_grad_(True), hidden.double().requires_grad_(True)
    logits, loss = fused_loss.logits_and_loss(head, leaf, targets)
    assert len(calls) == 1
    ref_logits = ref(ref_leaf)
    ref_loss = F.cross_entropy(ref_logits, targets)
    assert (logits.double() - ref_logits).abs().max() < 1e-4  # the bias is in the returned logits
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * ref_loss.item()
    # the logits may take part in the loss too: their gradient adds to the kernel's
    params, ref_params = [leaf, *head.parameters()], [ref_leaf, *ref.parameters()]
    got = torch.autograd.grad(loss + 0.01 * logits.square().mean(), params)
    want = torch.autograd.grad(ref_loss + 0.01 * ref_logits.square().mean(), ref_params)
    for g, w in zip(got, want, strict=True):
        assert (g.double() - w).abs().max() < 1e-5 * max(1.0, w.abs().max().item())
    only_loss = torch.autograd.grad(fused_loss.logits_and_loss(head, leaf, targets)[1], params)
    only_ref = torch.autograd.grad(F.cross_entropy(ref(ref_leaf), targets), ref_params)
    for g, w in zip(only_loss, only_ref, strict=True):
        assert (g.double() - w).abs().max() < 1e-5 * max(1.0, w.abs().max().item())


def test_the_mlm_loss_kernel_checks_targets_and_keeps_pytorchs_empty_case(kernel):
    head = _tiny_head()
    hidden = torch.randn(5, 24)
    with pytest.raises(RuntimeError, match="out of bounds"):
        fused_loss.logits_and_loss(head, hidden, torch.tensor([0, 1, 2, 3, 300]))
    logits, loss = fused_loss.logits_and_loss(head, hidden[:0], torch.zeros(0, dtype=torch.long))
    assert logits.shape == (0, 300) and torch.isnan(loss)  # as F.cross_entropy's mean over nothing


@pytest.mark.parametrize("threads", [1, 3])
def test_mlm_loss_bias_gradient_does_not_depend_on_the_thread_count(kernel, threads):
    gen = torch.Generator().manual_seed(11)
    logits, bias = torch.randn(130, 1500, generator=gen), torch.randn(1500, generator=gen)
    targets = torch.randint(0, 1500, (130,), generator=gen)
    loss, lse = kernel.cross_entropy_forward(logits, bias, targets)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = kernel.cross_entropy_backward(logits, lse, targets, 0.5)
        torch.set_num_threads(2)
        again = kernel.cross_entropy_backward(logits, lse, targets, 0.5)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])
    assert torch.allclose(got[1].double(), got[0].double().sum(0), atol=1e-5)


def test_the_native_paths_are_cpu_float32_only(kernel):
    """CUDA, half precision and strided tensors take PyTorch's ops (a CUDA tensor handed to the CPU
    kernels would fail their checks); meta tensors stand in for CUDA here."""
    assert kernel_for(torch.zeros(4, 8)) is kernel
    assert kernel_for(torch.zeros(4, 8, device="meta")) is None
    assert kernel_for(torch.zeros(4, 8, dtype=torch.bfloat16)) is None
    assert kernel_for(torch.zeros(8, 4).T) is None
    linear = torch.nn.Linear(8, 16, device="meta")
    layer = Dropout(0.1).train()
    x = torch.zeros(2, 3, 8, device="meta")
    assert gelu.linear_gelu(x, linear).shape == (2, 3, 16)
    assert residual.residual_branch(torch.zeros(2, 3, 16, device="meta"), torch.zeros(2, 3, 8, device="meta"),
                                 linear, layer).shape == (2, 3, 16)
    rotation = torch.zeros(1, 5, 4, dtype=torch.complex64, device="meta")
    projection = torch.nn.Linear(16, 48, device="meta")
    inputs = attention_inputs(torch.zeros(1, 5, 16, device="meta"), projection, 2, rotation)
    assert [t.shape for t in inputs] == [(1, 2, 5, 8)] * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bf16 products would fail the kernels' checks
        assert kernel_for(torch.zeros(4, 8)) is None


def _residual_norm_reference(kernel, residual, y, bias, weight, norm_bias, seed, threshold, scale, eps):
    """x = residual + dropout(y + bias) and LayerNorm(x) in float64, with the kernel's own dropout factors
    (the dropout pass applied to ones: the same Philox mask by construction)."""
    factors = kernel.dropout_philox(torch.ones_like(y), seed, threshold, scale).double()
    leaves = [t.double().requires_grad_() for t in (residual, y, bias, weight, norm_bias)]
    r, yy, b, w, nb = leaves
    x = r + (yy + b) * factors
    return x, F.layer_norm(x, (x.shape[-1],), w, nb, eps), leaves


@pytest.mark.parametrize("features", [256, 20])  # whole mask vectors, and the scalar path
@pytest.mark.parametrize("with_grad_x", [True, False])
def test_residual_norm_matches_float64_forward_and_backward(kernel, features, with_grad_x):
    gen = torch.Generator().manual_seed(features)
    shape = (2, 37, features)
    residual, y, grad_x, grad_normed = (torch.randn(shape, generator=gen) for _ in range(4))
    residual = residual * 3 + 5  # an offset mean, where a one-pass variance would cancel
    bias, weight, norm_bias = (torch.randn(features, generator=gen) for _ in range(3))
    seed, threshold, scale, eps = 987654321, 3277, 32768 / (32768 - 3277), 1e-5
    x, normed, stats = kernel.residual_norm_forward(y, bias, residual, seed, threshold, scale, weight, norm_bias, eps)
    want_x, want_normed, leaves = _residual_norm_reference(kernel, residual, y, bias, weight, norm_bias, seed,
                                                           threshold, scale, eps)
    assert stats.shape == (2 * 37, 2)
    torch.testing.assert_close(x.double(), want_x.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(normed.double(), want_normed.detach(), atol=1e-5, rtol=1e-5)
    assert 0.05 < float((x == residual).float().mean()) < 0.15  # ~10% dropped: x equals the residual there
    upstream = (want_x * grad_x.double()).sum() if with_grad_x else 0.0
    (upstream + (want_normed * grad_normed.double()).sum()).backward()
    got = kernel.residual_norm_backward(grad_x if with_grad_x else None, grad_normed, x, stats, weight, seed,
                                        threshold, scale)
    for name, value, leaf in zip(("residual", "y", "bias", "weight", "norm bias"), got, leaves, strict=True):
        want = leaf.grad
        assert value.shape == want.shape, name
        assert (value.double() - want).abs().max() <= 2e-5 * want.abs().max(), name


@pytest.mark.parametrize("threads", [1, 2])
def test_residual_norm_parameter_gradients_do_not_depend_on_the_thread_count(kernel, threads):
    gen = torch.Generator().manual_seed(7)
    residual, y, grad_x, grad_normed = (torch.randn(300, 96, generator=gen) for _ in range(4))
    bias, weight, norm_bias = (torch.randn(96, generator=gen) for _ in range(3))
    x, _, stats = kernel.residual_norm_forward(y, bias, residual, 5, 3277, 1.1, weight, norm_bias, 1e-5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = kernel.residual_norm_backward(grad_x, grad_normed, x, stats, weight, 5, 3277, 1.1)
        torch.set_num_threads(3)
        again = kernel.residual_norm_backward(grad_x, grad_normed, x, stats, weight, 5, 3277, 1.1)
        for a, b in zip(got, again, strict=True):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


def test_the_encoder_with_fused_norms_matches_the_unfused_path_in_training(kernel, monkeypatch):
    """The same dropout masks (same seeds) through the fused residual + LayerNorm pass and through the
    dropout pass followed by PyTorch's LayerNorm: the loss and every gradient agree."""
    encoder, ids, positions, labels = small_training_setup()
    fused_calls = []
    real_apply = residual._ResidualNorm.apply
    monkeypatch.setattr(residual._ResidualNorm, "apply", lambda *a: fused_calls.append(1) or real_apply(*a))

    def run(return_logits):
        return loss_and_gradients(encoder, ids, positions, labels, return_logits)

    fused = {flag: run(flag) for flag in (True, False)}
    assert len(fused_calls) == 2 * 2 * encoder.cfg.num_layers  # two norms per block, both forwards
    monkeypatch.setattr(residual, "plain_float32_norm", lambda norm, features: False)
    for flag in (True, False):
        loss, grads = run(flag)
        torch.testing.assert_close(fused[flag][0], loss, atol=1e-5, rtol=1e-5)
        assert fused[flag][1].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(fused[flag][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
