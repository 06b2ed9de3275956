"""LAION-style image-text pairs (SPEC 2): the preprocessing settings, one raw pair -> one training row (or
SkipSample), and the processor the readers call in their workers.

A raw pair is a webdataset sample (`KEY.jpg|jpeg|png|webp` + `KEY.txt` bytes under their extensions) or an MDS row
(`mds.LAION_MDS_COLUMNS`). Its random choice (the flip) comes from a generator seeded by (dataset seed, stream
epoch, sample key), so a resumed run repeats it. The row's labels are computed here, once (the batcher stacks
them), and its image leaves the worker as uint8 (see `images`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flamingo_composer.data.images import SplitImageTransform, decode_image
from flamingo_composer.data.items import SkipSample, sample_rng
from flamingo_composer.data.masking import count_supervised_tokens, laion_labels
from flamingo_composer.data.text import clean_text, require_utf8, tokenize_right_padded
from flamingo_composer.special_tokens import ENDOFCHUNK_TOKEN, MEDIA_TOKEN, SpecialTokens

LAION_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")  # the first one present is the pair's image


@dataclass
class LaionPreprocessConfig:
    max_tokens: int = 32
    random_flip: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens: must be >= 2, got {self.max_tokens}")


def decode_caption(caption: str | bytes | None, *, key: str) -> str:
    """Caption bytes/str -> str; non-UTF-8 bytes raise SkipSample('bad_utf8')."""
    if caption is None:
        raise SkipSample("empty_caption", f"sample {key!r} has no caption")
    if isinstance(caption, bytes):
        try:
            return caption.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SkipSample("bad_utf8", f"caption of sample {key!r}: {err}") from None
    if not isinstance(caption, str):
        raise SkipSample("empty_caption", f"caption of sample {key!r} is a {type(caption).__name__}")
    return require_utf8(caption, where=f"caption of sample {key!r}")


def preprocess_laion(
    image_bytes: bytes | None,
    caption: str | bytes | None,
    *,
    key: str,
    tokenizer,
    image_transform,
    cfg: LaionPreprocessConfig,
    rng: np.random.Generator,
    special: SpecialTokens | None = None,
) -> dict[str, torch.Tensor]:
    """Text = "<image>" + caption.strip() + "<|endofchunk|>" + eos, right-padded/truncated to cfg.max_tokens.

    Returns images (1, 3, H, W) uint8 (`image_transform`'s PIL steps; a `SplitImageTransform` or a transform it
    can split), input_ids (L,), attention_mask (L,) and labels (L,). `special` may be passed to avoid looking the
    ids up per sample.
    """
    flip = bool(cfg.random_flip) and bool(rng.random() < 0.5)  # one coin per sample
    text = clean_text(decode_caption(caption, key=key), tokenizer).strip()
    if not text:
        raise SkipSample("empty_caption", f"sample {key!r} has an empty caption after cleaning")
    image = decode_image(image_bytes, where=f"image of sample {key!r}")

    special = special or SpecialTokens.from_tokenizer(tokenizer)
    input_ids, attention_mask = tokenize_right_padded(
        tokenizer, f"{MEDIA_TOKEN}{text}{ENDOFCHUNK_TOKEN}{tokenizer.eos_token}", cfg.max_tokens
    )  # (L,), (L,)
    labels = laion_labels(input_ids[None], special, attention_mask[None])[0]  # (L,)
    if count_supervised_tokens(labels[None]) == 0:
        raise SkipSample(
            "no_supervised_tokens", f"sample {key!r} keeps no caption token at max_tokens={cfg.max_tokens}"
        )
    pixels = SplitImageTransform.of(image_transform).to_uint8(image, flip)  # (3, H, W) uint8
    return {"images": pixels[None], "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LaionProcessor:
    """LAION pair (webdataset `jpg|jpeg|png|webp` + `txt`, or MDS `jpg` + `txt`) -> preprocess_laion's tensors."""

    def __init__(self, tokenizer, image_transform, cfg: LaionPreprocessConfig, seed: int):
        self.tokenizer, self.cfg, self.seed = tokenizer, cfg, seed
        self.image_transform = SplitImageTransform.of(image_transform)  # split once, not per sample
        self.special = SpecialTokens.from_tokenizer(tokenizer)

    def __call__(self, raw: Mapping[str, Any], *, epoch: int, key: Any) -> dict[str, torch.Tensor]:
        image = next((raw[name] for name in LAION_IMAGE_FIELDS if raw.get(name) is not None), None)
        return preprocess_laion(
            image,
            raw.get("txt"),
            key=str(key),
            tokenizer=self.tokenizer,
            image_transform=self.image_transform,
            cfg=self.cfg,
            rng=sample_rng(self.seed, epoch, key),
            special=self.special,
        )
