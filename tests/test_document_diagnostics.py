"""Issue 19 diagnostics: document maps, reachability, hierarchy usage, sinks, logits, comparisons.

Numbers are checked against float64 dense references built from the mask definition; the commands
run end to end on the tiny checkpoint of test_diagnostic_commands.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_diagnostic_commands import assert_png, make_checkpoint, run_main, runner, tiny  # noqa: F401

from lhtcli.cli import app
from lhtcli.config import ModelConfig
from lhtcli.core.mask import DOC_LINK, MASKED, pair_level_map
from lhtcli.core.positions import HierarchicalPositions, build_sequences, positions_from_lengths
from lhtcli.core.probing import mlswa_attention_probs
from lhtcli.diagnostics.attention_stats import (
    SINK_TOKENS,
    EntropyStats,
    HeadChange,
    capture_attention,
    collapse_warnings,
    entropy_report,
)
from lhtcli.diagnostics.docmap import DocumentLayout, document_maps
from lhtcli.diagnostics.reach import reachability
from lhtcli.model import LHTEncoder

WINDOWS = [3, 1, 1]


def tiny_model(max_seq_len: int = 64) -> LHTEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({
        "vocab_size": 50, "d_model": 16, "n_heads": 2, "num_layers": 3, "d_ff": 32, "dropout": 0.0,
        "max_seq_len": max_seq_len,
        "mlswa": {"num_levels": 3, "window_size_per_level": WINDOWS, "layer_max_level": [0, 1, 2]},
    })
    model = LHTEncoder(cfg).eval()
    with torch.no_grad():  # sharper attention than the 0.02 initialisation, so the numbers differ
        for block in model.blocks:
            block.attn.qkv.weight.mul_(20)
    return model


def test_hierarchy_usage_sinks_and_logits_match_dense():
    model = tiny_model()
    positions = HierarchicalPositions.batch(
        [positions_from_lengths([[3, 2, 4], [2, 3], [4, 2, 1]]), positions_from_lengths([[2, 2], [3]])]
    )
    ids = torch.randint(5, 50, (2, positions.seq_len), generator=torch.Generator().manual_seed(1))
    report = entropy_report(model, [(ids, positions)])
    captures = capture_attention(model, ids, positions)
    real = positions.real_mask
    for cap, layer in zip(captures, report.layers, strict=True):
        probs = mlswa_attention_probs(cap.q.double(), cap.k.double(), positions, WINDOWS, cap.max_level)
        codes = pair_level_map(positions, WINDOWS, cap.max_level).long()  # [B, N, N]
        codes = torch.where(codes == DOC_LINK, torch.full_like(codes, len(WINDOWS) - 1), codes)
        for h, head in enumerate(layer.heads):
            p = probs[:, :, h]  # [B, N, N]
            for level in range(1, len(WINDOWS)):
                linked = (codes == level).any(-1) & real
                assert head.linked_queries[level] == int(linked.sum())
                if linked.any():
                    usage = (p * (codes == level)).sum(-1)[linked].mean()
                    assert head.hierarchy_usage[level] == pytest.approx(float(usage), rel=1e-9)
                    share = ((codes == level).sum(-1).double() / (codes != MASKED).sum(-1).clamp(min=1))[linked].mean()
                    assert head.hierarchy_uniform[level] == pytest.approx(float(share), rel=1e-9)
                else:
                    assert head.hierarchy_usage[level] is None
            visible = ((codes[..., :SINK_TOKENS] != MASKED).any(-1)) & real
            sink = p[..., :SINK_TOKENS].sum(-1)[visible].mean()
            assert head.sink_share == pytest.approx(float(sink), rel=1e-9)
            scores = torch.einsum("bnd,bkd->bnk", cap.q[:, :, h].double(), cap.k[:, :, h].double()) / math.sqrt(8)
            top = scores.masked_fill(codes == MASKED, float("-inf")).amax(-1)[real].max()
            assert head.max_logit == pytest.approx(float(top), rel=1e-6)
    scalars = report.scalars()
    assert "hierarchy_usage/layer_2_sections" in scalars and "attention_sinks/layer_0" in scalars
    usage, base = report.layers[2].stats.hierarchy_usage[2], report.layers[2].stats.hierarchy_uniform[2]
    assert scalars["hierarchy_usage/layer_2_sections_vs_uniform"] == pytest.approx(usage / base)
    assert "hierarchy_usage/layer_0_sentences" not in scalars  # layer 0 has no sentence links


def test_collapse_is_a_sharp_fall_of_normalised_entropy():
    def stats(norm: float) -> EntropyStats:
        return EntropyStats(3.0, 0.1, 2.0, 4.0, norm, [1.0, 0.0, 0.0], 10)

    fell = HeadChange(0, None, stats(0.8), stats(0.3))
    learned = HeadChange(1, None, stats(0.99), stats(0.6))  # ordinary learning, not a collapse
    assert fell.collapsed and not learned.collapsed
    assert fell.delta("normalized_mean") == pytest.approx(-0.5)
    lines = collapse_warnings([fell, learned, HeadChange(0, 1, stats(0.8), stats(0.1))], "step 1", "step 2")
    assert len(lines) == 1 and lines[0].startswith("layer 0: normalised attention entropy fell from 0.800")


def dense_reach(positions, windows, levels, source):
    reached = torch.zeros(positions.seq_len, dtype=torch.bool)
    reached[source] = True
    steps = []
    for level in levels:
        allowed = pair_level_map(positions, windows, level)[0] != MASKED
        reached = reached | (allowed & reached[None, :]).any(-1)
        steps.append(reached.clone())
    return torch.stack(steps)


@pytest.mark.parametrize("doc", [True, False])
def test_reachability_matches_dense_breadth_first_search(doc):
    positions = positions_from_lengths([[3, 2, 4], [2, 5], [1, 3, 2, 2], [4]], doc_token=doc).batched()
    levels = [0, 1, 2, 2]
    sources = [0, 7, positions.seq_len - 1]
    reach = reachability(positions, WINDOWS, levels, sources)
    for s, source in enumerate(sources):
        assert torch.equal(reach.reached[s], dense_reach(positions, WINDOWS, levels, source))
        window = dense_reach(positions, WINDOWS, [0] * len(levels), source).sum(-1)
        assert reach.window_only[s].tolist() == window.tolist()
    data = reach.to_json()
    assert data["sources"][1]["reached"][-1] >= data["sources"][1]["window_only_reached"][-1]
    with pytest.raises(ValueError, match="outside"):
        reachability(positions, WINDOWS, levels, [999])


def test_document_maps_pool_the_dense_probabilities_across_sequences():
    model = tiny_model(max_seq_len=16)
    doc = [[[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[14, 15], [16, 17, 18]], [[19] * 7, [20, 21]]]
    sequences = build_sequences(doc, 16, doc_token_id=2)
    assert len(sequences) >= 2  # the document is split: the map spans sequences
    layout = DocumentLayout.build(sequences, str)
    # one sequence per forward pass, so the float32 captures equal the reference's bit for bit
    maps = document_maps(model, layout, 0, ["sentences", "sections", "tokens"], [1, 2], batch_size=1)
    for unit in ("sentences", "sections", "tokens"):
        per_seq, starts, labels, _ = layout.unit_ids(unit)
        u = len(starts)
        for layer in (1, 2):
            dense = torch.zeros(model.cfg.n_heads, u, u, dtype=torch.float64)
            counts = torch.zeros(u, dtype=torch.float64)
            for seq, ids in zip(sequences, per_seq, strict=True):
                positions = seq.positions.batched()
                cap = capture_attention(model, torch.tensor([seq.input_ids]), positions)[layer]
                probs = mlswa_attention_probs(cap.q.double(), cap.k.double(), positions, WINDOWS, cap.max_level)[0]
                onehot = torch.nn.functional.one_hot(torch.tensor(ids), u).double()
                dense += torch.einsum("qu,qhk,kv->huv", onehot, probs, onehot)
                counts += onehot.sum(0)
            expected = (dense / counts[None, :, None]).mean(0)
            got = maps[(layer, unit)]
            torch.testing.assert_close(got.matrix, expected, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(got.row_mass(), torch.ones(u, dtype=torch.float64))
            assert got.labels == labels and got.queries == counts.long().tolist()
    assert maps[(1, "sentences")].labels[0] == "[DOC]"
    assert len(maps[(1, "sentences")].sequence_breaks) == len(sequences)
    # zoom: the range's tokens only, as queries and as keys
    zoom = document_maps(model, layout, 0, ["tokens"], [2], start=3, stop=12, batch_size=1)[(2, "tokens")]
    full = maps[(2, "tokens")]
    torch.testing.assert_close(zoom.matrix, full.matrix[3:12, 3:12], rtol=1e-9, atol=1e-12)
    assert zoom.labels == [str(t) for t in layout.tokens[3:12]]


def test_map_command_json_zoom_and_errors(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "map.png"
    args = ["map", "--checkpoint", str(tiny["checkpoint"]), "--layer", "all", "--json", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_sequences"] >= 2 and data["start"] == 0 and data["stop"] == data["num_tokens"]
    assert {(m["layer"], m["unit"]) for m in data["maps"]} == {(0, "sentences"), (0, "sections"),
                                                               (1, "sentences"), (1, "sections")}
    for m in data["maps"]:
        assert all(abs(r - 1) < 1e-9 for r in m["row_mass_inside"])
        assert set(m["summary"]) == {"own", "adjacent", "farther", "doc"}
    assert_png(out)
    zoom = runner.invoke(app, ["map", "--checkpoint", str(tiny["checkpoint"]), "--start", "5", "--span", "20",
                               "--head", "1", "-o", str(out), "--json"])
    assert zoom.exit_code == 0, zoom.output
    token_map = json.loads(zoom.stdout)["maps"][0]
    assert token_map["unit"] == "tokens" and len(token_map["labels"]) == 20 and token_map["head"] == 1
    table = runner.invoke(app, ["map", "--config", str(tiny["config"]), "--document", str(tiny["document"]),
                                "-o", str(out)])
    assert table.exit_code == 0 and "Where attention goes" in table.output and "doc.md" in table.output
    code, _, err = run_main(["map", "--checkpoint", str(tiny["checkpoint"]), "--layer", "9"], capsys)
    assert code == 2 and "--layer 9" in err
    code, _, err = run_main(["map", "--checkpoint", str(tiny["checkpoint"]), "--start", "99999"], capsys)
    assert code == 2 and "--start 99999" in err


def test_entropy_and_gradcheck_compare_two_checkpoints(tiny, tmp_path, capsys):  # noqa: F811
    sharp = make_checkpoint(tmp_path / "sharp", scale=8.0, name="tiny_diag")  # same tokenizer, peaked attention
    args = ["entropy", str(tiny["checkpoint"]), str(sharp), "--json", "-o", str(tmp_path / "cmp.png")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"a", "b", "changes", "warnings"} <= set(data)
    layers = [c for c in data["changes"] if c["head"] is None]
    assert len(layers) == 2 and all(c["collapsed"] for c in layers)
    assert any("fell from" in w for w in data["warnings"])
    assert_png(tmp_path / "cmp.png")
    first = layers[0]["normalized_mean"]
    assert first["delta"] == pytest.approx(first["after"] - first["before"])
    table = runner.invoke(app, ["entropy", str(tiny["checkpoint"]), str(sharp), "--per-head"])
    assert table.exit_code == 0 and "Δ Norm" in table.output and "▼▼" in table.output
    grad = runner.invoke(app, ["gradcheck", str(tiny["checkpoint"]), str(sharp), "--json",
                               "-o", str(tmp_path / "flow.png")])
    assert grad.exit_code == 0, grad.output
    gdata = json.loads(grad.stdout)
    assert gdata["changes"][0]["label"] == "embeddings" and all(r["after"] >= 0 for r in gdata["changes"])
    for path in gdata["figures"]:
        assert_png(tmp_path / path.split("/")[-1])
    code, _, err = run_main(["entropy", str(sharp), str(sharp), str(sharp)], capsys)
    assert code == 2 and "one or two checkpoints" in err


def test_capture_map_equals_the_document_map_of_one_sequence():
    from lhtcli.diagnostics.docmap import capture_map

    model = tiny_model(max_seq_len=64)
    sequences = build_sequences([[[5, 6, 7], [8, 9, 10, 11]], [[12, 13], [14, 15, 16]]], 64, doc_token_id=2)
    layout = DocumentLayout.build(sequences, str)
    expected = document_maps(model, layout, 0, ["sentences"], [2], batch_size=1)[(2, "sentences")]
    seq = sequences[0]
    cap = capture_attention(model, torch.tensor([seq.input_ids]), seq.positions.batched())[2]
    got = capture_map(cap, seq.positions, WINDOWS, [str(t) for t in seq.input_ids])
    torch.testing.assert_close(got.matrix, expected.matrix, rtol=1e-12, atol=1e-14)
    assert got.labels == expected.labels
