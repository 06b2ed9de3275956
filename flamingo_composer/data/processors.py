"""Raw samples (webdataset or MDS layout) -> preprocessed tensors, with SPEC 2's seeded random choices.

Both readers hand a raw sample dict to one of these callables inside a DataLoader worker: a webdataset sample
(`KEY.jpg`/`KEY.txt` or `KEY.json` bytes under their extensions) or an MDS row (`mds_format` columns). The
random generator is seeded by (dataset seed, stream epoch, sample key), so a resumed run repeats every choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from flamingo_composer.data.laion import LaionPreprocessConfig, preprocess_laion
from flamingo_composer.data.mds_format import mmc4_doc_from_mds
from flamingo_composer.data.mmc4 import MMC4PreprocessConfig, preprocess_mmc4
from flamingo_composer.data.rng import sample_rng
from flamingo_composer.data.skips import SkipSample
from flamingo_composer.data.text import SpecialTokens

LAION_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


class LaionProcessor:
    """LAION pair (webdataset `jpg|jpeg|png` + `txt`, or MDS `jpg` + `txt`) -> preprocess_laion's tensors."""

    def __init__(self, tokenizer, image_transform, cfg: LaionPreprocessConfig, seed: int):
        self.tokenizer, self.image_transform, self.cfg, self.seed = tokenizer, image_transform, cfg, seed
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


class MMC4Processor:
    """MMC4 document (webdataset `json` bytes with base64 images, or MDS `doc` + `image_bytes`) -> tensors."""

    def __init__(self, tokenizer, image_transform, cfg: MMC4PreprocessConfig, seed: int):
        self.tokenizer, self.image_transform, self.cfg, self.seed = tokenizer, image_transform, cfg, seed
        self.special = SpecialTokens.from_tokenizer(tokenizer)

    def __call__(self, raw: Mapping[str, Any], *, epoch: int, key: Any) -> dict[str, torch.Tensor]:
        image_bytes = None
        if "doc" in raw:  # MDS layout: original image bytes stored next to the document
            doc, image_bytes = mmc4_doc_from_mds(raw)
        elif raw.get("json") is not None:
            doc = raw["json"]
        else:
            raise SkipSample("malformed_json", f"sample {key!r} has no .json member")
        return preprocess_mmc4(
            doc,
            key=str(key),
            tokenizer=self.tokenizer,
            image_transform=self.image_transform,
            cfg=self.cfg,
            rng=sample_rng(self.seed, epoch, key),
            image_bytes=image_bytes,
            special=self.special,
        )
