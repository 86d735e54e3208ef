"""lht visualize / entropy / gradcheck / demo end to end on a tiny checkpoint and a tiny config."""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from lhtcli.cli import app, main  # noqa: E402
from lhtcli.config import LHTConfig  # noqa: E402
from lhtcli.diagnostics.loading import sample_tokenizer  # noqa: E402
from lhtcli.diagnostics.sample_document import sample_document  # noqa: E402
from lhtcli.model import LHTEncoder  # noqa: E402
from lhtcli.training.checkpoint import Checkpoint, save_checkpoint  # noqa: E402

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})

TINY = {
    "experiment_name": "tiny_diag",
    "seed": 3,
    "device": "cpu",
    "model": {
        "d_model": 32,
        "n_heads": 2,
        "num_layers": 2,
        "d_ff": 64,
        "dropout": 0.0,
        "max_seq_len": 128,
        "mlswa": {"num_levels": 3, "window_size_per_level": [8, 2, 1], "layer_max_level": [1, 2]},
    },
    "training": {"batch_size": 2, "mlm_probability": 0.3},
    "data": {"validation_fraction": 0.5},
    "logging": {"backend": "none"},
}


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path
    image = mpimg.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 50
    assert plt.get_fignums() == []


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def corpus(path: Path) -> Path:
    """A small JSONL corpus: the sample's sections as several documents."""
    docs = [[section] for section in sample_document()] + [sample_document()[:2], sample_document()[2:]]
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8")
    return path


def make_checkpoint(directory: Path, scale: float = 1.0, name: str = "tiny_diag") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = json.loads(json.dumps(TINY))
    data["experiment_name"] = name
    data["data"]["path"] = str(corpus(directory / "corpus.jsonl"))
    data["logging"]["dir"] = str(directory / "runs")
    tokenizer = sample_tokenizer()
    data["model"]["vocab_size"] = tokenizer.vocab_size
    cfg = LHTConfig.model_validate(data)
    torch.manual_seed(0)
    model = LHTEncoder(cfg.model)
    if scale != 1.0:
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(scale)
    ckpt = Checkpoint(
        step=7, config=cfg, model_state=model.state_dict(), tokenizer_json=tokenizer.to_json_str()
    )
    return save_checkpoint(ckpt, directory / "checkpoints" / name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diag")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    document = root / "doc.md"
    document.write_text(
        "# Rivers\n\nA river starts in the hills. It gathers water from many streams.\n\n"
        "# Cities\n\nCities grow along rivers. Boats carry goods between them. Bridges join the banks.\n",
        encoding="utf-8",
    )
    return {
        "root": root,
        "config": config,
        "document": document,
        "checkpoint": make_checkpoint(root),
        "vanishing": make_checkpoint(root / "v", scale=1e-6, name="vanishing"),
    }


def test_visualize_checkpoint_writes_heatmap_and_prints_entropy(tiny, tmp_path):
    out = tmp_path / "heat.png"
    result = runner.invoke(app, ["visualize", "--checkpoint", str(tiny["checkpoint"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert_png(out)
    assert "step 7" in result.output
    assert "attention heatmap of layer 0 (mean over heads, tokens 0-59)" in result.output
    assert "Attention entropy" in result.output and "validation" in result.output


def test_visualize_config_all_layers_json(tiny, tmp_path):
    out = tmp_path / "grid.png"
    args = [
        "visualize",
        "--config",
        str(tiny["config"]),
        "--layer",
        "all",
        "--head",
        "1",
        "--max-tokens",
        "20",
        "--start",
        "3",
        "--color-by-level",
        "-o",
        str(out),
        "--json",
        "--document",
        str(tiny["document"]),
        "--reach-from",
        "4",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= {"figure", "model", "step", "text", "layer", "head", "maps", "entropy"}
    assert data["layer"] == "all" and data["head"] == 1 and data["step"] == 0
    assert [m["layer"] for m in data["maps"]] == [0, 1]
    first = data["maps"][0]
    assert first["start"] == 3 and len(first["tokens"]) == 20 and len(first["probs"]) == 20
    assert "random initialisation" in data["model"] and data["text"].endswith("doc.md")
    assert len(data["entropy"]["layers"]) == 2
    assert [s["token"] for s in data["reachability"]["sources"]] == [4]
    assert data["reachability"]["layer_max_level"] == [1, 2]
    assert_png(out)


def test_visualize_logs_to_tensorboard_under_the_run_dir(tiny, tmp_path):
    runs = tmp_path / "runs"
    args = [
        "visualize",
        "--checkpoint",
        str(tiny["checkpoint"]),
        "-o",
        str(tmp_path / "h.png"),
        "--log-to",
        "tensorboard",
        "--set",
        f"logging.dir={runs}",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    events = list((runs / "tiny_diag").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert "logged to tensorboard" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "9"], "the model has 2 layers"),
        (["--head", "5"], "the model has 2 heads"),
        (["--start", "100000"], "--start 100000"),
        (["--checkpoint", "missing.ckpt"], "checkpoint not found"),
        (["--document", "nope.md"], "document file not found"),
        (["--set", "model.d_model=64", "--checkpoint", "CKPT"], "comes from the checkpoint"),
    ],
)
def test_visualize_user_errors_exit_2(tiny, tmp_path, capsys, args, message):
    args = [str(tiny["checkpoint"]) if a == "CKPT" else a for a in args]
    if "--checkpoint" not in args:
        args = ["--config", str(tiny["config"]), *args]
    code, _, err = run_main(["visualize", "-o", str(tmp_path / "x.png"), *args], capsys)
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_checkpoint_and_config_together_is_an_error(tiny, capsys):
    code, _, err = run_main(
        ["entropy", "--checkpoint", str(tiny["checkpoint"]), "--config", str(tiny["config"])], capsys
    )
    assert code == 2 and "not both" in err


def test_entropy_json_over_validation_batches(tiny, tmp_path):
    out = tmp_path / "entropy.png"
    args = ["entropy", "--checkpoint", str(tiny["checkpoint"]), "--batches", "2", "--json", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in (
        "model",
        "step",
        "text",
        "batches",
        "figure",
        "units",
        "thresholds",
        "levels",
        "overall",
        "layers",
        "num_sequences",
        "interpretation",
    ):
        assert key in data
    assert data["batches"] == 2 and data["num_sequences"] == 4 and "validation" in data["text"]
    layer = data["layers"][0]
    for key in (
        "layer",
        "max_level",
        "mean",
        "std",
        "min",
        "max",
        "normalized_mean",
        "level_mass",
        "flag",
        "heads",
        "num_queries",
    ):
        assert key in layer
    assert len(layer["heads"]) == 2 and layer["max_level"] == 1
    assert 0 < data["overall"]["normalized_mean"] <= 1
    assert_png(out)


def test_entropy_table_per_head_on_a_document(tiny):
    args = ["entropy", "--config", str(tiny["config"]), "--document", str(tiny["document"]), "--per-head"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # random weights attend near-uniformly: flagged on the normalised entropy, with the reason
    for text in ("Attention entropy", "Head", "Mean", "Norm", "near-uniform (scores ignore content) (expected "
                 "for random weights)", "Hierarchy usage", "sent used", "doc.md"):
        assert text in result.output


def test_gradcheck_healthy_json_and_numerical(tiny, tmp_path):
    out = tmp_path / "flow.png"
    args = [
        "gradcheck",
        "--checkpoint",
        str(tiny["checkpoint"]),
        "--batches",
        "2",
        "--numerical",
        "--json",
        "--strict",
        "-o",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in (
        "model",
        "step",
        "text",
        "batches",
        "loss",
        "figure",
        "healthy",
        "total_norm",
        "vanishing",
        "exploding",
        "nonfinite",
        "missing",
        "groups",
        "params",
        "numerical",
    ):
        assert key in data
    assert data["healthy"] is True and data["batches"] == 2 and data["total_norm"] > 0
    assert [c["passed"] for c in data["numerical"]] == [True, True, True]
    assert {g["kind"] for g in data["groups"]} == {"embeddings", "attention", "mlp", "norms", "head"}
    assert_png(out)


def test_gradcheck_strict_fails_on_vanishing_gradients(tiny, tmp_path):
    out = tmp_path / "flow.png"
    args = ["gradcheck", "--checkpoint", str(tiny["vanishing"]), "--strict", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "vanishing" in result.output and "unhealthy" in result.output
    assert_png(out)
    # without --strict the same report exits 0
    result = runner.invoke(app, ["gradcheck", "--checkpoint", str(tiny["vanishing"]), "-o", str(out)])
    assert result.exit_code == 0, result.output


def test_gradcheck_table_on_config(tiny, tmp_path):
    out = tmp_path / "flow.png"
    result = runner.invoke(app, ["gradcheck", "--config", str(tiny["config"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("Gradient norms", "attention", "mlp", "embeddings", "healthy", "gradient-flow chart saved"):
        assert text in result.output


def test_demo_is_fast_and_writes_its_figures(tmp_path):
    start = time.perf_counter()
    result = runner.invoke(app, ["demo", "--output-dir", str(tmp_path / "demo")])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert elapsed < 30, f"lht demo took {elapsed:.1f}s"
    for name in ("mlswa_mask.png", "attention_heatmap.png", "entropy.png"):
        assert_png(tmp_path / "demo" / name)
    for text in ("Hierarchical position vectors", "ML-SWA windows", "Attention entropy", "[CLS]"):
        assert text in result.output


def test_demo_json(tmp_path):
    result = runner.invoke(app, ["demo", "--output-dir", str(tmp_path / "d"), "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in (
        "document",
        "tokens",
        "positions",
        "windows",
        "layer_max_level",
        "model",
        "heatmap",
        "entropy",
        "files",
        "seconds",
    ):
        assert key in data
    assert 300 <= data["document"]["tokens"] <= 600
    assert len(data["positions"]["tokens"]) == data["document"]["tokens"]
    assert data["positions"]["sentences"].count(0) < data["document"]["tokens"]
    assert data["model"]["seed"] == 1
    assert all(Path(p).is_file() for p in data["files"].values())
    reach = data["reachability"]
    assert reach["sources"][0]["label"] == "[DOC]" and len(reach["sources"][0]["reached"]) == 2
    for source in reach["sources"]:  # the hierarchy never reaches less than the token window alone
        assert all(h >= w for h, w in zip(source["reached"], source["window_only_reached"], strict=True))
    assert "reachability" in data["files"]
