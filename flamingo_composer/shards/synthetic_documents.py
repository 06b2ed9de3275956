"""Synthetic natural-order documents in OBELICS's parquet layout, with their images as downloads named by
sha256(url): what the interleaved parquet converter reads, at the open corpora's shape (~800 tokens and 2-4 images
per document, an image always followed by text), for benchmarks. Images and sentences are the synthetic data's
(`synthetic.render_scene`, the tiny tokenizer's words: one token each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flamingo_composer.shards.interleaved_parquet import url_file_name
from flamingo_composer.shards.synthetic import FILLER_SENTENCES, laion_caption, random_scene, render_scene

OBELICS_SCHEMA = pa.schema([
    ("images", pa.list_(pa.string())), ("metadata", pa.string()), ("general_metadata", pa.string()),
    ("texts", pa.list_(pa.string())),
])  # fmt: skip


def _paragraph(rng: np.random.Generator, words: int) -> str:
    """Filler sentences up to about `words` words (tokens of the tiny tokenizer)."""
    sentences, count = [], 0
    while count < words:
        sentence = FILLER_SENTENCES[rng.integers(len(FILLER_SENTENCES))]
        sentences.append(sentence)
        count += len(sentence.split())
    return " ".join(sentences)


def write_synthetic_documents(
    parquet: str | Path, image_dir: str | Path, *, num_documents: int, image_size: int = 256, words: int = 800,
    seed: int = 0, row_group_size: int = 256,
) -> int:
    """Write `num_documents` OBELICS-layout rows to `parquet` and their images to `image_dir`; returns the number of
    images. Each document: a preface, then 2-4 images each followed by a paragraph, about `words` words in all."""
    rng = np.random.default_rng(seed)
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    rows, num_images = [], 0
    for index in range(num_documents):
        count = int(rng.integers(2, 5))
        texts, images = [_paragraph(rng, words // (count + 1))], [None]
        for k in range(count):
            scene = random_scene(rng)
            url = f"https://synthetic.example/{seed}/{index}/{k}.jpg"
            (image_dir / f"{url_file_name(url)}.jpg").write_bytes(render_scene(scene, rng, image_size))
            texts += [None, f"{laion_caption(scene, rng)} . {_paragraph(rng, words // (count + 1))}"]
            images += [url, None]
        num_images += count
        metadata = [None if url is None else {"src": url} for url in images]
        rows.append({"images": images, "metadata": json.dumps(metadata), "texts": texts,
                     "general_metadata": json.dumps({"url": f"https://synthetic.example/{seed}/{index}"})})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, OBELICS_SCHEMA), parquet, row_group_size=row_group_size)
    return num_images
