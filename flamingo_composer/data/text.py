"""Raw text -> one token row: cleaning (only the pipeline places special tokens) and tokenization with the layout
every row of a batch shares (truncated and right-padded to a fixed length).

A caption that literally contains "<image>" would otherwise add an image token with no image behind it, and shift
every later image to the wrong text.
"""

from __future__ import annotations

import torch

from flamingo_composer.data.items import SkipSample
from flamingo_composer.special_tokens import ENDOFCHUNK_TOKEN, MEDIA_TOKEN


def clean_text(text: str, tokenizer) -> str:
    """Remove literal `<image>`, `<|endofchunk|>` and pad-token strings from raw text."""
    for literal in (MEDIA_TOKEN, ENDOFCHUNK_TOKEN, getattr(tokenizer, "pad_token", None)):
        if literal:
            text = text.replace(literal, "")
    return text


def require_utf8(text: str, *, where: str) -> str:
    """Reject strings that cannot be encoded as UTF-8 (lone surrogates from broken JSON escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SkipSample("bad_utf8", f"{where}: {err}") from None
    return text


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
