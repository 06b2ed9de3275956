"""Label masking (SPEC 2): which tokens each dataset's loss supervises. -100 = ignored (`IGNORE_INDEX`; the loss
contract, training/loss.py, defines it and the one function that counts supervised targets).

Vectorized over the whole (B, L) batch with cumulative sums/maxima instead of the reference's per-token loops.
"""

from __future__ import annotations

import torch

from flamingo_composer.special_tokens import SpecialTokens
from flamingo_composer.training.loss import IGNORE_INDEX, count_supervised_tokens

__all__ = ["IGNORE_INDEX", "count_supervised_tokens", "laion_labels", "mmc4_labels"]


def _mask_padding(labels: torch.Tensor, input_ids: torch.Tensor, special: SpecialTokens, attention_mask):
    """-100 wherever attention_mask is 0; without a mask, at the pad id (the reference's rule).

    With a mask the pad id itself is not masked: where a tokenizer's pad is its eos (Qwen base, Phi-3, SmolLM2),
    that would also drop the caption's final eos from the loss. Text never holds the pad token otherwise
    (`text.clean_text` removes it), so with a distinct pad both rules give the reference's labels.
    """
    if attention_mask is None:
        labels[input_ids == special.pad] = IGNORE_INDEX
        return
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    labels[attention_mask == 0] = IGNORE_INDEX


def _check_ids(input_ids: torch.Tensor) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")


def laion_labels(
    input_ids: torch.Tensor, special: SpecialTokens, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """LAION: -100 at padding and at `<image>`; caption, `<|endofchunk|>` and eos stay supervised."""
    _check_ids(input_ids)
    labels = input_ids.clone().long()  # (B, L)
    _mask_padding(labels, input_ids, special, attention_mask)
    labels[input_ids == special.media] = IGNORE_INDEX
    return labels


def mmc4_labels(
    input_ids: torch.Tensor, special: SpecialTokens, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MMC4, rules applied in SPEC 2's order (a)-(d).

    (a) padding; (b) everything before the first `<image>` (a row without one is all -100); (c) after each
    `<|endofchunk|>`, up to but not including the next `<image>` (the final eos and padding); (d) every
    `<image>`. `<|endofchunk|>` itself stays supervised.
    """
    _check_ids(input_ids)
    labels = input_ids.clone().long()  # (B, L)
    _mask_padding(labels, input_ids, special, attention_mask)  # (a)

    is_media = input_ids == special.media  # (B, L)
    is_eoc = input_ids == special.endofchunk  # (B, L)
    before_first_media = torch.cumsum(is_media.long(), dim=1) == 0  # (B, L)
    labels[before_first_media] = IGNORE_INDEX  # (b)

    # (c) position p is masked when the latest <|endofchunk|> strictly before p comes after the latest <image>
    # at or before p, i.e. no <image> has re-opened a chunk since that <|endofchunk|>.
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # (B, L)
    none = torch.full_like(positions, -1)
    last_media = torch.cummax(torch.where(is_media, positions, none), dim=1).values  # (B, L) inclusive
    last_eoc = torch.cummax(torch.where(is_eoc, positions, none), dim=1).values  # (B, L) inclusive
    last_eoc_before = torch.cat([none[:, :1], last_eoc[:, :-1]], dim=1)  # (B, L) strictly before p
    labels[last_eoc_before > last_media] = IGNORE_INDEX  # (c)

    labels[is_media] = IGNORE_INDEX  # (d)
    return labels

