"""The native elementwise kernels of a training step against float64 references: bias + GELU
(lhtcli/core/gelu_kernel.cpp) and the model's MLP through it, RoPE on the packed q/k/v
(lhtcli/core/rotary_kernel.cpp). Dropout's are in test_native_kernel.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lhtcli.model as model
from lhtcli.model import RotaryEmbedding, apply_rotary, split_rotated


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
    real_apply = model._BiasGELU.apply
    monkeypatch.setattr(model._BiasGELU, "apply", lambda *a: calls.append(1) or real_apply(*a))
    leaf = x.clone().requires_grad_(True)
    out = model.linear_gelu(leaf, linear)
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
        assert torch.equal(model.linear_gelu(x, linear), out.detach())
    assert calls == [1]


@pytest.mark.parametrize("dim", [64, 6])  # whole vectors, and the scalar tail
def test_native_rotary_matches_float64_with_gradients_and_unused_outputs(kernel, monkeypatch, dim):
    torch.manual_seed(dim)
    batch, n, heads = 2, 37, 3
    qkv = torch.randn(batch, n, 3, heads, dim)
    rotation = RotaryEmbedding(dim)(torch.randint(0, 4000, (batch, n)))[:, 0]  # [B, N, D/2]
    kernels = []
    real_apply = model._RotatedQKV.apply
    monkeypatch.setattr(model._RotatedQKV, "apply", lambda *a: kernels.append(a[2]) or real_apply(*a))

    def composed(packed, rot):
        qk, v = packed.split([2, 1], dim=2)
        q, k = apply_rotary(qk, rot[:, :, None, None]).unbind(2)
        return q, k, v.squeeze(2)

    grads = [torch.randn(batch, heads, n, dim).transpose(1, 2) for _ in range(3)]  # head-major, as attention
    for used in ([0, 1, 2], [0, 2], [1]):
        leaf = qkv.clone().requires_grad_(True)
        ref_leaf = qkv.double().requires_grad_(True)
        got, want = split_rotated(leaf, rotation), composed(ref_leaf, rotation.to(torch.complex128))
        assert kernels[-1] is kernel
        for g, w in zip(got, want, strict=True):
            assert (g.double() - w).abs().max() < 1e-5
        sum((got[i] * grads[i]).sum() for i in used).backward()
        sum((want[i] * grads[i].double()).sum() for i in used).backward()
        assert (leaf.grad.double() - ref_leaf.grad).abs().max() < 1e-5
        unused = [i for i in range(3) if i not in used]
        assert all(torch.all(leaf.grad[:, :, i] == 0) for i in unused)


def test_the_native_paths_are_cpu_float32_only(kernel):
    """CUDA, half precision and strided tensors take PyTorch's ops (a CUDA tensor handed to the CPU
    kernels would fail their checks); meta tensors stand in for CUDA here."""
    assert model._native_kernel_for(torch.zeros(4, 8)) is kernel
    assert model._native_kernel_for(torch.zeros(4, 8, device="meta")) is None
    assert model._native_kernel_for(torch.zeros(4, 8, dtype=torch.bfloat16)) is None
    assert model._native_kernel_for(torch.zeros(8, 4).T) is None
    linear = torch.nn.Linear(8, 16, device="meta")
    layer = model.Dropout(0.1).train()
    x = torch.zeros(2, 3, 8, device="meta")
    assert model.linear_gelu(x, linear).shape == (2, 3, 16)
    assert model.residual_branch(torch.zeros(2, 3, 16, device="meta"), torch.zeros(2, 3, 8, device="meta"),
                                 linear, layer).shape == (2, 3, 16)
    qkv = torch.zeros(1, 5, 3, 2, 8, device="meta")
    rotation = torch.zeros(1, 5, 4, dtype=torch.complex64, device="meta")
    assert [t.shape for t in split_rotated(qkv, rotation)] == [(1, 5, 2, 8)] * 3
