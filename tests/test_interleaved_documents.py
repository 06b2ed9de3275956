"""Natural-order interleaved documents (data/documents.py): an OBELICS-schema parquet written here with pyarrow,
converted to MDS (shards/interleaved_parquet.py), then cut into training windows by the processor and read back
through the real MDS reader and dual-batch loader. Images are solid colours, so the k-th image tensor is checked
against the k-th `<image>` by its pixel mean."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from shard_layouts import read_mds

from flamingo_composer.config_schema import ConfigError, from_dict
from flamingo_composer.data.config import DataConfig
from flamingo_composer.data.documents import (
    END_OF_DOCUMENT,
    DocumentProcessor,
    StoredImage,
    pack_document,
    wds_sample,
)
from flamingo_composer.data.dual_loader import NAMED_REJECTIONS_PER_REASON, build_dual_loader
from flamingo_composer.data.interleaved import interleaved_processor
from flamingo_composer.data.items import DROPPED_IMAGES, KNOWN_REASONS, SkipSample, process_to_item
from flamingo_composer.data.mmc4 import MMC4PreprocessConfig, MMC4Processor
from flamingo_composer.models.embeddings import add_flamingo_tokens
from flamingo_composer.shards.convert import iter_tar_samples
from flamingo_composer.shards.interleaved_parquet import convert_interleaved_parquet
from flamingo_composer.special_tokens import SpecialTokens
from flamingo_composer.vocab import build_tiny_tokenizer

SIDE = 16
MIN_BYTES = 200  # a 32 px solid JPEG has ~640 bytes, a 4 px PNG ~77
TRANSFORM = T.Compose([T.Resize((SIDE, SIDE)), T.ToTensor()])
COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 220, 30),
    "purple": (140, 50, 180), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}  # fmt: skip


def tokenizer():
    tok = build_tiny_tokenizer()
    add_flamingo_tokens(tok)
    return tok


def jpeg(color: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), COLORS[color]).save(out, format="JPEG", quality=95)
    return out.getvalue()


def url(name: str) -> str:
    return f"https://example.com/img/{name}.jpg"


def natural(**overrides) -> MMC4PreprocessConfig:
    return MMC4PreprocessConfig(**{"layout": "natural", "min_image_bytes": MIN_BYTES, **overrides})


def image_color(image: torch.Tensor) -> str:
    """The name of the solid colour closest to a uint8 (3, H, W) image's mean."""
    mean = image.float().mean(dim=(1, 2)).numpy()
    return min(COLORS, key=lambda name: float(np.abs(mean - np.asarray(COLORS[name])).sum()))


def words(ids: torch.Tensor, attention_mask: torch.Tensor, tok) -> list[str]:
    return tok.convert_ids_to_tokens(ids[attention_mask.bool()].tolist())


def image_colors_in_order(sample: dict) -> list[str]:
    return [image_color(image) for image in sample["images"]]


# --------------------------------------------------------------------------------------------- the OBELICS file

LONG_PREFACE, LONG_AFTER = 2000, 1000  # a 3,000-token document whose only image is at token 2,000

# (name, texts, images by colour name or 'missing:...'); converted, then processed.
DOCUMENTS = [
    ("text_image_text_image", ["red circle on the left .", None, "blue square here .", None],
     [None, "red", None, "blue"]),
    ("image_less", ["the story .", "more words ."], [None, None]),
    ("unresolved", ["some text .", None, "more text ."], [None, "nowhere", None]),
    ("end_of_document", ["green star .", None, f"green ring . {END_OF_DOCUMENT} yellow ring .", None, "yellow bar ."],
     [None, "green", None, "yellow", None]),  # a sub-document on each side of the marker
    ("three_in_a_row", ["a photo .", None, None, None, "the end ."], [None, "red", "green", "blue", None]),
    ("ends_in_two", ["a photo .", None, "then .", None, None], [None, "red", None, "green", "blue"]),
    ("misaligned", ["a photo .", None, "then ."], [None, "red"]),
    ("long", ["the " * LONG_PREFACE, None, "red " * LONG_AFTER], [None, "orange", None]),
]  # fmt: skip


def write_obelics(path: Path, documents=DOCUMENTS) -> None:
    """OBELICS's columns (images, metadata, general_metadata, texts), two row groups."""
    rows = []
    for name, texts, images in documents:
        urls = [None if image is None else url(image) for image in images]
        metadata = [None if u is None else {"src": u, "document": name} for u in urls]
        rows.append({
            "images": urls, "metadata": json.dumps(metadata),
            "general_metadata": json.dumps({"url": f"https://example.com/{name}.html"}), "texts": texts,
        })  # fmt: skip
    schema = pa.schema([
        ("images", pa.list_(pa.string())), ("metadata", pa.string()), ("general_metadata", pa.string()),
        ("texts", pa.list_(pa.string())),
    ])  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema), path, row_group_size=4)


def write_url_folder(folder: Path) -> Path:
    """Downloads named by sha256(url), with an extension (the resolver ignores it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for color in COLORS:
        (folder / f"{hashlib.sha256(url(color).encode()).hexdigest()}.jpg").write_bytes(jpeg(color))
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("obelics")
    write_obelics(root / "train-00000-of-00001.parquet")
    report = convert_interleaved_parquet(
        [str(root / "train-00000-of-00001.parquet")], root / "mds", preset="obelics",
        image_dir=write_url_folder(root / "images"), size_limit=1 << 14, progress=False,
    )  # fmt: skip
    return root / "mds", report


@pytest.fixture(scope="module")
def rows(converted) -> dict[str, dict]:
    """The converted MDS rows by document name (the key is `<file stem>-<row>`)."""
    names = [name for name, _, _ in DOCUMENTS]
    return {names[int(row["key"].rsplit("-", 1)[1])]: row for row in read_mds(converted[0])}


def process_all(rows: dict[str, dict], processor) -> tuple[dict[str, dict], Counter]:
    samples, skipped = {}, Counter()
    for name, row in rows.items():
        try:
            samples[name] = processor(row, epoch=0, key=row["key"])
        except SkipSample as skip:
            skipped[skip.reason] += 1
    return samples, skipped


def test_conversion_counts_documents_and_images_by_reason(converted, rows):
    _, report = converted
    assert report.written == 5 and set(rows) == {
        "text_image_text_image", "end_of_document", "three_in_a_row", "ends_in_two", "long"
    }  # fmt: skip
    assert report.skipped == {"no_image": 1, "not_downloaded": 1, "misaligned_lists": 1}
    assert report.images_dropped == {"not_downloaded": 1}
    assert report.images_written == {"image_folder": 2 + 2 + 3 + 3 + 1}
    summary = report.summary("out")
    assert "documents: 5 written, 3 skipped" in summary and "documents/s" in summary


def test_processor_counts_skips_and_pairs_the_kth_image_with_the_kth_token(rows):
    tok = tokenizer()
    samples, skipped = process_all(rows, DocumentProcessor(tok, TRANSFORM, natural(), seed=0))
    assert skipped == {"consecutive_images": 1, "trailing_images": 1}
    assert set(samples) == {"text_image_text_image", "end_of_document", "long"}
    assert set(skipped) <= set(KNOWN_REASONS)

    sample = samples["text_image_text_image"]
    assert image_colors_in_order(sample) == ["red", "blue"]
    tokens = words(sample["input_ids"], sample["attention_mask"], tok)
    assert tokens[: tokens.index("<image>")] == ["red", "circle", "on", "the", "left", "."]
    assert tokens.count("<image>") == 2 and sample["image_mask"].tolist() == [True, True, False, False, False, False]
    assert sample["input_ids"].shape == (1024,) and sample["images"].dtype == torch.uint8
    assert sample["images"].shape == (2, 3, SIDE, SIDE)
    # Labels: masked before the first <image> and at each <image>; the text after an image is supervised.
    labels = sample["labels"][sample["attention_mask"].bool()]
    first = tokens.index("<image>")
    assert (labels[: first + 1] == -100).all() and (labels[first + 1 : first + 4] != -100).all()


def test_end_of_document_marker_splits_and_one_sub_document_is_drawn(rows):
    tok = tokenizer()
    processor = DocumentProcessor(tok, TRANSFORM, natural(), seed=0)
    drawn = Counter()
    for epoch in range(16):
        sample = processor(rows["end_of_document"], epoch=epoch, key=rows["end_of_document"]["key"])
        tokens = words(sample["input_ids"], sample["attention_mask"], tok)
        colors = image_colors_in_order(sample)
        assert len(colors) == 1 and tok.unk_token not in tokens  # the marker never reaches the text
        other = "yellow" if colors == ["green"] else "green"
        assert other not in tokens and colors[0] in tokens  # only the drawn sub-document's text
        drawn[colors[0]] += 1
    assert set(drawn) == {"green", "yellow"}


def test_long_document_window_holds_its_image_and_repeats_for_the_same_seed_epoch_key(rows):
    tok = tokenizer()
    processor = DocumentProcessor(tok, TRANSFORM, natural(), seed=3)
    row, windows = rows["long"], set()
    for epoch in range(4):
        first = processor(row, epoch=epoch, key=row["key"])
        again = DocumentProcessor(tok, TRANSFORM, natural(), seed=3)(row, epoch=epoch, key=row["key"])
        assert all(torch.equal(first[name], again[name]) for name in first)  # what makes resume exact
        tokens = words(first["input_ids"], first["attention_mask"], tok)
        assert len(tokens) == 1024 and tokens.count("<image>") == 1
        assert "red" in tokens[tokens.index("<image>") + 1 :]  # the window reaches past the preface
        assert int((first["labels"] != -100).sum()) > 0
        windows.add(tokens.index("<image>"))
    assert len(windows) > 1  # the start is drawn per (seed, epoch, key)
    # Reading from the start (the reference's truncation) would give a window of preface only.
    whole = "the " * LONG_PREFACE
    assert tok(whole)["input_ids"][:1024].count(processor.special.media) == 0


def test_images_past_the_cap_lose_their_token_and_keep_their_text():
    tok = tokenizer()
    texts = ["red one .", None, "green two .", None, "blue three .", None, "yellow four ."]
    images = [None, StoredImage(jpeg("red")), None, StoredImage(jpeg("green")), None, StoredImage(jpeg("blue")), None]
    row = pack_document("capped", texts, images)
    sample = DocumentProcessor(tok, TRANSFORM, natural(max_num_images=2), seed=0)(row, epoch=0, key="capped")
    tokens = words(sample["input_ids"], sample["attention_mask"], tok)
    assert image_colors_in_order(sample) == ["red", "green"] and tokens.count("<image>") == 2
    assert tokens.count("<|endofchunk|>") == 2  # the third image's <|endofchunk|><image> is gone
    assert tokens[tokens.index("three") - 1] == "blue" and "four" in tokens  # its text stays


def test_bad_images_are_dropped_with_their_text_kept_and_counted():
    tok = tokenizer()
    tiny = io.BytesIO()
    Image.new("RGB", (4, 4), COLORS["red"]).save(tiny, format="PNG")
    corrupt = b"\xff\xd8\xff" + b"not a jpeg " * 40
    texts = ["red top .", None, "green bottom .", None, "blue center .", None, "yellow corner ."]
    images = [None, StoredImage(tiny.getvalue()), None, StoredImage(corrupt), None, StoredImage(jpeg("purple")), None]
    assert len(tiny.getvalue()) < MIN_BYTES < len(corrupt)
    processor = DocumentProcessor(tok, TRANSFORM, natural(), seed=0)
    sample = processor(pack_document("bad", texts, images), epoch=0, key="bad")
    tokens = words(sample["input_ids"], sample["attention_mask"], tok)
    assert image_colors_in_order(sample) == ["purple"] and tokens.count("<image>") == 1
    assert all(word in tokens for word in ("top", "bottom", "center", "corner"))
    assert [reason for reason, _ in sample[DROPPED_IMAGES]] == ["image_too_small", "corrupt_image"]
    item = process_to_item(processor, pack_document("bad", texts, images), epoch=0, key="bad", source="shard.mds")
    assert DROPPED_IMAGES not in item["sample"] and item["source"] == "shard.mds"  # the collate sees tensors only
    assert [reason for reason, _ in item[DROPPED_IMAGES]] == ["image_too_small", "corrupt_image"]
    assert "document 'bad' image at 3" in item[DROPPED_IMAGES][1][1]  # the detail says which image

    only_bad = pack_document("only-bad", ["red .", None, "green ."], [None, StoredImage(corrupt), None])
    with pytest.raises(SkipSample) as skip:
        processor(only_bad, epoch=0, key="only-bad")
    assert skip.value.reason == "corrupt_image"  # every image failed the same way: that reason


def test_the_loader_counts_and_names_the_images_kept_documents_lost(tmp_path, caplog):
    """Through the real MDS reader (two workers) and batcher: the lost images reach the batch as `dropped_images`
    by reason, apart from `skipped` (whole documents), and the first ones are named with key and shard."""
    from streaming import MDSWriter

    from flamingo_composer.data.mds import DOCUMENT_MDS_COLUMNS

    corrupt = b"\xff\xd8\xff" + b"not a jpeg " * 40
    documents = {
        "all-corrupt": [StoredImage(corrupt)],  # nothing usable: the whole document is skipped
        "clean": [StoredImage(jpeg("red"))],
        "one-corrupt": [StoredImage(corrupt), StoredImage(jpeg("green"))],
        "two-corrupt": [StoredImage(jpeg("blue")), StoredImage(corrupt), StoredImage(corrupt)],
    }
    with MDSWriter(out=str(tmp_path / "mds"), columns=DOCUMENT_MDS_COLUMNS) as writer:
        for key, images in documents.items():
            texts = [part for image in images for part in ("some words .", None)] + ["the end ."]
            writer.write(pack_document(key, texts, [entry for image in images for entry in (None, image)] + [None]))
    data = DataConfig.from_plain({"docs": {
        "kind": "interleaved", "format": "mds", "local": str(tmp_path / "mds"), "batch_size": 3, "shuffle": False,
        "num_workers": 2, "preprocess": {"layout": "natural", "max_tokens": 64, "min_image_bytes": MIN_BYTES},
    }})  # fmt: skip
    caplog.set_level(logging.WARNING)
    loader = build_dual_loader(data, tokenizer(), TRANSFORM, rank=0, world_size=1, pin_memory=False)
    try:
        batch = next(iter(loader))["docs"]
    finally:
        loader.close()
    assert batch["image_mask"].sum(1).tolist() == [1, 1, 1]
    assert batch["skipped"] == {"corrupt_image": 1} and batch[DROPPED_IMAGES] == {"corrupt_image": 3}
    named = [r.getMessage() for r in caplog.records if "dropped an image of sample" in r.getMessage()]
    assert len(named) == NAMED_REJECTIONS_PER_REASON  # then counted only
    assert all(re.search(r"'(one|two)-corrupt' from .*shard\.\d+\.mds: corrupt_image \(", m) for m in named)


@pytest.mark.parametrize(
    "texts, images, reason",
    [
        (["a", "b"], [None], "misaligned_lists"),
        (["a", "b"], [None, {"image_bytes_range": [0, 0]}], "misaligned_lists"),  # both at position 1
        (["a", None], [None, None], "misaligned_lists"),  # neither at position 1
        (["a", "b"], [None, None], "no_usable_image"),
    ],
)
def test_documents_that_cannot_train_are_skipped_by_reason(texts, images, reason):
    processor = DocumentProcessor(tokenizer(), TRANSFORM, natural(), seed=0)
    raw = {"key": "x", "document": {"texts": texts, "images": images}, "image_bytes": b""}
    with pytest.raises(SkipSample) as skip:
        processor(raw, epoch=0, key="x")
    assert skip.value.reason == reason and reason in KNOWN_REASONS


def test_webdataset_sample_form_gives_the_same_row(rows, converted, tmp_path):
    tok = tokenizer()
    processor = DocumentProcessor(tok, TRANSFORM, natural(), seed=0)
    row = rows["text_image_text_image"]
    from_mds = processor(row, epoch=1, key=row["key"])
    from_wds = processor(wds_sample(row), epoch=1, key=row["key"])
    assert all(torch.equal(from_mds[name], from_wds[name]) for name in from_mds)

    # The converter's webdataset output holds the same members, read back with webdataset's tar reader.
    parquet = converted[0].parent / "train-00000-of-00001.parquet"
    report = convert_interleaved_parquet(
        [str(parquet)], tmp_path / "wds", preset="obelics", output_format="wds",
        image_dir=converted[0].parent / "images", progress=False,
    )  # fmt: skip
    samples = [s for shard in report.outputs for s in iter_tar_samples(shard, report)]
    assert len(samples) == 5 and {"document.json", "image_bytes"} <= set(samples[0])
    first = next(s for s in samples if s["__key__"] == row["key"])
    assert all(torch.equal(processor(first, epoch=1, key=row["key"])[n], from_mds[n]) for n in from_mds)

    # And the webdataset reader serves them to the loader.
    data = DataConfig.from_plain({"docs": {
        "kind": "interleaved", "format": "wds", "shards": str(tmp_path / "wds"), "batch_size": 3, "shuffle_buffer": 1,
        "preprocess": {"layout": "natural", "min_image_bytes": MIN_BYTES},
    }})  # fmt: skip
    loader = build_dual_loader(data, tok, TRANSFORM, rank=0, world_size=1, pin_memory=False)
    try:
        batch = next(iter(loader))["docs"]
    finally:
        loader.close()
    assert batch["input_ids"].shape == (3, 1024) and batch["skipped"] == {"consecutive_images": 1, "trailing_images": 1}


def test_layout_config_resolves_max_tokens_and_rejects_matched_only_keys():
    assert MMC4PreprocessConfig().max_tokens == 256 and MMC4PreprocessConfig(layout="natural").max_tokens == 1024
    assert MMC4PreprocessConfig(layout="natural", max_tokens=512).max_tokens == 512
    for key, value in (("sim_threshold", 0.3), ("single_image_drop_prob", 0.0)):
        with pytest.raises(ConfigError, match=rf"data\.obelics\.preprocess\.{key}: applies to layout 'matched'"):
            from_dict(MMC4PreprocessConfig, {"layout": "natural", key: value}, "data.obelics.preprocess")
    with pytest.raises(ConfigError, match=r"data\.obelics\.preprocess\.layout: must be one of"):
        from_dict(MMC4PreprocessConfig, {"layout": "page"}, "data.obelics.preprocess")
    tok = tokenizer()
    assert isinstance(interleaved_processor(tok, TRANSFORM, natural(), 0), DocumentProcessor)
    assert isinstance(interleaved_processor(tok, TRANSFORM, MMC4PreprocessConfig(), 0), MMC4Processor)


def test_a_batch_comes_out_of_the_real_mds_reader(converted):
    data = DataConfig.from_plain({
        "obelics": {
            "kind": "interleaved", "format": "mds", "local": str(converted[0]), "batch_size": 2, "seed": 1,
            "preprocess": {"layout": "natural", "max_tokens": 1024, "min_image_bytes": MIN_BYTES, "max_num_images": 3},
        }
    })  # fmt: skip
    loader = build_dual_loader(data, tokenizer(), TRANSFORM, rank=0, world_size=1, pin_memory=False)
    try:
        batch = next(iter(loader))["obelics"]
    finally:
        loader.close()
    assert batch["input_ids"].shape == (2, 1024) and batch["image_mask"].shape == (2, 3)
    assert batch["images"].shape == (int(batch["image_mask"].sum()), 3, SIDE, SIDE)
    media = SpecialTokens.from_tokenizer(tokenizer()).media
    assert ((batch["input_ids"] == media).sum(dim=1) == batch["image_mask"].sum(dim=1)).all()
    assert int((batch["labels"] != -100).sum()) > 0
    assert set(batch["skipped"]) <= {"consecutive_images", "trailing_images"}

