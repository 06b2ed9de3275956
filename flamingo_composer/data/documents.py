"""Natural-order interleaved documents (OBELICS, MINT-1T-HTML, OmniCorpus-CC): the stored layout, and the processor
that cuts one training window out of a whole document (the interleaved kind's `layout: natural`).

Stored layout: one document per sample, whole, in page order. `document` = {'texts': [...], 'images': [...],
'metadata': ...}: two equal-length lists with exactly one non-null item per position (a text string, or an image
entry {'image_bytes_range': [start, end), 'url', 'metadata'}); the images' original bytes are concatenated in
`image_bytes`. MDS rows hold it in `mds.DOCUMENT_MDS_COLUMNS`; a webdataset sample holds `KEY.document.json` and
`KEY.image_bytes`. The converters write it (shards/interleaved_parquet.py).

Training window (per sample, seeded by (seed, epoch, key) through `sample_rng`, so a resumed run cuts the same one;
the three draws are made up front, so a decision never depends on the code path):
1. the document is split on `END_OF_DOCUMENT_TOKEN_TO_BE_REPLACED` (OBELICS concatenates pages) and one of the
   sub-documents that hold a usable image is chosen;
2. images that fail the byte checks (missing, fewer than `min_image_bytes`) are dropped, their text kept; a
   sub-document with three or more images in a row, or ending in two or more, is skipped;
3. the text is formatted as the reference formats MMC4 (`<|endofchunk|><image>` before each image, the first
   `<|endofchunk|>` dropped, `<|endofchunk|>` + eos at the end) and tokenized whole;
4. the window start is drawn uniformly among the starts whose `max_tokens` window holds an `<image>` followed by
   at least one token: labels before the first `<image>` are masked, so a window inside a long preface would
   train nothing;
5. images past `max_num_images` in the window lose their `<|endofchunk|><image>` tokens and keep their text;
6. only the kept images are decoded; one that fails is dropped (its text kept) and steps 2-6 run again.
The sample has MMC4's tensors (images uint8 (n, 3, H, W), image_mask, input_ids, attention_mask, labels), so the
readers, the batcher and the collate serve both layouts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flamingo_composer.data.images import SplitImageTransform, check_image_bytes, decode_image
from flamingo_composer.data.items import SkipSample, sample_rng, with_dropped_images
from flamingo_composer.data.masking import count_supervised_tokens, mmc4_labels
from flamingo_composer.data.mds import BYTES_RANGE_FIELD, bytes_in_ranges
from flamingo_composer.data.mmc4 import MMC4PreprocessConfig, format_interleaved_text, no_usable_image
from flamingo_composer.data.text import clean_text, require_utf8
from flamingo_composer.special_tokens import MEDIA_TOKEN, SpecialTokens

END_OF_DOCUMENT = "END_OF_DOCUMENT_TOKEN_TO_BE_REPLACED"  # OBELICS: where one web page ends and the next begins
WDS_DOCUMENT = "document.json"  # webdataset members of one sample: KEY.document.json + KEY.image_bytes
WDS_IMAGE_BYTES = "image_bytes"
MAX_CONSECUTIVE_IMAGES = 2  # three or more images in a row: skipped
MAX_TRAILING_IMAGES = 1  # two or more images after the last text: skipped


# ---------------------------------------------------------------------------------------------------------------
# The stored layout.


@dataclass(frozen=True)
class StoredImage:
    """One image of a document as the converters store it: original bytes, where it came from, its metadata."""

    data: bytes
    url: str | None = None
    metadata: Any = None


def pack_document(
    key: str, texts: list[str | None], images: list[StoredImage | None], metadata: Any = None
) -> dict[str, Any]:
    """One document -> an MDS row in `DOCUMENT_MDS_COLUMNS` (positions checked: SkipSample('misaligned_lists'))."""
    check_positions(texts, images, key=key)
    blob, entries = bytearray(), []
    for image in images:
        if image is None:
            entries.append(None)
            continue
        entries.append(
            {BYTES_RANGE_FIELD: [len(blob), len(blob) + len(image.data)], "url": image.url, "metadata": image.metadata}
        )
        blob.extend(image.data)
    document = {"texts": list(texts), "images": entries, "metadata": metadata}
    return {"key": str(key), "document": document, "image_bytes": bytes(blob)}


def wds_sample(row: Mapping[str, Any]) -> dict[str, Any]:
    """An MDS row of `pack_document` -> the same document as a webdataset sample (members by extension)."""
    return {
        "__key__": row["key"],
        WDS_DOCUMENT: json.dumps(row["document"]).encode("utf-8"),
        WDS_IMAGE_BYTES: row["image_bytes"],
    }


def unpack_document(raw: Mapping[str, Any], key: str) -> tuple[list, list, list[bytes | None]]:
    """An MDS row or webdataset sample -> (texts, image entries, image bytes per position: None where no image or no
    bytes). Anything unreadable raises SkipSample naming the field."""
    if "document" in raw:  # MDS
        document = raw["document"]
    elif raw.get(WDS_DOCUMENT) is not None:  # webdataset
        try:
            document = json.loads(raw[WDS_DOCUMENT])
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise SkipSample("malformed_json", f"document {key!r}: {WDS_DOCUMENT}: {err}") from None
    else:
        hint = " (an MMC4 matched-layout sample: set layout: matched)" if "doc" in raw or "json" in raw else ""
        raise SkipSample("malformed_json", f"sample {key!r} has no natural-order document{hint}")
    if not isinstance(document, dict) or not {"texts", "images"} <= set(document):
        raise SkipSample("malformed_json", f"document {key!r} lacks its 'texts' and 'images' lists")
    texts, images = document["texts"], document["images"]
    check_positions(texts, images, key=key)
    blob = raw.get("image_bytes", raw.get(WDS_IMAGE_BYTES)) or b""
    if not isinstance(blob, bytes | bytearray):
        raise SkipSample("malformed_json", f"document {key!r}: image_bytes is a {type(blob).__name__}, not bytes")
    return texts, images, bytes_in_ranges(images, blob, where=f"document {key!r}: images")


def check_positions(texts: Any, images: Any, *, key: str) -> None:
    """Equal-length `texts` and `images` lists, exactly one non-null item per position, texts strings (UTF-8);
    else SkipSample('misaligned_lists'), or 'bad_utf8'."""
    if not isinstance(texts, list) or not isinstance(images, list):
        raise SkipSample("misaligned_lists", f"document {key!r}: 'texts' and 'images' must be lists")
    if len(texts) != len(images):
        raise SkipSample(
            "misaligned_lists", f"document {key!r}: {len(texts)} texts for {len(images)} images (positions differ)"
        )
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            both = "both a text and an image" if text is not None else "neither a text nor an image"
            raise SkipSample("misaligned_lists", f"document {key!r}: position {i} holds {both}")
        if text is not None:
            if not isinstance(text, str):
                raise SkipSample("misaligned_lists", f"document {key!r}: texts[{i}] is a {type(text).__name__}")
            require_utf8(text, where=f"document {key!r} texts[{i}]")


# ---------------------------------------------------------------------------------------------------------------
# Documents -> segments.

Segment = tuple[str, Any]  # ('text', str) or ('image', position of the image in the document)


def sub_documents(texts: list[str | None], tokenizer) -> list[list[Segment]]:
    """The document's segments in page order, split at every `END_OF_DOCUMENT` marker; texts cleaned (no literal
    special tokens), blank texts left out."""
    docs: list[list[Segment]] = [[]]
    for position, text in enumerate(texts):
        if text is None:
            docs[-1].append(("image", position))
            continue
        for i, piece in enumerate(clean_text(text, tokenizer).split(END_OF_DOCUMENT)):
            if i > 0:
                docs.append([])
            if piece.strip():
                docs[-1].append(("text", piece.strip()))
    return [doc for doc in docs if doc]


def check_structure(segments: list[Segment], key: str) -> None:
    """Three or more images in a row, or two or more at the end: SkipSample (their chunks hold no text to learn)."""
    run = 0
    for kind, _ in segments:
        run = run + 1 if kind == "image" else 0
        if run > MAX_CONSECUTIVE_IMAGES:
            raise SkipSample("consecutive_images", f"document {key!r} has {run} images in a row")
    if run > MAX_TRAILING_IMAGES:
        raise SkipSample("trailing_images", f"document {key!r} ends in {run} images")


def formatted_text(segments: list[Segment], eos_token: str) -> tuple[str, list[int]]:
    """The reference's interleaved format of the segments (`format_interleaved_text`) and the image positions in
    `<image>` token order."""
    sentences, image_sentences, images = [], [], []
    for kind, value in segments:
        if kind == "image":
            image_sentences.append(len(sentences))
            sentences.append("")  # the image's chunk: the text that follows it, if any
            images.append(value)
        elif sentences and image_sentences and image_sentences[-1] == len(sentences) - 1 and not sentences[-1]:
            sentences[-1] = value  # the text right after an image
        else:
            sentences.append(value)
    return format_interleaved_text(sentences, image_sentences, eos_token), images


# ---------------------------------------------------------------------------------------------------------------
# The window.


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text by default (bos, ...), found around one `<image>`."""
    bare = tokenizer(MEDIA_TOKEN, add_special_tokens=False)["input_ids"]
    full = tokenizer(MEDIA_TOKEN)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    raise ValueError(f"tokenizer {type(tokenizer).__name__}: cannot find the text inside its special tokens")


def window_start(media_positions: np.ndarray, num_tokens: int, budget: int, draw: float) -> int:
    """A start drawn uniformly (by `draw` in [0, 1)) among those whose `budget`-token window holds an `<image>`
    with at least one token after it; 0 when the whole text fits."""
    if num_tokens <= budget:
        return 0
    last = num_tokens - budget  # the last start that still fills the window
    lows = np.clip(media_positions - budget + 2, 0, last)  # (M,)
    highs = np.minimum(media_positions, last)  # (M,) inclusive
    spans: list[list[int]] = []
    for low, high in zip(lows.tolist(), highs.tolist()):
        if high < low:
            continue
        if spans and low <= spans[-1][1] + 1:
            spans[-1][1] = max(spans[-1][1], high)
        else:
            spans.append([low, high])
    if not spans:  # only an image at the very end; never happens with the trailing <|endofchunk|> + eos
        return last
    offset = int(draw * sum(high - low + 1 for low, high in spans))
    for low, high in spans:
        if offset <= high - low:
            return low + offset
        offset -= high - low + 1
    return spans[-1][1]


def cut_window(ids: np.ndarray, start: int, budget: int, special: SpecialTokens, max_images: int) -> np.ndarray:
    """Positions (into `ids`) of the window's tokens: from `start`, images past `max_images` lose their
    `<image>` and the `<|endofchunk|>` before it (their text stays), at most `budget` tokens."""
    tail = ids[start:]  # (n - start,)
    is_media = tail == special.media
    over = is_media & (np.cumsum(is_media) > max_images)
    drop = over.copy()
    drop[:-1] |= over[1:] & (tail[:-1] == special.endofchunk)
    return np.flatnonzero(~drop)[:budget] + start  # (<= budget,)


# ---------------------------------------------------------------------------------------------------------------
# One document -> one training row.


def preprocess_document(
    texts: list[str | None],
    image_bytes: list[bytes | None],
    *,
    key: str,
    tokenizer,
    image_transform,
    cfg: MMC4PreprocessConfig,
    rng: np.random.Generator,
    special: SpecialTokens | None = None,
    affixes: tuple[list[int], list[int]] | None = None,
    dropped_images: list[SkipSample] | None = None,
) -> dict[str, torch.Tensor]:
    """One natural-order document -> images (n, 3, H, W) uint8 in `<image>` order, image_mask (T,), input_ids (L,),
    attention_mask (L,), labels (L,); T = cfg.max_num_images, L = cfg.max_tokens. `image_bytes[i]` is position
    i's image (None for a text). `dropped_images` receives the SkipSample of each image that failed, when the row is
    kept."""
    document_draw, start_draw, flip_draw = rng.random(), rng.random(), rng.random()
    special = special or SpecialTokens.from_tokenizer(tokenizer)
    prefix, suffix = affixes or special_affixes(tokenizer)
    budget = cfg.max_tokens - len(prefix) - len(suffix)
    if budget < 2:
        raise ValueError(f"max_tokens {cfg.max_tokens} leaves no room beside the tokenizer's special tokens")

    usable, failures = {}, []  # position -> bytes of the images that pass the byte checks; the failures
    for position, data in enumerate(image_bytes):
        if texts[position] is not None:
            continue
        try:
            usable[position] = check_image_bytes(data, min_bytes=cfg.min_image_bytes, where=f"document {key!r} "
                                                 f"image at position {position}")  # fmt: skip
        except SkipSample as skip:
            failures.append(skip)
    candidates = [doc for doc in sub_documents(texts, tokenizer) if any(v in usable for k, v in doc if k == "image")]
    if not candidates:
        raise no_usable_image(failures, key)
    segments = candidates[int(document_draw * len(candidates))]

    decoded = {}  # position -> RGB image, for the kept images only
    while True:
        segments = [(kind, value) for kind, value in segments if kind == "text" or value in usable]
        if not any(kind == "image" for kind, _ in segments):
            raise no_usable_image(failures, key)
        check_structure(segments, key)
        text, image_positions = formatted_text(segments, tokenizer.eos_token)
        ids = np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)  # (n,)
        media_positions = np.flatnonzero(ids == special.media)  # (M,)
        if len(media_positions) != len(image_positions):
            raise ValueError(
                f"document {key!r}: the tokenizer gives {len(media_positions)} <image> tokens for "
                f"{len(image_positions)} images"
            )
        start = window_start(media_positions, len(ids), budget, start_draw)
        window = cut_window(ids, start, budget, special, cfg.max_num_images)  # (<= budget,) positions into ids
        kept = [image_positions[i] for i in np.searchsorted(media_positions, window[ids[window] == special.media])]
        broken = []
        for position in (p for p in kept if p not in decoded):
            try:
                decoded[position] = decode_image(usable[position], where=f"document {key!r} image at {position}")
            except SkipSample as skip:
                failures.append(skip)
                broken.append(position)
        if not broken:
            break
        for position in broken:  # cut again without them
            del usable[position]

    row = _row(ids[window], kept, decoded, key=key, cfg=cfg, special=special, prefix=prefix, suffix=suffix,
               image_transform=image_transform, flip=bool(cfg.random_flip) and flip_draw < 0.5)  # fmt: skip
    if dropped_images is not None:
        dropped_images.extend(failures)
    return row


def _row(
    window_ids: np.ndarray, kept: list[int], decoded: dict, *, key: str, cfg: MMC4PreprocessConfig,
    special: SpecialTokens, prefix: list[int], suffix: list[int], image_transform, flip: bool,
) -> dict[str, torch.Tensor]:
    """The window's ids with the tokenizer's special tokens, right-padded to max_tokens, its labels and images."""
    row = np.full(cfg.max_tokens, special.pad, dtype=np.int64)  # (L,)
    tokens = np.concatenate([np.asarray(prefix, dtype=np.int64), window_ids, np.asarray(suffix, dtype=np.int64)])
    row[: len(tokens)] = tokens
    input_ids = torch.from_numpy(row)  # (L,)
    attention_mask = (torch.arange(cfg.max_tokens) < len(tokens)).long()  # (L,)
    if len(kept) < max(cfg.min_num_images, 1):
        raise SkipSample(
            "too_few_images",
            f"document {key!r}: its window holds {len(kept)} images (min_num_images={cfg.min_num_images})",
        )
    labels = mmc4_labels(input_ids[None], special, attention_mask[None])[0]  # (L,)
    if count_supervised_tokens(labels[None]) == 0:
        raise SkipSample("no_supervised_tokens", f"document {key!r}: its window keeps no supervised token")
    split = SplitImageTransform.of(image_transform)
    images = torch.stack([split.to_uint8(decoded[p], flip) for p in kept])  # (n, 3, H, W) uint8
    return {
        "images": images,
        "image_mask": torch.arange(cfg.max_num_images) < len(kept),  # (T,)
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }


class DocumentProcessor:
    """Natural-order document (MDS `document` + `image_bytes`, or webdataset `document.json` + `image_bytes`) ->
    tensors; MMC4Processor's interface. A kept document notes the images it lost (`with_dropped_images`)."""

    def __init__(self, tokenizer, image_transform, cfg: MMC4PreprocessConfig, seed: int):
        if cfg.layout != "natural":
            raise ValueError(f"DocumentProcessor reads layout 'natural', got a config for {cfg.layout!r}")
        self.tokenizer, self.cfg, self.seed = tokenizer, cfg, seed
        self.image_transform = SplitImageTransform.of(image_transform)  # split once, not per sample
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.affixes = special_affixes(tokenizer)

    def __call__(self, raw: Mapping[str, Any], *, epoch: int, key: Any) -> dict[str, torch.Tensor]:
        texts, _, image_bytes = unpack_document(raw, str(key))
        dropped: list[SkipSample] = []
        sample = preprocess_document(
            texts,
            image_bytes,
            key=str(key),
            tokenizer=self.tokenizer,
            image_transform=self.image_transform,
            cfg=self.cfg,
            rng=sample_rng(self.seed, epoch, key),
            special=self.special,
            affixes=self.affixes,
            dropped_images=dropped,
        )
        return with_dropped_images(sample, dropped)
