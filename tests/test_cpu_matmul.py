"""The CPU projections' GEMM library (lhtcli/core/cpu_matmul.py): exact against float64 in either library,
chosen per machine, overridable by LHT_CPU_MATMUL, and a bad value is a clean user error."""

from __future__ import annotations

import pytest
import torch

from lhtcli.config import load_config
from lhtcli.core import cpu_matmul
from lhtcli.errors import ConfigError
from tests.model_helpers import loss_and_gradients, small_training_setup

needs_onednn = pytest.mark.skipif(not cpu_matmul._onednn_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("library", ["mkl", pytest.param("onednn", marks=needs_onednn)])
@pytest.mark.parametrize("transposed_input", [False, True])
def test_linear_matches_float64_with_both_gradients(monkeypatch, library, transposed_input):
    monkeypatch.setenv("LHT_CPU_MATMUL", library)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 48, 17, generator=gen).transpose(1, 2) if transposed_input else torch.randn(3, 17, 48)
    weight = torch.randn(29, 48, generator=gen, requires_grad=True)
    leaf = x.clone().requires_grad_(True)
    out = cpu_matmul.linear(leaf, weight)
    assert (type(out.grad_fn).__name__ == "_OneDNNLinearBackward") == (library == "onednn")
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, [leaf, weight], grad)

    ref_leaf, ref_weight = leaf.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref = ref_leaf @ ref_weight.t()
    want = torch.autograd.grad(ref, [ref_leaf, ref_weight], grad.double())
    assert out.shape == (3, 17, 29)
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert (g.double() - w).abs().max() < 1e-5 * w.abs().max()
    with torch.no_grad():  # inference runs the same product
        assert torch.equal(cpu_matmul.linear(x, weight), out.detach())


@needs_onednn
def test_linear_computes_only_the_gradients_asked_for(monkeypatch):
    monkeypatch.setenv("LHT_CPU_MATMUL", "onednn")
    x = torch.randn(10, 8)
    weight = torch.randn(6, 8, requires_grad=True)
    (grad_weight,) = torch.autograd.grad(cpu_matmul.linear(x, weight).sum(), [weight])
    torch.testing.assert_close(grad_weight, torch.ones(10, 6).t() @ x)
    leaf = x.clone().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(cpu_matmul.linear(leaf, weight.detach()).sum(), [leaf])
    torch.testing.assert_close(grad_x, torch.ones(10, 6) @ weight.detach())


@needs_onednn
def test_a_second_derivative_fails_instead_of_being_silently_wrong(monkeypatch):
    monkeypatch.setenv("LHT_CPU_MATMUL", "onednn")
    leaf = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(5, 3, requires_grad=True)
    (grad_x,) = torch.autograd.grad(cpu_matmul.linear(leaf, weight).pow(2).sum(), [leaf], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        grad_x.sum().backward()


def test_a_changed_onednn_op_falls_back_to_mkl(monkeypatch):
    def broken(*args):
        raise RuntimeError("mkldnn::_linear_pointwise() expected 5 arguments")

    monkeypatch.setattr(cpu_matmul, "_onednn_linear", broken)
    cpu_matmul._onednn_available.cache_clear()
    try:
        assert cpu_matmul._onednn_available() is False
        monkeypatch.setenv("LHT_CPU_MATMUL", "onednn")
        assert cpu_matmul.library() == "mkl"
    finally:
        cpu_matmul._onednn_available.cache_clear()


def test_other_devices_dtypes_and_empty_inputs_keep_pytorchs_linear(monkeypatch):
    monkeypatch.setenv("LHT_CPU_MATMUL", "onednn")
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = cpu_matmul.linear(torch.randn(3, 4, dtype=torch.float64), weight)
    assert type(out.grad_fn).__name__ != "_OneDNNLinearBackward"
    empty = cpu_matmul.linear(torch.randn(0, 4), weight.detach().float())
    assert empty.shape == (0, 5)


@pytest.mark.parametrize(
    ("setting", "vendor", "available", "chosen"),
    [
        (None, "AuthenticAMD", True, "onednn"),
        (None, "GenuineIntel", True, "mkl"),
        (None, "", True, "mkl"),  # unknown CPUs keep torch.mm
        ("auto", "AuthenticAMD", False, "mkl"),  # torch without oneDNN
        ("mkl", "AuthenticAMD", True, "mkl"),
        ("ONEDNN", "GenuineIntel", True, "onednn"),
        ("onednn", "GenuineIntel", False, "mkl"),
    ],
)
def test_the_library_is_chosen_by_cpu_vendor_unless_overridden(monkeypatch, setting, vendor, available, chosen):
    if setting is None:
        monkeypatch.delenv("LHT_CPU_MATMUL", raising=False)
    else:
        monkeypatch.setenv("LHT_CPU_MATMUL", setting)
    monkeypatch.setattr(cpu_matmul, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_matmul, "_onednn_available", lambda: available)
    assert cpu_matmul.library() == chosen


def test_a_bad_setting_is_a_config_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("LHT_CPU_MATMUL", "fastest")
    with pytest.raises(ConfigError, match=r"LHT_CPU_MATMUL is 'fastest'; set it to one of auto, mkl, onednn"):
        cpu_matmul.library()
    with pytest.raises(ConfigError, match="LHT_CPU_MATMUL"):
        load_config()  # before any work starts, not as an unknown config key
    monkeypatch.setenv("LHT_CPU_MATMUL", "mkl")
    assert load_config().model.d_model > 0  # a process variable, never read as a config key


def test_cli_reports_a_bad_setting_in_one_line(monkeypatch, lht_cmd, tmp_path):
    import subprocess

    env = {"LHT_CPU_MATMUL": "fastest", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([*lht_cmd, "config", "validate"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert "LHT_CPU_MATMUL" in done.stderr and "Traceback" not in done.stderr


@needs_onednn
def test_a_training_step_agrees_between_the_libraries(kernel, monkeypatch):
    """The whole model with its native passes, in training: the same loss and gradients to float32
    precision whichever library runs the projections."""
    encoder, ids, positions, labels = small_training_setup()
    calls = []
    real_apply = cpu_matmul._OneDNNLinear.apply
    monkeypatch.setattr(cpu_matmul._OneDNNLinear, "apply", lambda *a: calls.append(1) or real_apply(*a))

    def run(library):
        monkeypatch.setenv("LHT_CPU_MATMUL", library)
        return loss_and_gradients(encoder, ids, positions, labels)

    loss_mkl, grads_mkl = run("mkl")
    assert calls == []
    loss_dnn, grads_dnn = run("onednn")
    # every block's q/k/v, output projection and two MLP products, the head's transform and decoder
    assert len(calls) == 4 * encoder.cfg.num_layers + 2
    torch.testing.assert_close(loss_dnn, loss_mkl, atol=1e-5, rtol=1e-5)
    assert grads_dnn.keys() == grads_mkl.keys()
    for name, grad in grads_mkl.items():
        torch.testing.assert_close(grads_dnn[name], grad, atol=1e-5, rtol=1e-4, msg=name)
