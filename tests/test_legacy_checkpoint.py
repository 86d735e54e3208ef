"""A checkpoint written before the model was split into a reference model (lhtcli/model.py) and fused fast
paths (lhtcli/fused/) loads into both, with the outputs that code gave. The assets come from
tests/assets/make_legacy_checkpoint.py, run at main 9580018."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lhtcli.config import ModelConfig
from lhtcli.diagnostics.loading import load_model
from lhtcli.model import LHTEncoder
from tests.assets.make_legacy_checkpoint import batch, model_config

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(ASSETS / "legacy_expected.pt", weights_only=True)


def _legacy(fused: bool):
    loaded = load_model(ASSETS / "legacy_checkpoint-3.ckpt", None, device="cpu")
    loaded.model.fused = fused
    ids, positions, labels = batch(loaded.model.cfg.vocab_size)
    return loaded.model, ids, positions, labels


def test_state_dict_keys_are_those_of_the_old_model():
    saved = json.loads((ASSETS / "legacy_state_dict_keys.json").read_text(encoding="utf-8"))
    for rope in (True, False):
        model = LHTEncoder(ModelConfig(**model_config(rope, vocab=60)))
        assert list(model.state_dict()) == saved[f"rope={rope}"]


@pytest.mark.parametrize("fused", [True, False])
def test_an_old_checkpoint_gives_its_old_outputs(expected, fused):
    model, ids, positions, labels = _legacy(fused)
    assert torch.equal(ids, expected["ids"]) and torch.equal(labels, expected["labels"])
    with torch.no_grad():
        out = model(ids, positions, labels=labels)
    torch.testing.assert_close(out.hidden, expected["eval_hidden"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mlm_logits, expected["eval_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected["eval_loss"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("return_logits", [True, False])
def test_the_fused_training_step_draws_the_old_masks_and_gives_the_old_gradients(expected, kernel, return_logits):
    """Same seed, same Philox dropout masks, same numbers as the code before the split."""
    model, ids, positions, labels = _legacy(fused=True)
    model.train()
    torch.manual_seed(1)
    loss = model(ids, positions, labels=labels, return_logits=return_logits).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected[f"train_loss_{return_logits}"], atol=1e-6, rtol=1e-6)
    want = expected[f"train_grads_{return_logits}"]
    assert [n for n, _ in model.named_parameters()] == list(want)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, want[name], atol=1e-6, rtol=1e-5, msg=name)
