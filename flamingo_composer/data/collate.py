"""Stack preprocessed samples into SPEC 2's batch schema, labels and supervised-token count included."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from flamingo_composer.data.masking import count_supervised_tokens, laion_labels, mmc4_labels
from flamingo_composer.data.text import SpecialTokens


def _stack(samples: Sequence[Mapping[str, torch.Tensor]], name: str, dataset: str) -> torch.Tensor:
    shapes = {tuple(sample[name].shape) for sample in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate_{dataset}: samples disagree on the shape of {name!r}: {sorted(shapes)}")
    return torch.stack([sample[name] for sample in samples])


def _collate(samples, special: SpecialTokens, dataset: str, make_labels: Callable, skipped) -> dict:
    if not samples:
        raise ValueError(f"collate_{dataset}: no samples to collate")
    input_ids = _stack(samples, "input_ids", dataset).long()  # (B, L)
    attention_mask = _stack(samples, "attention_mask", dataset).long()  # (B, L)
    vision_x = _stack(samples, "vision_x", dataset).float()  # (B, T_img, 1, 3, H, W)
    if "image_mask" in samples[0]:
        image_mask = _stack(samples, "image_mask", dataset).bool()  # (B, T_img)
    else:
        image_mask = torch.ones(vision_x.shape[:2], dtype=torch.bool)  # (B, T_img): LAION, one image each
    labels = make_labels(input_ids, special, attention_mask)  # (B, L)
    return {
        "vision_x": vision_x,
        "image_mask": image_mask,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "num_supervised_tokens": count_supervised_tokens(labels),  # 0-d long
        "skipped": dict(skipped or {}),
    }


def collate_laion(samples, special: SpecialTokens, skipped: Mapping[str, int] | None = None) -> dict:
    """LAION samples from `preprocess_laion` -> batch; `skipped` = skip counts since the previous batch."""
    return _collate(samples, special, "laion", laion_labels, skipped)


def collate_mmc4(samples, special: SpecialTokens, skipped: Mapping[str, int] | None = None) -> dict:
    """MMC4 samples from `preprocess_mmc4` -> batch; `skipped` = skip counts since the previous batch."""
    return _collate(samples, special, "mmc4", mmc4_labels, skipped)
