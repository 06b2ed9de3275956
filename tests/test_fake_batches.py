"""The one hand-built batch builder (data/fake_batches.py) that the benchmarks and the tests share: the loader's
schema, SPEC 2's token layouts and labels, full documents when asked, and a batch the DataSpec takes as it takes
the loader's."""

from __future__ import annotations

import torch
from step_utils import REPO_ROOT

from flamingo_composer.data.dataspec import build_dataspec
from flamingo_composer.data.fake_batches import FakeDataset, fake_batch, fake_datasets_of
from flamingo_composer.data.images import SplitImageTransform
from flamingo_composer.data.masking import laion_labels, mmc4_labels
from flamingo_composer.models.tiny import tiny_model_config
from flamingo_composer.models.towers import build_vision
from flamingo_composer.shards.synthetic import SyntheticConfig, write_synthetic_dataset
from flamingo_composer.special_tokens import SpecialTokens
from flamingo_composer.training.config import load_config
from flamingo_composer.vocab import build_tiny_tokenizer

TINY_DATA = SyntheticConfig(num_laion=2, num_laion_val=2, num_mmc4=2, num_mmc4_val=2, image_size=8)
SHAPES = {
    "cc": FakeDataset("pairs", rows=4, max_tokens=16),
    "docs": FakeDataset("interleaved", rows=5, max_tokens=64, max_images=3, images_per_doc=(1, 3, 2)),
}


def _tokenizer():
    from flamingo_composer.models.embeddings import add_flamingo_tokens

    tokenizer = build_tiny_tokenizer()
    add_flamingo_tokens(tokenizer)
    return tokenizer


def test_a_fake_batch_has_the_loaders_schema_and_spec_labels():
    tokenizer = _tokenizer()
    special = SpecialTokens.from_tokenizer(tokenizer)
    batch = fake_batch(tokenizer, SHAPES, image_size=8, seed=3)
    assert list(batch) == ["cc", "docs"]
    for name, sub in batch.items():
        shape = SHAPES[name]
        assert sub["input_ids"].shape == (shape.rows, shape.max_tokens)
        assert sub["image_mask"].shape == (shape.rows, shape.max_images)
        assert sub["images"].dtype == torch.uint8 and sub["images"].shape == (int(sub["image_mask"].sum()), 3, 8, 8)
        media_per_row = (sub["input_ids"] == special.media).sum(1)  # (B,): one `<image>` per real image
        assert torch.equal(media_per_row, sub["image_mask"].sum(1))
        rule = laion_labels if shape.kind == "pairs" else mmc4_labels
        assert torch.equal(sub["labels"], rule(sub["input_ids"], special, sub["attention_mask"]))
        supervised = (sub["labels"] != -100).sum(1)
        assert len(set(supervised.tolist())) > 1, name  # rows differ in their supervised tokens
    assert batch["docs"]["image_mask"].sum(1).tolist() == [1, 3, 2, 1, 3]  # the cycle, capped at max_images
    assert not batch["docs"]["image_mask"].all()  # some slots stay empty


def test_float_images_index_and_seed():
    tokenizer = _tokenizer()
    uint8, floats = (fake_batch(tokenizer, SHAPES, image_size=8, float_images=f) for f in (False, True))
    assert floats["docs"]["images"].dtype == torch.float32
    assert torch.equal(uint8["docs"]["input_ids"], floats["docs"]["input_ids"])  # only the pixels differ
    shifted = fake_batch(tokenizer, SHAPES, image_size=8, index=1)
    assert shifted["docs"]["image_mask"].sum(1).tolist() == [3, 2, 1, 3, 2]
    again, other = (fake_batch(tokenizer, SHAPES, image_size=8, seed=s) for s in (0, 1))
    assert torch.equal(again["cc"]["images"], uint8["cc"]["images"])
    assert not torch.equal(other["cc"]["images"], uint8["cc"]["images"])


def test_benchmark_shapes_fill_the_documents_of_a_recipe(tmp_path):
    """`fake_datasets_of` reads a recipe's datasets; `fill` writes documents nearly as long as max_tokens, never
    cut (each keeps its eos)."""
    data_root = tmp_path / "synthetic"  # the recipe's config checks that its MDS folders exist; only shapes are read
    write_synthetic_dataset(data_root, TINY_DATA, formats=("mds",))
    cfg = load_config(REPO_ROOT / "yamls" / "bench-cpu.yaml", [f"variables.data_root={data_root}"])
    shapes = fake_datasets_of(cfg.data, (2, 3))
    assert {name: s.kind for name, s in shapes.items()} == {n: d.kind for n, d in cfg.data.enabled().items()}
    tokenizer = _tokenizer()
    special = SpecialTokens.from_tokenizer(tokenizer)
    batch = fake_batch(tokenizer, shapes, image_size=8)
    for name, shape in shapes.items():
        sub = batch[name]
        assert sub["input_ids"].shape == (cfg.data[name].batch_size, shape.max_tokens)
        assert ((sub["input_ids"] == special.eos).sum(1) == 1).all(), name
        if shape.kind == "interleaved":
            assert sub["attention_mask"].sum(1).min() > 0.85 * shape.max_tokens


def test_the_dataspec_takes_a_fake_batch_as_a_loader_batch():
    """Split with its images per row, then the uint8 images normalised; float images are left as they are."""
    bundle_cfg = tiny_model_config("gpt_neox")
    transform = SplitImageTransform.of(build_vision(bundle_cfg.vision, on_meta=True)[1])
    tokenizer = _tokenizer()

    class Loader(list):
        batch_size, image_transform, forward_order = 4, transform, ["docs", "cc"]

    for floats in (False, True):
        batch = fake_batch(tokenizer, SHAPES, image_size=32, float_images=floats)
        spec = build_dataspec(Loader([batch]))
        pieces = [spec.microbatch_transforms(piece) for piece in spec.split_batch(batch, 2)]
        assert [next(iter(p)) for p in pieces] == ["docs", "docs", "cc", "cc"]
        for name in SHAPES:
            images = torch.cat([p[name]["images"] for p in pieces if name in p])
            assert images.dtype == torch.float32 and images.shape[0] == batch[name]["images"].shape[0]
            if floats:
                assert torch.equal(images, batch[name]["images"])
            else:
                expected = transform.normalize(batch[name]["images"])
                torch.testing.assert_close(images, expected)
