"""Exactness of every ML-SWA attention backend against a float64 dense reference (DESIGN.md section 3).

The reference is the plain masked softmax (``dense_attention``) over the dense mask definition
(``mlswa_dense_mask`` / ``pair_level_map``); every backend must give the same outputs and gradients.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from lhtcli.core.attention import (
    DENSE_AUTO_MAX_LEN,
    DenseMask,
    MLSWAContext,
    build_flex_plan,
    build_mlswa_plan,
    choose_backend,
    compact_attention,
    dense_attention,
    fast_compact_attention,
    flex_compact_attention,
    mlswa_attention,
    prepare_plan,
)
from lhtcli.core.mask import DOC_LINK, MASKED, mlswa_dense_mask, pair_level_map
from lhtcli.core.positions import HierarchicalPositions, positions_from_lengths

HEADS, DIM = 2, 8


# ----------------------------------------------------------------------------------------------
# documents and references
# ----------------------------------------------------------------------------------------------
def random_doc(rng: random.Random, sections: int, sentences: tuple[int, int], length: tuple[int, int]):
    """Sections -> sentence lengths; ~10% empty sentences and ~10% one-token sentences."""
    doc = []
    for _ in range(sections):
        section = []
        for _ in range(rng.randint(*sentences)):
            roll = rng.random()
            section.append(0 if roll < 0.1 else 1 if roll < 0.2 else rng.randint(*length))
        doc.append(section)
    return doc


def make_positions(
    seed: int,
    batch: int = 1,
    doc_token: bool = True,
    sections=(1, 6),
    sentences=(1, 6),
    length=(1, 9),
    pad: int = 0,
) -> HierarchicalPositions:
    rng = random.Random(seed)
    items = []
    for _ in range(batch):
        doc = random_doc(rng, rng.randint(*sections), sentences, length)
        if not any(any(s) for s in doc):
            doc = [[3]]
        items.append(positions_from_lengths(doc, doc_token=doc_token))
    longest = max(p.seq_len for p in items)
    return HierarchicalPositions.batch(items, pad_to=longest + pad)


def make_qkv(
    positions: HierarchicalPositions,
    dtype=torch.float64,
    seed: int = 0,
    heads: int = HEADS,
    dim: int = DIM,
    scale: float = 2.0,
):
    """Head-major [B, H, N, D] tensors; ``scale`` makes the softmax peaky enough to notice wrong keys."""
    gen = torch.Generator().manual_seed(seed)
    shape = (positions.batch_size, heads, positions.seq_len, dim)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype) for _ in range(3)]


def reference(q, k, v, positions, windows, max_level):
    """float64 dense (out, lse) from the mask definition."""
    mask = mlswa_dense_mask(positions, windows, max_level)
    return dense_attention(q.double(), k.double(), v.double(), mask)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------------------------
# backends under test: name -> fn(q, k, v, positions, windows, max_level) -> out [B, H, N, D]
# ----------------------------------------------------------------------------------------------
def _explicit(q, k, v, positions, windows, max_level):
    return compact_attention(q, k, v, build_mlswa_plan(positions, windows, max_level)).out


def _via_mlswa_attention(backend):
    def run(q, k, v, positions, windows, max_level):
        out = mlswa_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            positions,
            windows,
            max_level,
            backend=backend,
        )
        return out.transpose(1, 2)

    return run


def _via_context(backend):
    def run(q, k, v, positions, windows, max_level):
        return MLSWAContext(positions, windows, backend).attend(q, k, v, max_level)

    return run


def _fast(level0):
    def run(q, k, v, positions, windows, max_level):
        return fast_compact_attention(q, k, v, build_mlswa_plan(positions, windows, max_level), level0=level0)

    return run


BACKENDS = {
    "explicit": _explicit,
    "fast-flash": _fast("flash"),
    "fast-sdpa": _fast("sdpa"),
    "compact": _via_mlswa_attention("compact"),
    "dense": _via_mlswa_attention("dense"),
    "context-auto": _via_context("auto"),
    "context-compact": _via_context("compact"),
}

# (name, windows, positions kwargs)
SHAPES = [
    ("realistic", [6, 2, 1], dict(sections=(2, 6), sentences=(2, 6), length=(1, 9))),
    ("single-section", [5, 2, 1], dict(sections=(1, 1), sentences=(3, 12), length=(1, 7))),
    ("many-sections", [3, 1, 1], dict(sections=(12, 20), sentences=(1, 2), length=(1, 4))),
    ("tiny-windows-0", [0, 0, 0], dict(sections=(3, 8), sentences=(1, 5), length=(1, 6))),
    ("tiny-windows-1", [1, 1, 0], dict(sections=(3, 8), sentences=(1, 5), length=(1, 6))),
    ("windows-beyond-n", [500, 200, 100], dict(sections=(2, 5), sentences=(1, 5), length=(1, 8))),
    ("one-token-sentences", [2, 3, 1], dict(sections=(2, 6), sentences=(2, 8), length=(1, 1))),
    ("multi-chunk", [40, 5, 2], dict(sections=(3, 6), sentences=(3, 10), length=(3, 15))),
]


def _cases():
    for name, windows, kwargs in SHAPES:
        for max_level in range(len(windows)):
            yield pytest.param(name, windows, kwargs, max_level, id=f"{name}-L{max_level}")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize(("name", "windows", "kwargs", "max_level"), list(_cases()))
def test_backend_matches_dense_float64(backend, name, windows, kwargs, max_level):
    seed = sum(map(ord, name)) + 31 * max_level
    for batch, doc_token, pad in ((1, True, 0), (3, True, 4), (2, False, 2)):
        positions = make_positions(seed + batch, batch=batch, doc_token=doc_token, pad=pad, **kwargs)
        q, k, v = make_qkv(positions, seed=seed)
        want, _ = reference(q, k, v, positions, windows, max_level)
        got = BACKENDS[backend](q, k, v, positions, windows, max_level)
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-12, (backend, batch, doc_token)
        assert torch.all(got.transpose(1, 2)[~positions.real_mask] == 0)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_float32_within_1e5_of_float64(backend):
    positions = make_positions(11, batch=2, pad=5, sections=(4, 8), sentences=(3, 8), length=(3, 20))
    windows = [16, 3, 1]
    q, k, v = make_qkv(positions, seed=3, dim=16, scale=1.0)
    want, _ = reference(q, k, v, positions, windows, 2)
    got = BACKENDS[backend](q.float(), k.float(), v.float(), positions, windows, 2)
    assert got.dtype == torch.float32
    assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_gradients_match_dense_and_padding_is_clean(backend):
    windows = [4, 1, 1]
    positions = make_positions(5, batch=3, pad=3, sections=(3, 7), sentences=(1, 5), length=(1, 6))
    q, k, v = (t.requires_grad_(True) for t in make_qkv(positions, seed=9))
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    for max_level in range(3):
        want, _ = reference(q, k, v, positions, windows, max_level)
        want_grads = torch.autograd.grad((want * grad_out).sum(), (q, k, v))
        got = BACKENDS[backend](q, k, v, positions, windows, max_level)
        got_grads = torch.autograd.grad((got * grad_out).sum(), (q, k, v))
        padding = ~positions.real_mask
        assert torch.all(got.detach().transpose(1, 2)[padding] == 0)
        for got_g, want_g in zip(got_grads, want_grads, strict=True):
            assert torch.isfinite(got_g).all()
            assert relative_error(got_g, want_g) < 1e-11, (backend, max_level)
            assert torch.all(got_g.transpose(1, 2)[padding] == 0)


# name -> fn(q, k, v, plan) for gradcheck (the plan is built once, outside the checked function)
GRADCHECK_BACKENDS = {
    "explicit": lambda q, k, v, plan: compact_attention(q, k, v, plan).out,
    "fast-flash": lambda q, k, v, plan: fast_compact_attention(q, k, v, plan, level0="flash"),
    "fast-sdpa": lambda q, k, v, plan: fast_compact_attention(q, k, v, plan, level0="sdpa"),
}


@pytest.mark.parametrize("backend", sorted(GRADCHECK_BACKENDS))
@pytest.mark.parametrize("max_level", [0, 2])
def test_gradcheck(backend, max_level):
    positions = make_positions(2, batch=2, pad=2, sections=(2, 3), sentences=(1, 2), length=(1, 3))
    plan = build_mlswa_plan(positions, [1, 1, 0], max_level)
    q, k, v = (t.requires_grad_(True) for t in make_qkv(positions, seed=4, heads=1, dim=2, scale=1.0))
    fn = GRADCHECK_BACKENDS[backend]
    assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c, plan), (q, k, v))


# ----------------------------------------------------------------------------------------------
# lse and per-level lse of the explicit path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc_token", [True, False])
@pytest.mark.parametrize("max_level", [0, 1, 2])
def test_lse_and_level_lse_match_pair_level_map(doc_token, max_level):
    windows = [3, 1, 1]
    positions = make_positions(21, batch=3, doc_token=doc_token, pad=3, sections=(3, 9), sentences=(1, 5))
    q, k, v = make_qkv(positions, seed=6)
    result = compact_attention(q, k, v, build_mlswa_plan(positions, windows, max_level), collect_levels=True)
    levels = pair_level_map(positions, windows, max_level).long()  # [B, N, N]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(DIM)
    lse = torch.logsumexp(scores.masked_fill((levels == MASKED)[:, None], -math.inf), -1)
    assert torch.allclose(result.lse, lse, rtol=0, atol=1e-12)
    assert result.lse.dtype == torch.float64
    top = len(windows) - 1
    codes = torch.where(levels == DOC_LINK, torch.full_like(levels, top), levels)
    assert len(result.level_lse) == max_level + 1
    for level, got in enumerate(result.level_lse):
        want = torch.logsumexp(scores.masked_fill((codes != level)[:, None], -math.inf), -1)
        assert torch.allclose(got, want, rtol=0, atol=1e-12), level
    padding = ~positions.real_mask
    assert torch.all(result.lse.transpose(1, 2)[padding] == -math.inf)


def test_float32_lse_close_to_float64():
    windows = [8, 2, 1]
    positions = make_positions(8, batch=2, pad=2, sections=(3, 6), sentences=(2, 6), length=(2, 10))
    q, k, v = make_qkv(positions, seed=2, dim=16, scale=1.0)
    plan = build_mlswa_plan(positions, windows, 2)
    r64 = compact_attention(q, k, v, plan, collect_levels=True)
    r32 = compact_attention(q.float(), k.float(), v.float(), plan, collect_levels=True)
    real = positions.real_mask[:, None].expand_as(r64.lse)
    assert torch.allclose(r32.lse[real].double(), r64.lse[real], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# [DOC] rule
# ----------------------------------------------------------------------------------------------
def test_doc_reaches_sections_beyond_the_window():
    """[DOC] links with every section start in the top layer, also beyond window + 1 sections."""
    windows = [2, 1, 1]
    doc = [[3, 2] for _ in range(8)]  # 8 sections of 2 sentences
    positions = positions_from_lengths(doc)
    last_section = int(torch.nonzero(positions.level_enums[2] == 8)[0])
    mask = mlswa_dense_mask(positions, windows, 2)[0]
    assert mask[0, last_section] and mask[last_section, 0]
    assert not mlswa_dense_mask(positions, windows, 1)[0][
        0, last_section
    ]  # only when the top level is active
    q, k, v = make_qkv(positions.batched(), seed=12, scale=3.0)
    want, _ = reference(q, k, v, positions, windows, 2)
    for backend in sorted(BACKENDS):
        got = BACKENDS[backend](q, k, v, positions, windows, 2)
        assert relative_error(got, want) < 1e-12, backend
    # and the link matters: removing it changes [DOC]'s output
    cut = mask.clone()
    cut[0, last_section] = False
    alt, _ = dense_attention(q, k, v, cut[None])
    assert relative_error(alt[:, :, :1], want[:, :, :1]) > 1e-6


def test_level0_with_gaps_falls_back_exactly():
    """A level-0 enumeration with holes (not a prefix) still gives exact results on every backend."""
    base = make_positions(4, batch=2, pad=2, sections=(2, 4))
    keep = torch.ones(base.seq_len, dtype=torch.bool)
    keep[3] = keep[7] = False  # two padding holes inside the sequences
    enums = [torch.where(keep, e, 0) for e in base.level_enums]
    positions = HierarchicalPositions(enums, base.has_doc_token)
    q, k, v = make_qkv(positions, seed=8)
    for max_level in range(3):
        want, _ = reference(q, k, v, positions, [3, 1, 1], max_level)
        for backend in sorted(BACKENDS):
            got = BACKENDS[backend](q, k, v, positions, [3, 1, 1], max_level)
            assert relative_error(got, want) < 1e-12, backend
            assert torch.all(got.transpose(1, 2)[~positions.real_mask] == 0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(
    ("windows", "max_level", "doc_token"), [([2, 1, 1], 2, True), ([0, 0, 0], 2, True), ([3, 1, 1], 1, False)]
)
def test_flex_extended_keys_forward_matches_dense(windows, max_level, doc_token):
    """The flex mask_mod over extended keys, run eagerly forward-only on CPU at a tiny N."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    positions = make_positions(5, batch=2, pad=3, doc_token=doc_token, sections=(3, 8))
    q, k, v = make_qkv(positions, seed=1)
    plan = build_flex_plan(positions, windows, max_level)
    got = flex_compact_attention(q, k, v, plan, compiled=False)
    want, _ = reference(q, k, v, positions, windows, max_level)
    assert relative_error(got, want) < 1e-12
    assert torch.all(got.transpose(1, 2)[~positions.real_mask] == 0)


@pytest.mark.parametrize("doc_token", [True, False])
def test_blocked_dense_mask_matches_definition(doc_token):
    positions = make_positions(13, batch=3, doc_token=doc_token, pad=4, sections=(3, 9))
    for windows in ([3, 1, 1], [0, 0, 0], [2, 1]):
        for max_level in range(len(windows)):
            want = mlswa_dense_mask(positions, windows, max_level)
            got = DenseMask.from_positions(positions, windows, max_level, block_rows=7).mask
            assert torch.equal(got, want), (windows, max_level)


def test_auto_dispatch_by_length():
    assert choose_backend(DENSE_AUTO_MAX_LEN, "cpu") == "dense"
    assert choose_backend(DENSE_AUTO_MAX_LEN + 1, "cpu") == "compact"
    assert choose_backend(64, "cpu", "compact") == "compact"
    # narrow token windows move the crossover down (measured: ~20 windows at w=32), never below 512
    assert choose_backend(640, "cpu", token_window=32, native_kernel=False) == "dense"
    assert choose_backend(641, "cpu", token_window=32, native_kernel=False) == "compact"
    assert choose_backend(512, "cpu", token_window=4, native_kernel=False) == "dense"
    assert choose_backend(1024, "cpu", token_window=256, native_kernel=False) == "dense"
    # the native kernels move it to (256 + w) tokens for one sequence, / sqrt(B) for batches, >= 128
    assert choose_backend(512, "cpu", token_window=256, native_kernel=True) == "dense"
    assert choose_backend(513, "cpu", token_window=256, native_kernel=True) == "compact"
    assert choose_backend(288, "cpu", token_window=32, native_kernel=True) == "dense"
    assert choose_backend(289, "cpu", token_window=32, native_kernel=True) == "compact"
    assert choose_backend(256, "cpu", token_window=256, native_kernel=True, batch_size=4) == "dense"
    assert choose_backend(257, "cpu", token_window=256, native_kernel=True, batch_size=4) == "compact"
    assert choose_backend(128, "cpu", token_window=32, native_kernel=True, batch_size=8) == "dense"
    assert choose_backend(129, "cpu", token_window=32, native_kernel=True, batch_size=8) == "compact"
    assert choose_backend(1280, "cpu", token_window=4096, native_kernel=True) == "dense"  # capped like dense
    with pytest.raises(ValueError, match="backend"):
        choose_backend(64, "cpu", "fast")


def test_auto_asks_the_native_kernel_only_on_cpu(monkeypatch):
    from lhtcli.core import native

    monkeypatch.setattr(native, "ready", lambda: True)
    assert choose_backend(1000, "cpu", token_window=256) == "compact"
    assert choose_backend(1000, "meta", token_window=256) == "dense"  # not a CPU: the native kernel never runs
    monkeypatch.setattr(native, "ready", lambda: False)
    assert choose_backend(1000, "cpu", token_window=256) == "dense"


def test_auto_above_the_crossover_runs_compact_exactly():
    """Beyond DENSE_AUTO_MAX_LEN the context runs the compact path, with the same numbers as dense."""
    positions = make_positions(19, sections=(30, 30), sentences=(6, 12), length=(8, 12))
    assert positions.seq_len > DENSE_AUTO_MAX_LEN
    windows = [64, 8, 2]
    context = MLSWAContext(positions, windows, "auto")
    assert context.backend == "compact"
    q, k, v = make_qkv(positions, seed=5, heads=1, scale=1.0)
    want, _ = reference(q, k, v, positions, windows, 2)
    assert relative_error(context.attend(q, k, v, 2), want) < 1e-12


@pytest.mark.parametrize("level0", ["flash", "sdpa"])
def test_bfloat16_fast_path_is_finite_and_close(level0):
    positions = make_positions(11, batch=2, pad=5, sections=(4, 8), sentences=(3, 8), length=(3, 20))
    windows = [16, 3, 1]
    q, k, v = make_qkv(positions, seed=3, dim=16, scale=1.0)
    want, _ = reference(q, k, v, positions, windows, 2)
    plan = prepare_plan(build_mlswa_plan(positions, windows, 2), torch.bfloat16)
    leaves = [t.bfloat16().requires_grad_(True) for t in (q, k, v)]
    got = fast_compact_attention(*leaves, plan, level0=level0)
    got.float().sum().backward()
    assert got.dtype == torch.bfloat16
    assert relative_error(got, want) < 2e-2  # bfloat16 keeps ~3 significant digits
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert torch.all(got.transpose(1, 2)[~positions.real_mask] == 0)


def test_context_caches_plans_per_max_level():
    positions = make_positions(3, batch=2, pad=1)
    context = MLSWAContext(positions, [4, 1, 1], "compact")
    assert context.prepared(1) is context.prepared(1)
    assert context.prepared(1) is not context.prepared(2)


def test_unknown_backend_is_rejected():
    positions = make_positions(3)
    q, k, v = make_qkv(positions)
    with pytest.raises(ValueError, match="backend"):
        mlswa_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), positions, [2, 1, 1], backend="nope"
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["compact", "dense", "auto", "flex"])
def test_cuda_backends_match_cpu_reference(backend):
    windows = [16, 4, 2]
    positions = make_positions(17, batch=2, pad=7, sections=(4, 8), sentences=(3, 8), length=(3, 20))
    q, k, v = make_qkv(positions, dtype=torch.float32, seed=1, dim=64, scale=1.0)
    want, _ = reference(q, k, v, positions, windows, 2)
    dev = [t.cuda().requires_grad_(True) for t in (q, k, v)]
    got = MLSWAContext(positions.to("cuda"), windows, backend).attend(*dev, 2)
    got.sum().backward()
    assert relative_error(got.cpu(), want) < 1e-4
    assert all(torch.isfinite(t.grad).all() for t in dev)


# ----------------------------------------------------------------------------------------------
# linear memory: no N x N tensor on the compact path
# ----------------------------------------------------------------------------------------------
class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_tensor(backend: str, n_sentences: int) -> tuple[int, int]:
    doc = [[12] * n_sentences for _ in range(4)]
    positions = positions_from_lengths(doc)
    n = positions.seq_len
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 1, 8, generator=gen, requires_grad=True) for _ in range(3))
    with _LargestTensor() as probe:
        mlswa_attention(q, k, v, positions, [16, 4, 2], backend=backend).sum().backward()
    return probe.largest, n


@pytest.mark.parametrize("backend", ["compact", "auto"])
def test_compact_path_allocates_nothing_quadratic(backend: str):
    """At N ~ 4000 with small windows every intermediate (forward and backward) is far below N^2."""
    largest, n = _largest_tensor(backend, 84)
    assert n > DENSE_AUTO_MAX_LEN
    assert largest < n * n / 16
    # ... and it grows linearly: doubling N roughly doubles the largest tensor, never quadruples it
    largest_double, n_double = _largest_tensor(backend, 168)
    assert largest_double <= 2.5 * largest * n_double / (2 * n)


def test_the_quadratic_probe_sees_the_dense_mask():
    largest, n = _largest_tensor("dense", 84)
    assert largest >= n * n


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("windows", [[3, 1, 1], [16, 4, 2], [40, 5, 2]])
def test_contiguous_level0_band_and_mask_equal_the_generic_construction(seed, windows):
    """Level 0's band is built from one [C, K] pattern and the float mask by one broadcast add; both
    must equal the per-pair construction, padding rows and the ends of the sequence included."""
    from lhtcli.core.flash import _level_mask, _rows_with_keys
    from lhtcli.core.mask import level_enums
    from lhtcli.core.plan import NEG_INF as NEG
    from lhtcli.core.plan import _band, _compact_order

    positions = make_positions(seed, batch=3, sections=(1, 8), sentences=(1, 8), length=(1, 12), pad=5)
    plan = build_mlswa_plan(positions, windows)
    lp = plan.levels[0]
    assert lp.contiguous
    enums = level_enums(positions, windows)[0]
    order, valid, _ = _compact_order(enums != 0, positions.seq_len)
    e = torch.where(valid, torch.gather(enums, 1, order), 0)
    generic = _band(e, valid, windows[0], lp.chunk, lp.halo)
    assert torch.equal(lp.band_mask[:, 0], generic)
    has, _ = _rows_with_keys(plan, 0)
    opened = generic | ~has.view(generic.shape[0], lp.num_chunks, lp.chunk, 1)
    want = torch.where(opened, 0.0, NEG)
    assert torch.equal(_level_mask(plan, 0, torch.float32), want)
    assert torch.equal(_level_mask(plan, 0, torch.float64), want.double())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("doc_token", [True, False])
@pytest.mark.parametrize("max_level", [1, 2])
def test_extra_key_lists_are_exactly_the_pairs_beyond_level0(seed, doc_token, max_level):
    """The native kernel's boundary rows see their level-0 band plus the listed keys: together exactly
    the dense mask's pairs, each once (the lists are disjoint from the band and free of repeats)."""
    from lhtcli.core.plan import extra_keys

    windows = [4, 2, 1]
    positions = make_positions(seed, batch=3, doc_token=doc_token, sections=(2, 8), sentences=(2, 8),
                               length=(1, 10), pad=4)
    plan = build_mlswa_plan(positions, windows, max_level)
    lists = extra_keys(plan)
    assert extra_keys(plan) is lists  # built once per plan
    n = positions.seq_len
    got = torch.zeros(plan.batch_size, n, n, dtype=torch.long)
    for r in range(lists.row_batch.numel()):
        keys = lists.keys[lists.offsets[r] : lists.offsets[r + 1]]
        assert keys.numel() > 0
        got[lists.row_batch[r], lists.row_pos[r]].index_add_(0, keys, torch.ones_like(keys))
    rows = torch.stack([lists.row_batch, lists.row_pos], 1).tolist()
    assert rows == sorted(rows) and len({tuple(r) for r in rows}) == len(rows)  # ordered, one entry per row
    real = positions.real_mask
    enum0 = real.long().cumsum(1)  # level 0 enumerates the real tokens in order
    band = (enum0[:, :, None] - enum0[:, None, :]).abs() <= windows[0]
    band &= real[:, :, None] & real[:, None, :]
    got += band.long()
    assert got.max() == 1  # no pair twice
    assert torch.equal(got.bool(), mlswa_dense_mask(positions, windows, max_level))
