"""The compiled level-0 band kernel (lhtcli/core/band_kernel.cpp) against float64 references, and its
fallback to the flash kernel when it cannot be built or is switched off."""

from __future__ import annotations

import warnings

import pytest
import torch
from kernel_helpers import recording_status

from lhtcli.core import native
from lhtcli.core.attention import build_mlswa_plan, fast_compact_attention
from lhtcli.core.flash import _native_level0
from tests.test_attention import make_positions, make_qkv, reference, relative_error


@pytest.fixture
def fresh_native(monkeypatch):
    """Forget the loaded module around a test that changes how it is found."""
    native.reset()
    yield monkeypatch
    monkeypatch.undo()
    native.reset()


def _band_reference(q, k, v, lengths, window, scale):
    """float64 level-0 attention |i - j| <= window among each row's first ``length`` tokens."""
    n = q.shape[2]
    i = torch.arange(n)
    real = i[None] < lengths[:, None]  # [B, N]
    allowed = ((i[:, None] - i[None]).abs() <= window)[None] & real[:, :, None] & real[:, None, :]
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("bhnm,bhmd->bhnd", torch.softmax(scores, -1).nan_to_num(0.0), v)
    return out, lse, real


@pytest.mark.parametrize(
    ("n", "lengths", "window", "dim"),
    [
        (300, [300, 211, 64], 20, 16),  # padding, rows of several lengths
        (200, [200], 0, 8),  # each token only itself
        (130, [130, 1], 1, 16),  # a one-token row
        (90, [90, 77], 500, 16),  # window beyond the sequence: full attention
        (700, [700, 650], 256, 64),  # the production window: blocks of 64 see 576 keys
    ],
)
def test_native_band_matches_float64_forward_and_backward(kernel, n, lengths, window, dim):
    gen = torch.Generator().manual_seed(n + window)
    batch, heads = len(lengths), 3
    lengths = torch.tensor(lengths)
    # token-major storage viewed head-major, as the model hands them over
    qkv = torch.randn(batch, n, 3, heads, dim, generator=gen, dtype=torch.float64)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    scale = dim**-0.5
    want, want_lse, real = _band_reference(q, k, v, lengths, window, scale)
    out, lse = kernel.band_forward(q.float(), k.float(), v.float(), lengths, min(window, n), scale)
    out = out.transpose(1, 2)
    rows = real[:, None].expand(-1, heads, -1)
    assert relative_error(out[rows], want[rows]) < 1e-5
    assert (lse.double() - want_lse)[rows].abs().max() < 1e-5
    assert torch.all(out[~rows] == 0) and torch.all(lse[~rows] == float("-inf"))

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, _, _ = _band_reference(*leaves, lengths, window, scale)
    grad_out = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64) * real[:, None, :, None]
    want_grads = torch.autograd.grad(ref_out, leaves, grad_out)
    got_grads = kernel.band_backward(
        grad_out.float(), q.float(), k.float(), v.float(), out, lse, lengths, min(window, n), scale
    )
    for got, want_g in zip(got_grads, want_grads, strict=True):
        got = got.transpose(1, 2)
        # (window 0: a row's only key has probability 1, so the true dq and dk are exactly 0)
        assert (got.double() - want_g).abs().max() <= 2e-5 * max(want_g.abs().max().item(), 1.0)
        assert torch.all(got[~rows] == 0)


@pytest.mark.parametrize("doc_token", [True, False])
@pytest.mark.parametrize("windows", [[16, 3, 1], [64, 8, 2]])
def test_fast_path_with_the_native_level0_matches_float64_with_gradients(kernel, doc_token, windows):
    positions = make_positions(
        7, batch=3, pad=6, doc_token=doc_token, sections=(3, 8), sentences=(3, 8), length=(3, 20)
    )
    q, k, v = make_qkv(positions, seed=4, dim=16, scale=1.0)
    plan = build_mlswa_plan(positions, windows)
    assert _native_level0(q.float(), plan) is kernel  # this test is about the native path
    gen = torch.Generator().manual_seed(2)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    for max_level in range(3):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        want, _ = reference(*leaves, positions, windows, max_level)
        want_grads = torch.autograd.grad(want, leaves, grad_out)
        floats = [t.float().requires_grad_(True) for t in (q, k, v)]
        got = fast_compact_attention(*floats, build_mlswa_plan(positions, windows, max_level), level0="flash")
        got_grads = torch.autograd.grad(got, floats, grad_out.float())
        assert relative_error(got, want) < 1e-5, max_level
        for got_g, want_g in zip(got_grads, want_grads, strict=True):
            assert relative_error(got_g, want_g) < 5e-5, max_level
        padding = ~positions.real_mask
        assert torch.all(got.detach().transpose(1, 2)[padding] == 0)


def test_switched_off_by_environment_the_flash_path_gives_the_same_result(kernel, fresh_native):
    positions = make_positions(3, batch=2, pad=4, sections=(3, 6), sentences=(3, 6), length=(3, 12))
    q, k, v = (t.float() for t in make_qkv(positions, seed=1, dim=16, scale=1.0))
    plan = build_mlswa_plan(positions, [16, 3, 1])
    with_native = fast_compact_attention(q, k, v, plan)
    fresh_native.setenv("LHT_NATIVE_KERNEL", "0")
    native.reset()
    assert native.band_kernel() is None
    assert "LHT_NATIVE_KERNEL" in native.unavailable_reason()
    without = fast_compact_attention(q, k, v, build_mlswa_plan(positions, [16, 3, 1]))
    assert relative_error(with_native, without.double()) < 1e-5


def test_a_failed_build_warns_once_and_falls_back(fresh_native, tmp_path):
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'lht_band'\ng++: fatal error: no input files")

    fresh_native.setattr(cpp, "load", broken)
    fresh_native.setenv("LHT_KERNEL_CACHE", str(tmp_path / "cache"))
    fresh_native.setattr(native, "_why_unsupported", lambda: None)
    with pytest.warns(RuntimeWarning, match="native CPU kernel unavailable"):
        assert native.band_kernel() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the decision is remembered: no second warning
        assert native.band_kernel() is None
    positions = make_positions(2, batch=1, sections=(2, 4), sentences=(2, 5), length=(2, 9))
    q, k, v = make_qkv(positions, seed=5, dim=8, scale=1.0)
    want, _ = reference(q, k, v, positions, [8, 2, 1], 2)
    got = fast_compact_attention(q.float(), k.float(), v.float(), build_mlswa_plan(positions, [8, 2, 1]))
    assert relative_error(got, want) < 1e-5


def test_kernel_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LHT_KERNEL_CACHE", str(tmp_path / "k"))
    assert native.cache_dir() == tmp_path / "k"
    monkeypatch.delenv("LHT_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_dir() == tmp_path / "xdg" / "lht" / "kernels"



def test_pruning_keeps_the_newest_builds_the_current_one_and_any_being_built(monkeypatch, tmp_path):
    import os

    monkeypatch.setenv("LHT_KERNEL_CACHE", str(tmp_path))
    for age, name in enumerate(["lht_band_new", "lht_band_b", "lht_band_c", "lht_band_d", "lht_band_e",
                                "lht_band_building", "lht_band_current"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.so").write_bytes(b"x")
        if name == "lht_band_building":
            (tmp_path / name / "lock").write_text("")  # another process is building it
        os.utime(tmp_path / name, (1e9 - age * 100, 1e9 - age * 100))
    (tmp_path / "unrelated").mkdir()
    removed = native.prune_builds("lht_band_current", keep=3)
    assert sorted(p.name for p in removed) == ["lht_band_c", "lht_band_d", "lht_band_e"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lht_band_b", "lht_band_building", "lht_band_current", "lht_band_new", "unrelated",
    ]
    assert native.prune_builds("lht_band_current", keep=3) == []  # nothing more to remove
    monkeypatch.setenv("LHT_KERNEL_CACHE", str(tmp_path / "missing"))
    assert native.prune_builds("lht_band_current") == []


def test_loading_a_cached_build_marks_it_used(kernel, fresh_native):
    import os

    build = native.cache_dir() / native._build_name()
    os.utime(build, (1e9, 1e9))
    native.reset()
    assert native.band_kernel() is not None
    assert build.stat().st_mtime > 1e9 + 1e6  # refreshed, so pruning keeps it

def test_warm_up_shows_a_status_only_while_building_and_returns_why_it_failed(fresh_native, tmp_path):
    import torch.utils.cpp_extension as cpp

    fresh_native.setenv("LHT_KERNEL_CACHE", str(tmp_path / "empty"))  # nothing built there
    fresh_native.setattr(native, "_why_unsupported", lambda: None)
    fresh_native.setattr(cpp, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("ninja: build stopped")))
    shown: list[str] = []
    reason = native.warm_up(recording_status(shown))
    assert len(shown) == 1 and "building the ML-SWA CPU kernel" in shown[0]
    assert reason is not None and "ninja: build stopped" in reason


def test_warm_up_of_a_cached_kernel_shows_nothing(kernel, fresh_native):
    assert native.is_built()
    shown: list[str] = []
    assert native.warm_up(recording_status(shown)) is None
    assert shown == [] and native.band_kernel() is not None


def test_expanded_output_gradients_reach_the_kernel_as_proper_rows(kernel):
    """A loss like out.mean(dim=N) hands back a gradient expanded along N (row stride 0): BLAS needs
    rows at least a row apart, so such tensors are copied before the kernel sees them."""
    from lhtcli.core.flash import _last_dim_contiguous

    expanded = torch.randn(2, 3, 1, 16).expand(2, 3, 50, 16)
    assert _last_dim_contiguous(expanded).stride(-2) == 16
    view = torch.randn(2, 50, 3, 4, 16).unbind(2)[0].transpose(1, 2)  # token-major rows: kept as is
    assert _last_dim_contiguous(view) is view
    positions = make_positions(4, batch=2, pad=3, sections=(3, 6), sentences=(3, 6), length=(3, 12))
    q, k, v = make_qkv(positions, seed=6, dim=16, scale=1.0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want, _ = reference(*leaves, positions, [16, 3, 1], 2)
    want_grads = torch.autograd.grad(want.mean(2).sum(), leaves)
    floats = [t.float().requires_grad_(True) for t in (q, k, v)]
    got = fast_compact_attention(*floats, build_mlswa_plan(positions, [16, 3, 1]))
    got_grads = torch.autograd.grad(got.mean(2).sum(), floats)
    for got_g, want_g in zip(got_grads, want_grads, strict=True):
        assert relative_error(got_g, want_g) < 5e-5


def test_training_builds_the_kernel_up_front_only_when_batches_run_compact(monkeypatch):
    from types import SimpleNamespace

    from rich.console import Console

    from lhtcli.config import default_config_path, load_config
    from lhtcli.training.trainer import Trainer

    long = load_config(
        default_config_path(), ["model.max_seq_len=4096", "model.mlswa.window_size_per_level=[256, 8, 4]"]
    )
    console, warned, built = Console(record=True, width=200), [], []
    trainer = SimpleNamespace(cfg=long, tcfg=long.training, device=torch.device("cpu"), console=console,
                              warn=warned.append)
    monkeypatch.setattr(native, "supported", lambda: True)
    monkeypatch.setattr(native, "is_built", lambda: False)
    monkeypatch.setattr(native, "ready", lambda: True)
    monkeypatch.setattr(native, "warm_up", lambda status: built.append(status) and None)
    Trainer._prepare_attention_kernel(trainer)
    assert len(built) == 1 and "built the ML-SWA CPU kernel" in console.export_text() and not warned

    monkeypatch.setattr(native, "warm_up", lambda status: "RuntimeError: g++ not found")
    Trainer._prepare_attention_kernel(trainer)
    assert len(warned) == 1 and "g++ not found" in warned[0] and "slower flash path" in warned[0]

    built.clear()
    monkeypatch.setattr(native, "warm_up", lambda status: built.append(status) and None)
    short = load_config(default_config_path(), ["model.max_seq_len=128"])  # batches of 8 x 128 run dense
    trainer.cfg, trainer.tcfg = short, short.training
    Trainer._prepare_attention_kernel(trainer)
    assert built == []
    default = load_config(default_config_path())  # 8 x 512 tokens at w=32: compact, so the kernel is built
    trainer.cfg, trainer.tcfg = default, default.training
    Trainer._prepare_attention_kernel(trainer)
    assert len(built) == 1


_WORD = 0xFFFFFFFF


def _philox4x32_10(counter: list[int], key: list[int]) -> list[int]:
    """Philox4x32-10 in plain Python (Salmon et al., SC'11), the reference for the kernel's masks."""
    c, (k0, k1) = list(counter), key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & _WORD, p1 & _WORD, ((p0 >> 32) ^ c[3] ^ k1) & _WORD, p0 & _WORD]
        k0, k1 = (k0 + 0x9E3779B9) & _WORD, (k1 + 0xBB67AE85) & _WORD
    return c


def _reference_keep(n: int, seed: int, threshold: int) -> torch.Tensor:
    """Value i = 128 g + 16 (2 word + half) + lane keeps when the low 15 bits of that half of Philox block
    16 g + lane (counter (block, 0, 0, 0), key = the seed's two 32-bit halves) reach the threshold."""
    key = [seed & _WORD, seed >> 32]
    keep = []
    for g in range(-(-n // 128)):
        words = [_philox4x32_10([(16 * g + lane) & _WORD, (16 * g + lane) >> 32, 0, 0], key) for lane in range(16)]
        for part in range(8):
            keep += [((words[lane][part // 2] >> (16 * (part % 2))) & 0x7FFF) >= threshold for lane in range(16)]
    return torch.tensor(keep[:n])


def test_philox_reference_matches_the_published_known_answers():
    """Random123's known-answer vectors for philox4x32-10, so the reference below is Philox itself."""
    assert _philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _philox4x32_10([_WORD] * 4, [_WORD] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = _philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0])
    assert pi == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(1, 37, 13), (3, 129), (5,)])
def test_native_dropout_mask_is_philox_and_the_gradient_follows_it(kernel, monkeypatch, p, shape):
    """The layer's native pass keeps exactly the values the Philox reference says (odd sizes run the
    kernel's tail), multiplies them by exactly the scale (signed zeros, infinities and NaN included),
    and the backward redraws the same mask from the seed."""
    from lhtcli.fused import dropout as model

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen) * 3
    x.view(-1)[:3] = torch.tensor([float("inf"), float("nan"), -0.0])[: x.numel()]
    grad = torch.randn(shape, generator=gen)
    layer = model.Dropout(p).train()
    seeds = []
    real_apply = model._NativeDropout.apply

    def recording_apply(x_, seed, *rest):
        seeds.append(seed)
        return real_apply(x_, seed, *rest)

    monkeypatch.setattr(model._NativeDropout, "apply", recording_apply)
    torch.manual_seed(11)
    leaf = x.clone().requires_grad_(True)
    out = layer(leaf)
    (x_grad,) = torch.autograd.grad(out, leaf, grad)
    assert len(seeds) == 1 and 0 <= seeds[0] < 2**63
    keep = _reference_keep(x.numel(), seeds[0], layer.threshold).view(shape)
    scale = torch.tensor(layer.LEVELS / (layer.LEVELS - layer.threshold))
    factor = torch.where(keep, scale, torch.tensor(0.0))
    assert torch.equal(out.detach().view(torch.int32), (x * factor).view(torch.int32))  # bits, NaN included
    assert torch.equal(x_grad.view(torch.int32), (grad * factor).view(torch.int32))
    torch.manual_seed(11)
    assert torch.equal(layer(x).view(torch.int32), out.detach().view(torch.int32))  # same seed, same mask
    assert not torch.equal(layer(x).view(torch.int32), out.detach().view(torch.int32)) or x.numel() < 20


def test_native_dropout_mask_is_uniform_and_uncorrelated(kernel):
    """Over 2^20 values: the kept share is 1 - p to within 5 standard deviations, neighbours (in value
    order, across words, halves and lanes) are uncorrelated, and two seeds give different masks."""
    n, threshold = 1 << 20, 3277  # p = 0.1
    ones = torch.ones(n)
    keep = kernel.dropout_philox(ones, 12345, threshold, 1.0) != 0
    want = 1 - threshold / 2**15
    assert abs(keep.double().mean().item() - want) < 5 * (want * (1 - want) / n) ** 0.5
    k = keep.double() - keep.double().mean()
    for lag in (1, 16, 32, 128):
        corr = (k[:-lag] * k[lag:]).mean() / k.var()
        assert abs(corr.item()) < 5 / n**0.5
    other = kernel.dropout_philox(ones, 12346, threshold, 1.0) != 0
    assert 0.1 < (keep != other).double().mean().item() < 0.3  # independent masks differ in ~18% of values


@pytest.mark.parametrize("features", [256, 20])  # whole bias vectors, and the scalar path
def test_residual_branch_adds_bias_dropout_and_residual_in_one_pass_with_gradients(kernel, monkeypatch, features):
    """residual + dropout(linear(x)) through the kernel: the Philox mask, the bias before the mask, the
    residual after it; gradients: the residual's passes through, the projection's follows the
    mask and the bias gets its column sums."""
    from lhtcli.fused import residual as fused
    from lhtcli.fused.dropout import Dropout

    torch.manual_seed(0)
    linear, layer = torch.nn.Linear(16, features), Dropout(0.25).train()
    x, residual = torch.randn(3, 11, 16), torch.randn(3, 11, features)
    seeds = []
    real_apply = fused._ResidualDropout.apply
    monkeypatch.setattr(fused._ResidualDropout, "apply", lambda *a: seeds.append(a[4]) or real_apply(*a))
    leaves = [t.clone().requires_grad_(True) for t in (residual, x)]
    out = fused.residual_branch(leaves[0], leaves[1], linear, layer)
    assert len(seeds) == 1
    keep = _reference_keep(out.numel(), seeds[0], layer.threshold).view(out.shape)
    factor = torch.where(keep, torch.tensor(layer.scale), torch.tensor(0.0))
    projected = (x @ linear.weight.T + linear.bias).detach()
    torch.testing.assert_close(out.detach(), residual + projected * factor, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.detach()[~keep], residual[~keep])  # dropped: exactly the residual
    grad = torch.randn(out.shape)
    got = torch.autograd.grad(out, [*leaves, linear.weight, linear.bias], grad)
    grad_projected = grad * factor
    assert torch.equal(got[0], grad)
    torch.testing.assert_close(got[1], grad_projected @ linear.weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], grad_projected.reshape(-1, features).T @ x.reshape(-1, 16), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3], grad_projected.sum((0, 1)), rtol=1e-5, atol=1e-5)
    layer.eval()  # without dropout: the plain expression
    assert torch.equal(fused.residual_branch(residual, x, linear, layer), residual + linear(x))
    assert len(seeds) == 1
