"""TrainingVisualizer: what it logs, when, and that it leaves the model as it found it."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from lhtcli.config import LHTConfig  # noqa: E402
from lhtcli.core.positions import HierarchicalPositions, positions_from_lengths  # noqa: E402
from lhtcli.diagnostics.training_viz import TrainingVisualizer  # noqa: E402
from lhtcli.model import LHTEncoder  # noqa: E402


class FakeLogger:
    def __init__(self):
        self.calls = []

    def log_scalars(self, values, step):
        self.calls.append(("scalars", dict(values), step))

    def log_figure(self, tag, figure, step):
        assert hasattr(figure, "savefig")
        self.calls.append(("figure", tag, step))

    def log_table(self, tag, columns, rows, step):
        self.calls.append(("table", tag, columns, rows, step))

    def log_text(self, tag, text, step):
        self.calls.append(("text", tag, step))

    def close(self):
        pass


class FakeTokenizer:
    def id_to_token(self, i):
        return f"tok{i}"


def make_config(every: int = 5) -> LHTConfig:
    return LHTConfig.model_validate(
        {
            "model": {
                "vocab_size": 30,
                "d_model": 16,
                "n_heads": 2,
                "num_layers": 2,
                "d_ff": 32,
                "max_seq_len": 64,
                "mlswa": {"num_levels": 3, "window_size_per_level": [4, 1, 1]},
            },
            "training": {"log_viz_every": every},
        }
    )


def make_batch():
    positions = HierarchicalPositions.batch(
        [positions_from_lengths([[3, 4], [5]]), positions_from_lengths([[6]])]
    )
    ids = torch.randint(5, 30, (2, positions.seq_len), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[0, 5], labels[1, 3] = 7, 8, 9
    return SimpleNamespace(input_ids=ids, labels=labels, positions=positions)


def test_due_and_start_message():
    viz = TrainingVisualizer(make_config(5), FakeTokenizer(), FakeLogger(), Console(record=True))
    assert [s for s in range(1, 16) if viz.due(s)] == [5, 10, 15]
    assert viz.start_message() == "✓ Visualization callbacks enabled (logging every 5 steps)"
    never = TrainingVisualizer(make_config(0), FakeTokenizer(), FakeLogger(), Console(record=True))
    assert not any(never.due(s) for s in range(1, 100))


def test_log_records_every_artifact_and_restores_train_mode():
    cfg = make_config(5)
    torch.manual_seed(0)
    model = LHTEncoder(cfg.model)
    model.train()
    batch = make_batch()
    out = model(batch.input_ids, batch.positions, labels=batch.labels)
    out.loss.backward()
    logger = FakeLogger()
    console = Console(record=True, width=200)
    viz = TrainingVisualizer(cfg, FakeTokenizer(), logger, console)
    norms = viz.gradient_norms(model)
    assert set(norms) == {n for n, _ in model.named_parameters()}
    assert all(v is not None and v > 0 for v in norms.values())
    viz.log(10, model, batch, norms)
    assert model.training
    assert plt.get_fignums() == []
    figures = [c[1] for c in logger.calls if c[0] == "figure"]
    assert figures == ["attention/layer_0", "attention/document_map", "attention/reachability", "gradients/flow"]
    viz.log(20, model, batch, norms)  # the reachability chart depends on the mask alone: logged once
    later = [c[1] for c in logger.calls if c[0] == "figure"][len(figures):]
    assert later == ["attention/layer_0", "attention/document_map", "gradients/flow"]
    tables = [c for c in logger.calls if c[0] == "table"]
    assert len(tables) == 2
    _, tag, columns, rows, step = tables[0]
    assert tag == "predictions/step_10" and step == 10
    assert columns == ["Sample", "Position", "Original", "Masked", "Top-5 Predictions", "Correct"]
    assert [r[:3] for r in rows] == [["0", "2", "tok7"], ["0", "5", "tok8"], ["1", "3", "tok9"]]
    scalars = [c[1] for c in logger.calls if c[0] == "scalars"][0]
    for key in (
        "attention/entropy_mean",
        "attention/entropy_std",
        "attention/entropy_min",
        "attention/entropy_max",
        "attention_entropy/layer_0_mean",
        "attention_entropy/layer_1_std",
        "attention/level_mass_0",
        "attention/level_mass_2",
    ):
        assert key in scalars
    assert console.export_text() == ""  # a healthy random init: no warnings


def test_warnings_on_vanishing_gradients_and_collapse():
    cfg = make_config(1)
    torch.manual_seed(0)
    model = LHTEncoder(cfg.model)
    # sharp attention: queries equal to scaled keys make every head pick one key
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(200.0)
    batch = make_batch()
    logger = FakeLogger()
    console = Console(record=True, width=300)
    viz = TrainingVisualizer(cfg, FakeTokenizer(), logger, console)
    norms = {name: 1e-9 for name, _ in model.named_parameters()}
    norms["blocks.0.mlp.fc.weight"] = 123.0
    viz.log(1, model, batch, norms)
    text = console.export_text()
    assert (
        "vanishing gradients" in text and "exploding gradients (norm > 10) in blocks.0.mlp.fc.weight" in text
    )
    assert "possible collapse" in text
    assert len(text.strip().splitlines()) == 3


def test_logs_hierarchy_usage_per_layer_and_warns_on_a_sharp_entropy_fall():
    cfg = make_config(5)
    logger = FakeLogger()
    console = Console(record=True, width=200)
    viz = TrainingVisualizer(cfg, FakeTokenizer(), logger, console)
    torch.manual_seed(0)
    model = LHTEncoder(cfg.model)
    batch = make_batch()
    # sentences longer than the token window (4), so sentence and section links exist
    batch.positions = HierarchicalPositions.batch(
        [positions_from_lengths([[6, 7, 5], [6, 8]]), positions_from_lengths([[9, 6, 7]])]
    )
    batch.input_ids = torch.randint(5, 30, (2, batch.positions.seq_len), generator=torch.Generator().manual_seed(0))
    batch.labels = torch.full_like(batch.input_ids, -100)
    batch.labels[0, 3] = 7
    viz.log(5, model, batch, None)
    scalars = [c[1] for c in logger.calls if c[0] == "scalars"][0]
    for key in ("hierarchy_usage/layer_1_sentences", "hierarchy_usage/layer_1_sections",
                "attention_entropy/layer_0_normalized",
                "attention_sinks/layer_1", "attention_logits/layer_1_max"):
        assert key in scalars
    assert "fell from" not in console.export_text()
    with torch.no_grad():  # much sharper attention at the next logging step: a collapse
        for block in model.blocks:
            block.attn.qkv.weight.mul_(60)
    viz.log(10, model, batch, None)
    text = console.export_text()
    assert "normalised attention entropy fell from" in text and "(step 5) to" in text and "(step 10)" in text
