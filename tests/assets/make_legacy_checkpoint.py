"""Write the tiny checkpoint and expected outputs that tests/test_legacy_checkpoint.py loads.

Run once, from the repository root, on the code whose checkpoints must keep loading:

    python tests/assets/make_legacy_checkpoint.py

The committed files were written by lhtcli at main 9580018 (before the model was split into a reference
model and lhtcli/fused/), with the native kernel built, so that the training-mode numbers are those of
its fused CPU paths. Re-running it on newer code overwrites that evidence: don't, unless the checkpoint
format changes on purpose.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from lhtcli.config import LHTConfig
from lhtcli.core import native
from lhtcli.core.positions import HierarchicalPositions, positions_from_lengths
from lhtcli.data.tokenizer import LHTTokenizer
from lhtcli.model import LHTEncoder
from lhtcli.training.checkpoint import Checkpoint, save_checkpoint

HERE = Path(__file__).resolve().parent
DOCS = [[["the model reads long documents.", "every token attends to its neighbours."],
         ["sentence starts see other sentences.", "section starts see other sections."]]]
LENGTHS = [[[4, 3], [5, 2, 6]], [[3, 3, 3], [7]]]  # two documents, padded to one batch


def model_config(rope: bool, vocab: int) -> dict:
    return dict(vocab_size=vocab, d_model=16, n_heads=2, num_layers=2, d_ff=32, dropout=0.1, max_seq_len=32,
                rope=rope, mlswa=dict(num_levels=2, window_size_per_level=[3, 1], layer_max_level=[0, 1]))


def batch(vocab: int):
    positions = HierarchicalPositions.batch([positions_from_lengths(d) for d in LENGTHS])
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (positions.batch_size, positions.seq_len), generator=gen)
    ids = ids * positions.real_mask
    labels = torch.where((torch.rand(ids.shape, generator=gen) < 0.3) & positions.real_mask, ids, -100)
    labels[:, 1] = ids[:, 1]  # at least one label per row
    return ids, positions, labels


def main() -> None:
    assert native.band_kernel() is not None, "build the native kernel first: the training numbers need it"
    tokenizer = LHTTokenizer.train(DOCS * 2, 60)
    vocab = tokenizer.vocab_size
    cfg = LHTConfig(experiment_name="legacy", device="cpu", model=model_config(True, vocab))
    torch.manual_seed(0)
    model = LHTEncoder(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Checkpoint(step=3, config=cfg, model_state=model.state_dict(),
                                          tokenizer_json=tokenizer.to_json_str()), Path(tmp))
        shutil.copyfile(path, HERE / "legacy_checkpoint-3.ckpt")

    ids, positions, labels = batch(vocab)
    expected = {"ids": ids, "labels": labels}
    with torch.no_grad():
        out = model.eval()(ids, positions, labels=labels)
    expected |= {"eval_hidden": out.hidden, "eval_logits": out.mlm_logits, "eval_loss": out.loss}
    model.train()
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = model(ids, positions, labels=labels, return_logits=return_logits).loss
        loss.backward()
        expected[f"train_loss_{return_logits}"] = loss.detach()
        expected[f"train_grads_{return_logits}"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.save(expected, HERE / "legacy_expected.pt")
    keys = {f"rope={rope}": list(LHTEncoder(LHTConfig(model=model_config(rope, vocab)).model).state_dict())
            for rope in (True, False)}
    (HERE / "legacy_state_dict_keys.json").write_text(json.dumps(keys, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
