"""MLM prediction rows: what the model guesses at masked positions (DESIGN.md section 5)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PREDICTION_COLUMNS = ["Sample", "Position", "Original", "Masked", "Top-5 Predictions", "Correct"]
CORRECT, WRONG = "✓", "✗"


def token_namer(tokenizer: Any) -> Callable[[int], str]:
    """``id -> text`` from a tokenizer with ``id_to_token`` (method or mapping); ids as text without one."""
    if tokenizer is None:
        return str
    lookup = getattr(tokenizer, "id_to_token", tokenizer)
    if callable(lookup):

        def name(token_id: int) -> str:
            token = lookup(int(token_id))
            return str(token) if token is not None else f"<{token_id}>"

        return name
    return lambda token_id: str(lookup.get(int(token_id), f"<{token_id}>"))


@dataclass
class Prediction:
    sample: int
    position: int
    original: str
    masked: str
    top: list[tuple[str, float]]  # (token, probability) best first
    correct: bool

    def row(self) -> list[str]:
        top = ", ".join(f"{tok} ({100 * p:.1f}%)" for tok, p in self.top)
        return [
            str(self.sample),
            str(self.position),
            self.original,
            self.masked,
            top,
            CORRECT if self.correct else WRONG,
        ]


def mlm_predictions(
    logits: torch.Tensor,
    labels: torch.Tensor,
    input_ids: torch.Tensor,
    tokenizer: Any = None,
    *,
    per_sample: int = 10,
    max_samples: int | None = None,
    top_k: int = 5,
) -> list[Prediction]:
    """Up to ``per_sample`` masked positions (labels != -100) per sample, in position order.

    ``logits`` [B, N, V], ``labels`` and ``input_ids`` [B, N]. ``Correct`` means the top-1 guess is
    the original token.
    """
    name = token_namer(tokenizer)
    results = []
    batch = logits.shape[0] if max_samples is None else min(logits.shape[0], max_samples)
    for b in range(batch):
        where = torch.nonzero(labels[b] != -100).flatten()[:per_sample]
        if where.numel() == 0:
            continue
        probs = torch.softmax(logits[b, where].float(), dim=-1)
        top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        for j, pos in enumerate(where.tolist()):
            original = int(labels[b, pos])
            guesses = [(name(int(i)), float(p)) for p, i in zip(top_p[j], top_i[j], strict=True)]
            results.append(
                Prediction(
                    b,
                    pos,
                    name(original),
                    name(int(input_ids[b, pos])),
                    guesses,
                    int(top_i[j, 0]) == original,
                )
            )
    return results


def prediction_rows(predictions: list[Prediction]) -> list[list[str]]:
    return [p.row() for p in predictions]


def prediction_accuracy(predictions: list[Prediction]) -> float | None:
    return sum(p.correct for p in predictions) / len(predictions) if predictions else None


__all__ = [
    "PREDICTION_COLUMNS",
    "Prediction",
    "mlm_predictions",
    "prediction_accuracy",
    "prediction_rows",
    "token_namer",
]
