"""lht export: safetensors + config.json + tokenizer.json, loadable as --checkpoint by the diagnostics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lhtcli.cli import main
from lhtcli.config import LHTConfig
from lhtcli.diagnostics.loading import document_batches, load_model, sample_tokenizer
from lhtcli.diagnostics.sample_document import sample_document
from lhtcli.model import LHTEncoder
from lhtcli.training.checkpoint import Checkpoint, save_checkpoint

TINY_MODEL = {
    "d_model": 32, "n_heads": 2, "num_layers": 2, "d_ff": 64, "dropout": 0.0, "max_seq_len": 128,
    "mlswa": {"num_levels": 3, "window_size_per_level": [8, 2, 1], "layer_max_level": [1, 2]},
}


def make_checkpoint(directory: Path) -> Path:
    """A step-7 checkpoint of a tiny random model (its corpus is the sample document)."""
    corpus = directory / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": [s]}) for s in sample_document()) + "\n", encoding="utf-8")
    tokenizer = sample_tokenizer()
    cfg = LHTConfig.model_validate({
        "experiment_name": "tiny_export", "seed": 3, "device": "cpu",
        "model": {**TINY_MODEL, "vocab_size": tokenizer.vocab_size}, "training": {"batch_size": 2},
        "data": {"path": str(corpus), "validation_fraction": 0.5}, "logging": {"backend": "none"},
    })
    torch.manual_seed(0)
    ckpt = Checkpoint(step=7, config=cfg, model_state=LHTEncoder(cfg.model).state_dict(),
                      tokenizer_json=tokenizer.to_json_str())
    return save_checkpoint(ckpt, directory / "checkpoints")


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    checkpoint = make_checkpoint(root)
    output = root / "model"
    from lhtcli.training.export import export_checkpoint

    export_checkpoint(checkpoint, output)
    return {"checkpoint": checkpoint, "output": output, "root": root}


def test_export_writes_the_hugging_face_layout(exported) -> None:
    output = exported["output"]
    assert sorted(p.name for p in output.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "lht" and config["hidden_size"] == 32 and config["num_hidden_layers"] == 2
    assert config["lht_step"] == 7 and config["lht_config"]["model"]["d_model"] == 32
    with safe_open(str(output / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        assert handle.metadata() == {"format": "pt"}
    # The MLM decoder's tied copy of the token embedding is stored once, as transformers does.
    assert "token_embedding.weight" in names and "mlm_head.embedding.weight" not in names
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(output / "tokenizer.json")).get_vocab_size() > 10


def test_exported_folder_gives_the_same_logits(exported) -> None:
    from_ckpt = load_model(exported["checkpoint"], None, device="cpu")
    from_dir = load_model(exported["output"], None, device="cpu")
    assert from_dir.step == 7 and from_dir.config.model == from_ckpt.config.model
    assert from_dir.model.mlm_head.embedding.weight is from_dir.model.token_embedding.weight  # still tied
    batch = document_batches(from_ckpt, sample_document(), 1, masked=False)[0]
    with torch.no_grad():
        a = from_ckpt.model(batch.input_ids, batch.positions).mlm_logits
        b = from_dir.model(batch.input_ids, batch.positions).mlm_logits
    assert a.shape[-1] == from_ckpt.tokenizer.vocab_size
    assert torch.equal(a, b)


def test_entropy_runs_on_the_exported_folder(exported, capsys) -> None:
    code, out, err = run_main(["entropy", "--checkpoint", str(exported["output"]), "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["layers"]) == 2


def test_existing_output_is_kept_without_force(exported, capsys) -> None:
    target = exported["root"] / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    args = ["export", "--checkpoint", str(exported["checkpoint"]), "--output", str(target)]
    code, _, err = run_main(args, capsys)
    assert code == 2
    assert err.startswith("error: ") and "--force" in err and "not empty" in err
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    code, out, err = run_main([*args, "--force"], capsys)
    assert code == 0, err
    assert "exported" in out
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".taken")]  # no staging left behind


def test_damaged_safetensors_is_one_error_line(exported, capsys) -> None:
    broken = exported["root"] / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((exported["output"] / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    code, _, err = run_main(["entropy", "--checkpoint", str(broken)], capsys)
    assert code == 2
    assert err.startswith("error: ") and "model.safetensors is not a readable safetensors file" in err
    assert len(err.strip().splitlines()) == 1
