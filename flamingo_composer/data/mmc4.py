"""MMC4-style interleaved documents (SPEC 2 steps 1-6 with its fixes): the preprocessing settings, one raw
document -> one training row (or SkipSample), and the processor the readers call in their workers.

A raw document is a webdataset sample (`KEY.json` bytes with base64 images) or an MDS row
(`mds.MMC4_MDS_COLUMNS`: the document and its original image bytes). Its random choices (flip, single-image
drop) come from a generator seeded by (dataset seed, stream epoch, sample key), so a resumed run repeats them.

Per-image problems (missing, too small, bad base64, undecodable) drop that image only, as the published MMC4
data is full of missing images; a kept document counts them as its dropped images (`with_dropped_images`). A
document left with no usable image is skipped. If every image failed for the same reason that reason is counted
(e.g. `bad_base64`), otherwise `no_usable_image`.

Images are decoded lazily: step 1 checks only what needs no decode (bytes present, valid base64, at least
`min_image_bytes`); matching, cutting and truncation (steps 2-5) then decide which images the row keeps, and only
those are decoded. A kept image that fails to decode is dropped and steps 2-5 run again without it, so every
image of the row decodes; an image the row does not keep is never decoded, even if it is corrupt (it still
takes part in the matching, as an image that looks valid). The row's labels are computed here, once, and its
images leave the worker as uint8 (see `images`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from flamingo_composer.data.images import SplitImageTransform, check_image_bytes, decode_base64, decode_image
from flamingo_composer.data.items import SkipSample, sample_rng, with_dropped_images
from flamingo_composer.data.masking import count_supervised_tokens, mmc4_labels
from flamingo_composer.data.mds import mmc4_doc_from_mds
from flamingo_composer.data.text import clean_text, require_utf8, tokenize_right_padded
from flamingo_composer.special_tokens import ENDOFCHUNK_TOKEN, MEDIA_TOKEN, SpecialTokens

# Tokens per row when `max_tokens` is not set: MMC4's matched documents are short; natural-order documents
# (~800 tokens, 2.5-4 images) need a longer window to hold a few images with their text.
DEFAULT_MAX_TOKENS = {"matched": 256, "natural": 1024}
# Keys only the matched layout uses; setting one with `layout: natural` is a config error, never silently ignored.
MATCHED_ONLY_KEYS = ("sim_threshold", "single_image_drop_prob")


@dataclass
class MMC4PreprocessConfig:
    """Interleaved documents: `layout` matched (MMC4: sentences, images and their similarity matrix; this module) or
    natural (OBELICS, MINT-1T-HTML, OmniCorpus-CC: text and images in page order; `data.documents`)."""

    layout: Literal["matched", "natural"] = "matched"
    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS[layout]
    sim_threshold: float = 0.24  # FIX: the reference's CLI default (30) rejects every pair
    min_num_images: int = 1
    max_num_images: int = 6
    single_image_drop_prob: float = 0.5
    min_image_bytes: int = 11000
    random_flip: bool = False

    def __post_init__(self) -> None:
        """Resolve `max_tokens` by layout; reject knob values that would silently drop every document, and keys
        the layout does not use."""
        if self.layout not in DEFAULT_MAX_TOKENS:
            raise ValueError(f"layout: must be one of {list(DEFAULT_MAX_TOKENS)}, got {self.layout!r}")
        if self.layout == "natural":
            defaults = {f.name: f.default for f in fields(MMC4PreprocessConfig)}
            for key in MATCHED_ONLY_KEYS:
                if getattr(self, key) != defaults[key]:
                    raise ValueError(
                        f"{key}: applies to layout 'matched' only (MMC4's image-sentence matching), but this "
                        "dataset reads layout 'natural', whose images stay where the page put them; remove it"
                    )
        if self.max_tokens is None:
            self.max_tokens = DEFAULT_MAX_TOKENS[self.layout]
        if self.max_tokens < 2:
            raise ValueError(f"mmc4.max_tokens must be >= 2, got {self.max_tokens}")
        if self.max_num_images < 1 or not 0 <= self.min_num_images <= self.max_num_images:
            raise ValueError(
                "mmc4: need max_num_images >= 1 and 0 <= min_num_images <= max_num_images, got "
                f"min_num_images={self.min_num_images}, max_num_images={self.max_num_images}"
            )
        if not 0.0 <= self.single_image_drop_prob <= 1.0:
            raise ValueError(
                f"mmc4.single_image_drop_prob must be in [0, 1], got {self.single_image_drop_prob}"
            )
        if self.min_image_bytes < 0:
            raise ValueError(f"mmc4.min_image_bytes must be >= 0, got {self.min_image_bytes}")


def parse_mmc4_json(raw: str | bytes, *, key: str) -> dict:
    """`KEY.json` payload -> document dict; bad UTF-8 / JSON raise SkipSample."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SkipSample("bad_utf8", f"document {key!r}: {err}") from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as err:
        raise SkipSample("malformed_json", f"document {key!r}: {err}") from None
    if not isinstance(doc, dict):
        raise SkipSample("malformed_json", f"document {key!r} is a JSON {type(doc).__name__}, not an object")
    return doc


def _validated_fields(doc: Any, key: str) -> tuple[list[str], list[dict], np.ndarray]:
    """text_list, image_info and similarity_matrix (images x sentences), each checked with the field named."""
    if not isinstance(doc, dict):
        raise SkipSample("malformed_json", f"document {key!r} is a {type(doc).__name__}, not a dict")
    for field in ("text_list", "image_info", "similarity_matrix"):
        if field not in doc:
            raise SkipSample("malformed_json", f"document {key!r} has no field {field!r}")
    sentences, image_info = doc["text_list"], doc["image_info"]
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise SkipSample("malformed_json", f"document {key!r}: field 'text_list' must be a list of strings")
    for i, sentence in enumerate(sentences):
        require_utf8(sentence, where=f"document {key!r} text_list[{i}]")
    if not isinstance(image_info, list) or not all(isinstance(info, dict) for info in image_info):
        raise SkipSample("malformed_json", f"document {key!r}: field 'image_info' must be a list of objects")
    if not image_info:
        raise SkipSample("no_usable_image", f"document {key!r} has an empty 'image_info'")
    expected = (len(image_info), len(sentences))
    try:
        sim = np.asarray(doc["similarity_matrix"], dtype=np.float64)
    except (TypeError, ValueError):
        raise SkipSample(
            "bad_similarity_matrix",
            f"document {key!r}: 'similarity_matrix' is not a numeric images x sentences matrix",
        ) from None
    if sim.shape != expected:
        raise SkipSample(
            "bad_similarity_matrix",
            f"document {key!r}: 'similarity_matrix' has shape {sim.shape}, expected (images, sentences) = {expected}",
        )
    if not np.isfinite(sim).all():
        raise SkipSample("bad_similarity_matrix", f"document {key!r}: 'similarity_matrix' holds NaN or inf")
    return sentences, image_info, sim


def _image_candidates(image_info: list[dict], image_bytes: list[bytes | None] | None, cfg, key: str):
    """Step 1 without decoding: ({image index: bytes} of the images that pass the byte checks, the failures)."""
    if image_bytes is not None and len(image_bytes) != len(image_info):
        raise SkipSample(
            "malformed_json",
            f"document {key!r}: {len(image_bytes)} image byte strings for {len(image_info)} image_info entries",
        )
    candidates, failures = {}, []
    for i, info in enumerate(image_info):
        where = f"document {key!r} image_info[{i}]"
        try:
            if image_bytes is None:
                raw = decode_base64(info.get("image_base64"), where=f"{where}.image_base64")
            else:
                raw = image_bytes[i]
            candidates[i] = check_image_bytes(raw, min_bytes=cfg.min_image_bytes, where=where)
        except SkipSample as skip:
            failures.append(skip)
    return candidates, failures


def no_usable_image(failures: list[SkipSample], key: str) -> SkipSample:
    """Every image failed: the common reason if there is one, else `no_usable_image`."""
    reasons = {skip.reason for skip in failures}
    reason = reasons.pop() if len(reasons) == 1 else "no_usable_image"
    return SkipSample(reason, f"document {key!r} has no usable image ({'; '.join(map(str, failures))})")


def _assign_images(sim: np.ndarray, threshold: float, max_num_images: int) -> list[tuple[int, int]]:
    """Steps 2-3: one-to-one assignment on -sim, pairs below threshold dropped, ordered by sentence, cut.

    sim is (valid images, sentences); returns (row in sim, sentence index) pairs.
    """
    rows, cols = linear_sum_assignment(-sim)
    pairs = [(int(r), int(c)) for r, c in zip(rows, cols) if sim[r, c] >= threshold]
    pairs.sort(key=lambda pair: pair[1])  # FIX: k-th <image> token <-> k-th image tensor
    return pairs[:max_num_images]


def format_interleaved_text(sentences: list[str], image_sentences: list[int], eos_token: str) -> str:
    """Step 4: `<|endofchunk|><image>` before each image's sentence, joined, first `<|endofchunk|>` dropped,
    spaces around `<image>` and before `<|endofchunk|>` removed, `<|endofchunk|>` + eos appended."""
    sentences = list(sentences)
    for index in image_sentences:
        sentences[index] = f"{ENDOFCHUNK_TOKEN}{MEDIA_TOKEN}{sentences[index]}"
    text = " ".join(sentences).replace(ENDOFCHUNK_TOKEN, "", 1)
    text = (
        text.replace(f" {ENDOFCHUNK_TOKEN}", ENDOFCHUNK_TOKEN)
        .replace(f"{MEDIA_TOKEN} ", MEDIA_TOKEN)
        .replace(f" {MEDIA_TOKEN}", MEDIA_TOKEN)
    )
    return f"{text}{ENDOFCHUNK_TOKEN}{eos_token}"


def _row_of(
    candidates: list[int], sentences: list[str], sim: np.ndarray, *, tokenizer, cfg, special, drop_coin, key: str
) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2-5 over the candidate images: (kept image indices in token order, input_ids (L,), attention_mask
    (L,), labels (L,)), or SkipSample."""
    pairs = _assign_images(sim[candidates], cfg.sim_threshold, cfg.max_num_images)
    if not pairs:
        raise SkipSample(
            "low_similarity", f"document {key!r}: no image-sentence similarity reaches {cfg.sim_threshold}"
        )
    text = format_interleaved_text(sentences, [sentence for _, sentence in pairs], tokenizer.eos_token)
    input_ids, attention_mask = tokenize_right_padded(tokenizer, text, cfg.max_tokens)  # (L,), (L,)

    # Step 5: rejection after truncation.
    num_image_tokens = int((input_ids == special.media).sum())
    if num_image_tokens < cfg.min_num_images:
        raise SkipSample(
            "too_few_images",
            f"document {key!r}: {num_image_tokens} <image> tokens survive truncation to {cfg.max_tokens} "
            f"(min_num_images={cfg.min_num_images})",
        )
    if num_image_tokens == 1:
        if drop_coin < cfg.single_image_drop_prob:
            raise SkipSample("single_image_dropped", f"document {key!r} keeps a single image")
        if input_ids[-1] == special.media:
            raise SkipSample("no_supervised_tokens", f"document {key!r}: its only <image> is the last token")
    labels = mmc4_labels(input_ids[None], special, attention_mask[None])[0]  # (L,)
    if count_supervised_tokens(labels[None]) == 0:
        raise SkipSample("no_supervised_tokens", f"document {key!r} keeps no supervised token")
    kept = [candidates[row] for row, _ in pairs[:num_image_tokens]]  # the surviving <image> tokens' images
    return kept, input_ids, attention_mask, labels


def preprocess_mmc4(
    doc: dict | str | bytes,
    *,
    key: str,
    tokenizer,
    image_transform,
    cfg: MMC4PreprocessConfig,
    rng: np.random.Generator,
    image_bytes: list[bytes | None] | None = None,
    special: SpecialTokens | None = None,
    dropped_images: list[SkipSample] | None = None,
) -> dict[str, torch.Tensor]:
    """One document -> images (n, 3, H, W) uint8 of its n kept images in token order, image_mask (T,) bool (the
    first n slots), input_ids (L,), attention_mask (L,), labels (L,).

    T = cfg.max_num_images. Images come from `image_info[i]['image_base64']` (webdataset layout) or, when given,
    from `image_bytes` (MDS layout: original bytes, None for a missing image). `image_transform`: a
    `SplitImageTransform` or a transform it can split. `dropped_images` receives the SkipSample of each image that
    failed (missing, too small, undecodable), when the row is kept.
    """
    # Both coins drawn up front, so each decision depends only on (seed, epoch, key), not on the code path.
    flip_coin, drop_coin = rng.random(), rng.random()
    if isinstance(doc, str | bytes):
        doc = parse_mmc4_json(doc, key=key)
    sentences, image_info, sim = _validated_fields(doc, key)
    candidates, failures = _image_candidates(image_info, image_bytes, cfg, key)  # step 1, no decode
    special = special or SpecialTokens.from_tokenizer(tokenizer)
    sentences = [clean_text(sentence, tokenizer) for sentence in sentences]

    decoded = {}  # image index -> RGB image, for the kept images only
    while True:
        if not candidates:
            raise no_usable_image(failures, key)
        kept, input_ids, attention_mask, labels = _row_of(
            sorted(candidates), sentences, sim, tokenizer=tokenizer, cfg=cfg, special=special,
            drop_coin=drop_coin, key=key,
        )  # fmt: skip
        broken = []
        for i in (i for i in kept if i not in decoded):
            try:
                decoded[i] = decode_image(candidates[i], where=f"document {key!r} image_info[{i}]")
            except SkipSample as skip:
                failures.append(skip)
                broken.append(i)
        if not broken:
            break
        for i in broken:  # match again without them
            del candidates[i]

    # Step 6: the kept images in token order, uint8; the model's zero slots are made on the device.
    flip = bool(cfg.random_flip) and bool(flip_coin < 0.5)  # one coin for all images of the document
    split = SplitImageTransform.of(image_transform)
    images = torch.stack([split.to_uint8(decoded[i], flip) for i in kept])  # (n, 3, H, W) uint8
    image_mask = torch.arange(cfg.max_num_images) < len(kept)  # (T,)
    if dropped_images is not None:
        dropped_images.extend(failures)
    return {
        "images": images,
        "image_mask": image_mask,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }


class MMC4Processor:
    """MMC4 document (webdataset `json` bytes with base64 images, or MDS `doc` + `image_bytes`) -> tensors."""

    def __init__(self, tokenizer, image_transform, cfg: MMC4PreprocessConfig, seed: int):
        self.tokenizer, self.cfg, self.seed = tokenizer, cfg, seed
        self.image_transform = SplitImageTransform.of(image_transform)  # split once, not per sample
        self.special = SpecialTokens.from_tokenizer(tokenizer)

    def __call__(self, raw: Mapping[str, Any], *, epoch: int, key: Any) -> dict[str, torch.Tensor]:
        image_bytes = None
        if "doc" in raw:  # MDS layout: original image bytes stored next to the document
            doc, image_bytes = mmc4_doc_from_mds(raw)
        elif raw.get("json") is not None:
            doc = raw["json"]
        else:
            raise SkipSample("malformed_json", f"sample {key!r} has no .json member")
        dropped: list[SkipSample] = []
        sample = preprocess_mmc4(
            doc,
            key=str(key),
            tokenizer=self.tokenizer,
            image_transform=self.image_transform,
            cfg=self.cfg,
            rng=sample_rng(self.seed, epoch, key),
            image_bytes=image_bytes,
            special=self.special,
            dropped_images=dropped,
        )
        return with_dropped_images(sample, dropped)
