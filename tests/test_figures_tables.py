"""Diagnostics (entropy report, gradients, predictions) and their figures and tables."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from lhtcli.config import ModelConfig  # noqa: E402
from lhtcli.core.mask import mlswa_dense_mask  # noqa: E402
from lhtcli.core.positions import HierarchicalPositions, positions_from_lengths  # noqa: E402
from lhtcli.core.probing import mlswa_attention_probs  # noqa: E402
from lhtcli.diagnostics.attention_stats import (  # noqa: E402
    EntropyAccumulator,
    attention_map,
    capture_attention,
    entropy_flag,
    entropy_report,
)
from lhtcli.diagnostics.gradients import classify_parameter, gradient_report, report_from_norms  # noqa: E402
from lhtcli.diagnostics.predictions import PREDICTION_COLUMNS, mlm_predictions, prediction_rows  # noqa: E402
from lhtcli.model import LHTEncoder  # noqa: E402
from lhtcli.render.figures import (  # noqa: E402
    attention_heatmap,
    entropy_figure,
    gradient_flow_figure,
    mask_figure,
    save_figure,
)
from lhtcli.render.tables import (  # noqa: E402
    entropy_table,
    gradient_table,
    hierarchy_table,
    positions_table,
    prediction_table,
)

WINDOWS = [6, 2, 1]


def tiny_model(layers: int = 3, heads: int = 2) -> LHTEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=40,
        d_model=16,
        n_heads=heads,
        num_layers=layers,
        d_ff=32,
        dropout=0.0,
        max_seq_len=128,
        mlswa={"num_levels": 3, "window_size_per_level": WINDOWS, "layer_max_level": [0, 1, 2][:layers]},
    )
    return LHTEncoder(cfg)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    positions = HierarchicalPositions.batch(
        [positions_from_lengths([[4, 6, 3], [5, 2], [7, 3, 3]]), positions_from_lengths([[3, 3], [5]])]
    )
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (2, positions.seq_len), generator=gen)
    ids[~positions.real_mask] = 0
    return model, ids, positions


def assert_png(path):
    assert path.exists() and path.stat().st_size > 0
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert plt.get_fignums() == []


def dense_entropy(q, k, positions, max_level):
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # captures are [B, N, H, D]
    mask = mlswa_dense_mask(positions, WINDOWS, max_level)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    logp = torch.log_softmax(scores, -1)
    p = logp.exp()
    return -(torch.where(mask[:, None], p * logp, torch.zeros_like(p))).sum(-1)


def test_entropy_report_matches_dense_reference(setup):
    model, ids, positions = setup
    report = entropy_report(model, [(ids, positions)])
    captures = capture_attention(model, ids, positions)
    assert model.training  # mode restored
    real = positions.real_mask
    pooled = []
    for cap, layer in zip(captures, report.layers, strict=True):
        ent = dense_entropy(cap.q, cap.k, positions, cap.max_level)  # [B, H, N]
        rows = ent.permute(1, 0, 2)[:, real]  # [H, R]
        assert layer.stats.num_queries == rows.numel()
        assert layer.stats.mean == pytest.approx(float(rows.mean()), rel=1e-9)
        assert layer.stats.std == pytest.approx(float(rows.std(unbiased=False)), rel=1e-6)
        assert layer.stats.min == pytest.approx(float(rows.min()), rel=1e-9)
        assert layer.stats.max == pytest.approx(float(rows.max()), rel=1e-9)
        for h, head in enumerate(layer.heads):
            assert head.mean == pytest.approx(float(rows[h].mean()), rel=1e-9)
        assert sum(layer.stats.level_mass) == pytest.approx(1.0)
        assert all(m == 0 for m in layer.stats.level_mass[layer.max_level + 1 :])
        pooled.append(rows.flatten())
    everything = torch.cat(pooled)
    scalars = report.scalars()
    assert scalars["attention/entropy_mean"] == pytest.approx(float(everything.mean()), rel=1e-9)
    assert scalars["attention/entropy_max"] == pytest.approx(float(everything.max()), rel=1e-9)
    for key in ("std", "min"):
        assert f"attention/entropy_{key}" in scalars
    for i in range(3):
        assert (
            f"attention_entropy/layer_{i}_mean" in scalars and f"attention_entropy/layer_{i}_std" in scalars
        )
        assert f"attention/level_mass_{i}" in scalars
    data = json.loads(json.dumps(report.to_json()))
    assert set(data) >= {"units", "thresholds", "levels", "overall", "layers", "num_sequences"}
    assert data["layers"][0]["heads"][1]["head"] == 1
    assert set(data["layers"][0]) >= {
        "layer",
        "max_level",
        "mean",
        "std",
        "min",
        "max",
        "normalized_mean",
        "level_mass",
        "flag",
        "num_queries",
    }


def test_entropy_accumulates_over_batches(setup):
    model, ids, positions = setup
    once = entropy_report(model, [(ids, positions)])
    split = entropy_report(model, [(ids[:1], positions[0:1]), (ids[1:], positions[1:2])])
    assert split.num_sequences == 2
    assert split.overall.num_queries == once.overall.num_queries
    # per-sequence padding differs, so the attention of the real rows is the same
    assert split.overall.mean == pytest.approx(once.overall.mean, rel=1e-6)
    with pytest.raises(ValueError):
        EntropyAccumulator(WINDOWS).report()


def test_flags_are_judged_on_normalised_entropy():
    assert entropy_flag(0.05) == "focused"
    assert entropy_flag(0.99) == "uniform"
    assert entropy_flag(0.6) is None  # whatever the nats: 4 nats over 513 keys is ordinary
    assert entropy_flag(None) is None
    assert entropy_flag(float("nan")) is None


def test_attention_map_matches_probes(setup):
    model, ids, positions = setup
    captures = capture_attention(model, ids, positions)
    cap = captures[2]
    amap = attention_map(cap, positions, WINDOWS, [f"w{i}" for i in range(40)], start=2, max_tokens=10)
    full = mlswa_attention_probs(cap.q[:1], cap.k[:1], positions[0:1], WINDOWS, cap.max_level)
    torch.testing.assert_close(amap.probs, full[0].mean(1)[2:12, 2:12].float())  # [R, H, N]
    assert amap.tokens[0] == "w2" and len(amap.tokens) == 10
    assert (amap.probs[amap.levels < 0] == 0).all()
    one_head = attention_map(cap, positions, WINDOWS, head=1, sample=1, max_tokens=500)
    assert one_head.probs.shape[0] == int(positions.real_mask[1].sum())  # padding cut off
    with pytest.raises(ValueError, match="head"):
        attention_map(cap, positions, WINDOWS, head=5)


def test_heatmaps_and_mask_figure(setup, tmp_path):
    model, ids, positions = setup
    captures = capture_attention(model, ids, positions)
    maps = [attention_map(c, positions, WINDOWS, [f"t{i}" for i in range(60)]) for c in captures]
    for name, fig in [
        ("one.png", attention_heatmap(maps[2])),
        ("levels.png", attention_heatmap(maps[2], color_by_level=True)),
        ("grid.png", attention_heatmap(maps)),
        ("mask.png", mask_figure(positions, WINDOWS)),
    ]:
        path = save_figure(fig, tmp_path / name)
        assert_png(path)
    # a figure for a logger is a Figure object that pyplot does not track
    fig = attention_heatmap(maps[0])
    assert hasattr(fig, "savefig") and plt.get_fignums() == []


def test_gradient_report_and_flow_chart(setup, tmp_path):
    model, ids, positions = setup
    labels = ids.clone()
    labels[:, ::2] = -100
    labels[~positions.real_mask] = -100
    model.zero_grad()
    model(ids, positions, labels=labels).loss.backward()
    report = gradient_report(model)
    assert report.healthy, report.warnings()
    assert report.total_norm > 0
    kinds = {g.kind for g in report.groups()}
    assert kinds == {"embeddings", "attention", "mlp", "norms", "head"}
    flow = report.flow()
    assert flow[0].kind == "embeddings" and {p.name for p in flow} == {p.name for p in report.params}
    assert any(p.kind == "embeddings" for p in report.params)
    assert_png(save_figure(gradient_flow_figure(report), tmp_path / "flow.png"))

    norms = {p.name: p.norm for p in report.params}
    norms["blocks.0.attn.qkv.weight"] = 0.0
    norms["blocks.1.mlp.fc.weight"] = 50.0
    norms["blocks.2.norm1.weight"] = float("nan")
    norms["mlm_head.bias"] = None
    bad = report_from_norms(norms)
    assert not bad.healthy
    assert bad.vanishing == ["blocks.0.attn.qkv.weight"]
    assert bad.exploding == ["blocks.1.mlp.fc.weight"]
    assert bad.nonfinite == ["blocks.2.norm1.weight"]
    assert bad.missing == ["mlm_head.bias"]
    data = json.loads(json.dumps(bad.to_json()))
    assert data["healthy"] is False and data["missing"] == ["mlm_head.bias"]
    assert_png(save_figure(gradient_flow_figure(bad), tmp_path / "bad_flow.png"))

    console = Console(record=True, width=160)
    console.print(gradient_table(bad))
    text = console.export_text()
    for needle in (
        "vanishing: blocks.0.attn.qkv.weight",
        "exploding: blocks.1.mlp.fc.weight",
        "NaN/Inf: blocks.2.norm1.weight",
        "no gradient: mlm_head.bias",
        "unhealthy",
    ):
        assert needle in text
    console.print(gradient_table(bad, per_parameter=True))
    assert "blocks.1.mlp.fc.weight" in console.export_text()


def test_classify_parameter():
    assert classify_parameter("token_embedding.weight") == (None, "embeddings")
    assert classify_parameter("blocks.3.attn.qkv.weight") == (3, "attention")
    assert classify_parameter("blocks.11.mlp.fc.bias") == (11, "mlp")
    assert classify_parameter("blocks.0.norm2.weight") == (0, "norms")
    assert classify_parameter("final_norm.weight") == (None, "norms")
    assert classify_parameter("mlm_head.dense.weight") == (None, "head")


def test_predictions_table():
    logits = torch.full((2, 5, 8), -10.0)
    logits[0, 1, 3] = 5.0  # right
    logits[0, 3, 6] = 5.0  # wrong (label 2)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 3] = 3, 2
    ids = torch.zeros(2, 5, dtype=torch.long)
    ids[0, 1] = ids[0, 3] = 4
    vocab = ["[PAD]", "[UNK]", "cat", "dog", "[MASK]", "x", "fish", "y"]

    class Tok:
        def id_to_token(self, i):
            return vocab[i]

    preds = mlm_predictions(logits, labels, ids, Tok())
    rows = prediction_rows(preds)
    assert PREDICTION_COLUMNS == ["Sample", "Position", "Original", "Masked", "Top-5 Predictions", "Correct"]
    assert rows[0][:4] == ["0", "1", "dog", "[MASK]"] and rows[0][5] == "✓"
    assert rows[1][2] == "cat" and rows[1][5] == "✗"
    assert rows[0][4].startswith("dog (") and rows[0][4].count("%") == 5
    # at most 10 positions per sample
    many = torch.zeros(1, 30, 8)
    many_labels = torch.ones(1, 30, dtype=torch.long)
    assert len(mlm_predictions(many, many_labels, torch.zeros(1, 30, dtype=torch.long))) == 10
    console = Console(record=True, width=160)
    console.print(prediction_table(preds))
    text = console.export_text()
    assert "Top-5 Predictions" in text and "✓" in text and "✗" in text


def test_entropy_table_figure_and_positions_table(setup, tmp_path):
    model, ids, positions = setup
    report = entropy_report(model, [(ids, positions)])
    report.layers[1].stats.normalized_mean = 0.05  # force a focus flag
    report.layers[2].stats.normalized_mean = 0.5  # and a healthy layer
    for head in report.layers[2].heads:
        head.normalized_mean = 0.5
    console = Console(record=True, width=200)
    console.print(entropy_table(report))
    console.print(entropy_table(report, per_head=True))
    console.print(hierarchy_table(report, per_head=True))
    console.print(positions_table(positions, [f"t{i}" for i in range(60)], max_tokens=12))
    text = console.export_text()
    assert "0.050 ▼" in text and "focused" in text and "near-uniform" in text
    assert "Head" in text and "sent %" in text and "sent used" in text and "Sink %" in text
    assert "Hierarchical position vectors" in text and "more tokens" in text
    warnings = report.warnings()
    assert any(w.startswith("layer 1: normalised attention entropy 0.050") and "possible collapse" in w
               for w in warnings)
    assert not any(w.startswith("layer 2") for w in warnings)
    assert_png(save_figure(entropy_figure(report), tmp_path / "entropy.png"))


@pytest.mark.parametrize("per_head", [False, True])
def test_entropy_table_fits_an_80_column_terminal(setup, per_head: bool):
    model, ids, positions = setup
    report = entropy_report(model, [(ids, positions)])
    console = Console(record=True, width=80)
    console.print(entropy_table(report, per_head=per_head))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if "Mean" in line)
    for name in ("Layer", "Lvl", "Mean", "Std", "Min", "Max", "Norm", "tok %", "sent %", "sec %"):
        assert name in header, (name, header)
    assert ("Head" in header) == per_head
    assert all(len(line) <= 80 for line in lines)
    assert "…" not in "\n".join(lines)  # nothing truncated
    console = Console(record=True, width=80)
    console.print(hierarchy_table(report, per_head=per_head))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if "Sink %" in line)
    for name in ("sent links", "sent used", "sec links", "sec used", "Logit"):
        assert name in header, (name, header)
    assert all(len(line) <= 80 for line in lines) and "…" not in "\n".join(lines)


def test_figures_work_with_wandb_image():
    """W&B's Image(figure) looks up matplotlib.pyplot; our figures never import it themselves,
    so check in a fresh process where nothing else has."""
    import subprocess
    import sys

    pytest.importorskip("wandb")
    code = (
        "import sys, wandb\n"
        "from lhtcli.diagnostics.gradients import report_from_norms\n"
        "from lhtcli.render.figures import close_figure, gradient_flow_figure\n"
        "fig = gradient_flow_figure(report_from_norms({'blocks.0.attn.qkv.weight': 0.1}))\n"
        "image = wandb.Image(fig)\n"
        "close_figure(fig)\n"
        "import matplotlib.pyplot as plt\n"
        "assert image.image.size[0] > 100 and plt.get_fignums() == []\n"
        "assert plt.get_backend().lower() == 'agg'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
