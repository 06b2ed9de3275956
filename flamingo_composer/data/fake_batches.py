"""Hand-built batches in the loader's form, for the benchmarks and the tests: one builder, so what they time and
what they check is what the loader gives the model.

Token layouts follow SPEC 2: a pair is `<image>caption<|endofchunk|>eos`; a document is some text, then per image
`<image>text<|endofchunk|>`, then eos, with fewer images than slots in some rows. Rows differ in their numbers of
supervised tokens. Labels and `text_time` come from the pipeline's collate. Images are random uint8 (the loader's
form, normalised by the DataSpec on the device) or, with `float_images`, random floats (the model's form, which
the DataSpec leaves as it is).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flamingo_composer.data.kinds import kind_named
from flamingo_composer.special_tokens import SpecialTokens
from flamingo_composer.vocab import WORDS


@dataclass(frozen=True)
class FakeDataset:
    """One dataset's shape in a fake batch.

    `images_per_doc`: real images per document, cycled over the rows (and over batches by `index`), at most
    `max_images`. `fill`: documents' text runs fill `max_tokens` (the benchmarks: memory and FLOPs as a full
    loader batch), else short runs of 3 to 7 words (the tests: cheap, with varying lengths).
    """

    kind: str  # a data/kinds.py kind: "pairs" or "interleaved"
    rows: int
    max_tokens: int
    max_images: int = 1
    images_per_doc: Sequence[int] = (1, 2, 3)
    fill: bool = False


def fake_datasets_of(data_config, images_per_doc: Sequence[int] = (2, 3)) -> dict[str, FakeDataset]:
    """The shapes of a run config's enabled datasets (`DataConfig`): batch sizes, `max_tokens`, image slots."""
    shapes = {}
    for name, dataset in data_config.enabled().items():
        pre = dataset.preprocess
        shapes[name] = FakeDataset(
            kind=dataset.kind, rows=dataset.batch_size, max_tokens=pre.max_tokens,
            max_images=getattr(pre, "max_num_images", 1), images_per_doc=tuple(images_per_doc), fill=True,
        )  # fmt: skip
    return shapes


def fake_batch(
    tokenizer,
    datasets: Mapping[str, FakeDataset],
    *,
    image_size: int,
    seed: int = 0,
    index: int = 0,
    float_images: bool = False,
) -> dict[str, dict]:
    """A collated batch {name: sub-batch} of `datasets`. `index` varies the documents' image counts between the
    batches of one series; `seed` the words and pixels."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    words = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in WORDS])
    gen = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return words[torch.randint(len(words), (n,), generator=gen)].tolist()

    def images(n: int) -> torch.Tensor:
        if float_images:
            return torch.randn(n, 3, image_size, image_size, generator=gen)  # (n, 3, H, W)
        return torch.randint(0, 256, (n, 3, image_size, image_size), generator=gen, dtype=torch.uint8)

    def padded(ids: list[int], length: int) -> dict[str, torch.Tensor]:
        ids = ids[:length]
        return {
            "input_ids": torch.tensor(ids + [special.pad] * (length - len(ids))),  # (L,)
            "attention_mask": torch.tensor([1] * len(ids) + [0] * (length - len(ids))),  # (L,)
        }

    def pair(shape: FakeDataset, row: int) -> dict:
        caption = text(2 + (3 * row + 1 + index) % max(1, shape.max_tokens - 5))  # 2 to max_tokens - 4 words
        return {**padded([special.media, *caption, special.endofchunk, special.eos], shape.max_tokens),
                "images": images(1)}  # fmt: skip

    def document(shape: FakeDataset, row: int) -> dict:
        cycle = shape.images_per_doc
        n_images = max(1, min(cycle[(row + index) % len(cycle)], shape.max_images))
        base = max(3, (shape.max_tokens - 8) // n_images - 8) if shape.fill else 3
        ids = text(2 + row % 3)  # text before the first image: not supervised
        for k in range(n_images):
            ids += [special.media, *text(base + (row + 2 * k) % 5), special.endofchunk]
        image_mask = torch.arange(shape.max_images) < n_images  # (T_img,)
        return {**padded(ids + [special.eos], shape.max_tokens), "images": images(n_images),
                "image_mask": image_mask}  # fmt: skip

    batch = {}
    for name, shape in datasets.items():
        kind = kind_named(shape.kind)
        make = pair if kind.name == "pairs" else document
        batch[name] = kind.collate([make(shape, row) for row in range(shape.rows)], special)
    return batch
