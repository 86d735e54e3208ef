"""A tiny synthetic corpus and config overrides shared by the training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the model reads long documents and every token attends to its neighbours while sentence starts "
    "see other sentences and section starts see other sections so the hierarchy carries information far"
).split()


def write_corpus(path: Path, documents: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(documents):
            sections = []
            for _ in range(rng.randint(2, 4)):
                sentences = []
                for _ in range(rng.randint(2, 5)):
                    start = rng.randrange(len(WORDS) - 8)
                    sentences.append(" ".join(WORDS[start : start + rng.randint(4, 8)]) + ".")
                sections.append(sentences)
            handle.write(json.dumps({"text": sections}) + "\n")
    return path


def tiny_overrides(corpus: Path, name: str = "tiny", **extra: object) -> list[str]:
    values = {
        "experiment_name": name,
        "device": "cpu",
        "model.d_model": 32, "model.n_heads": 2, "model.num_layers": 2, "model.d_ff": 64,
        "model.max_seq_len": 64, "model.dropout": 0.1,
        "model.mlswa.window_size_per_level": "[4, 2, 1]", "model.mlswa.layer_max_level": "[1, 2]",
        "training.batch_size": 4, "training.grad_accum_steps": 2, "training.num_steps": 20,
        "training.warmup_steps": 2, "training.lr_schedule": "linear", "training.learning_rate": 3e-3,
        "training.log_every": 1,
        "training.eval_every": 10, "training.save_every": 10, "training.eval_batches": 2,
        "training.log_viz_every": 0, "training.time_limit_minutes": "null",
        "data.path": str(corpus), "data.tokenizer_vocab_size": 120, "data.validation_fraction": 0.2,
        "logging.backend": "none",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
