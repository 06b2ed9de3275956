"""Tokenization with the layout every row of a batch shares: truncated and right-padded to a fixed length."""

from __future__ import annotations

import torch


def tokenize_right_padded(tokenizer, text: str, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize with the tokenizer's default special tokens; returns input_ids (L,) and attention_mask (L,) long.

    Padding side is passed per call, so a tokenizer left with padding_side='left' (e.g. for generation)
    cannot silently left-pad training rows.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if getattr(tokenizer, "truncation_side", "right") != "right":
        # MMC4 relies on truncation cutting the end: the surviving <image> tokens are then the first ones.
        raise ValueError(f"tokenizer truncation_side must be 'right', got {tokenizer.truncation_side!r}")
    encoded = tokenizer(
        text,
        max_length=max_tokens,
        truncation=True,
        padding="max_length",
        padding_side="right",
        return_tensors="pt",
    )
    input_ids = encoded["input_ids"][0].long()  # (L,)
    attention_mask = encoded["attention_mask"][0].long()  # (L,)
    if input_ids.shape[0] != max_tokens:
        raise ValueError(f"tokenizer returned {input_ids.shape[0]} tokens, expected max_tokens={max_tokens}")
    return input_ids, attention_mask
