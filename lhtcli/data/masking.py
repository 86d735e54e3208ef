"""BERT-style MLM masking (DESIGN.md section 7)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

IGNORE_INDEX = -100  # label of positions that do not count in the loss (torch's cross-entropy default)


def ordinary_token_ids(vocab_size: int, special_ids: Iterable[int]) -> torch.Tensor:
    """Every id that a random replacement may use: the vocabulary minus the special tokens."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    specials = [i for i in special_ids if 0 <= i < vocab_size]
    keep[specials] = False
    ids = keep.nonzero().squeeze(1)
    if ids.numel() == 0:
        raise ValueError("the vocabulary has no ordinary (non-special) token")
    return ids


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    mlm_probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose MLM targets and corrupt them; returns ``(masked_input_ids, labels)``.

    Each maskable token (``special_mask`` False) is chosen with ``mlm_probability``; a chosen token
    becomes ``[MASK]`` (80%), a random ordinary token (10%) or stays (10%). ``labels`` holds the
    original id at chosen positions and ``-100`` elsewhere. All randomness comes from ``generator``.
    """
    if input_ids.shape != special_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and special_mask {tuple(special_mask.shape)} differ")
    # Draw on the generator's device (CPU in the data pipeline), then move: reproducible anywhere.
    draw_device = generator.device
    shape = input_ids.shape
    maskable = ~special_mask.to(draw_device, torch.bool)
    chosen = (torch.rand(shape, generator=generator, device=draw_device) < mlm_probability) & maskable
    if not chosen.any() and maskable.any():
        # A batch without a single target would give a NaN loss; one target costs nothing statistically.
        candidates = maskable.flatten().nonzero().squeeze(1)
        pick = torch.randint(len(candidates), (1,), generator=generator, device=draw_device)
        chosen.view(-1)[candidates[pick]] = True
    action = torch.rand(shape, generator=generator, device=draw_device)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    ordinary = ordinary_token_ids(vocab_size, special_ids).to(draw_device)
    random_ids = ordinary[torch.randint(len(ordinary), shape, generator=generator, device=draw_device)]

    original = input_ids.to(draw_device)
    labels = torch.where(chosen, original, torch.full_like(original, IGNORE_INDEX))
    masked = torch.where(to_mask, torch.full_like(original, mask_id), original)
    masked = torch.where(to_random, random_ids, masked)
    return masked.to(input_ids.device), labels.to(input_ids.device)
