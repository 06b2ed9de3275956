"""Composer DataSpec of the loader's batch: microbatch split and order, sample and token counts, microbatch-size
checks, for two and three named datasets."""

from __future__ import annotations

import pytest
import torch
from composer.core import DataSpec

from flamingo_composer.data.dataspec import (
    build_dataspec,
    get_num_samples_in_batch,
    get_num_tokens_in_batch,
    split_batch,
    validate_microbatch_size,
)
from flamingo_composer.data.dual_loader import DualBatchLoader

FORWARD = ["mmc4", "laion"]  # the default kinds' forward order: interleaved, then pairs


def _sub(rows: int, slots: int, length: int, offset: int) -> dict:
    """A sub-batch whose rows are numbered offset, offset+1, ... in every tensor (to trace them); row i holds
    1 + i % slots images, each filled with its row's number."""
    ids = torch.arange(offset, offset + rows)
    input_ids = ids[:, None].repeat(1, length)  # (B, L)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[:, length - 1 - (ids % 2)] = 0  # rows differ in padding
    labels = input_ids.clone()
    labels[:, : 1 + ids[0] % 3] = -100
    image_mask = torch.arange(slots)[None] <= (torch.arange(rows) % slots)[:, None]  # (B, T_img)
    image_rows = ids.repeat_interleave(image_mask.sum(1))  # (N,)
    return {
        "images": image_rows.float()[:, None, None, None].expand(-1, 3, 2, 2).clone(),  # (N, 3, 2, 2)
        "image_mask": image_mask,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "global_supervised_tokens": {"laion": torch.tensor(7), "mmc4": torch.tensor(9)},  # the step's (loss.py)
        "skipped": {"corrupt_image": 2},
        "position": 99,
    }


def _batch(laion_rows: int | None, mmc4_rows: int | None) -> dict:
    batch = {}
    if laion_rows:
        batch["laion"] = _sub(laion_rows, 1, 6, offset=0)
    if mmc4_rows:
        batch["mmc4"] = _sub(mmc4_rows, 3, 10, offset=100)
    return batch


@pytest.mark.parametrize(
    "laion_rows,mmc4_rows,microbatch,chunks",
    [(8, 4, 4, 2), (8, 4, 2, 4), (6, 3, 2, 3), (8, 4, 8, 1), (8, 2, 1, 8), (None, 4, 2, 2), (4, None, 1, 4)],
)
def test_split_batch_gives_each_dataset_its_own_microbatches(laion_rows, mmc4_rows, microbatch, chunks):
    batch = _batch(laion_rows, mmc4_rows)
    pieces = split_batch(batch, microbatch)
    # One dataset per microbatch, MMC4's first.
    assert all(len(piece) == 1 for piece in pieces)
    owners = [next(iter(piece)) for piece in pieces]
    assert owners == sorted(owners, key=FORWARD.index)
    for name, sub in batch.items():
        present = [piece[name] for piece, owner in zip(pieces, owners) if owner == name]
        assert len(present) == min(chunks, sub["input_ids"].shape[0])
        for field in ("images", "image_mask"):
            assert torch.equal(torch.cat([part[field] for part in present]), sub[field]), (name, field)
        for part in present:  # each part holds its own rows' images
            rows_of_images = part["input_ids"][:, 0].repeat_interleave(part["image_mask"].sum(1))  # (N_part,)
            assert torch.equal(part["images"][:, 0, 0, 0], rows_of_images.float()), name
        start = 0
        for part in present:  # text: the part's rows, without the columns that are padding in all of them
            rows, width = slice(start, start + part["input_ids"].shape[0]), part["input_ids"].shape[1]
            for field in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(part[field], sub[field][rows, :width]), (name, field)
            assert sub["attention_mask"][rows, width:].sum() == 0
            start = rows.stop
        for part in present:  # the step's global counts travel in every microbatch
            assert part["global_supervised_tokens"] is sub["global_supervised_tokens"]
            assert "skipped" not in part and "position" not in part  # the full batch's bookkeeping
            assert part["images"].shape[1:] == sub["images"].shape[1:]
    lead = "laion" if laion_rows else "mmc4"
    assert all(piece[lead]["input_ids"].shape[0] <= microbatch for piece in pieces if lead in piece)
    assert sum(get_num_samples_in_batch(piece) for piece in pieces) == get_num_samples_in_batch(batch)


def test_split_batch_takes_any_size_auto_microbatching_may_pick():
    batch = _batch(6, 4)
    for microbatch in (6, 3, 1, 4, 2.0):  # halving from an odd size, floats as Composer may pass them
        pieces = split_batch(batch, microbatch)
        assert sum(piece["laion"]["input_ids"].shape[0] for piece in pieces if "laion" in piece) == 6
        assert sum(piece["mmc4"]["input_ids"].shape[0] for piece in pieces if "mmc4" in piece) == 4


def test_sample_and_token_counts_cover_both_datasets():
    batch = _batch(8, 4)
    assert get_num_samples_in_batch(batch) == 12
    tokens = get_num_tokens_in_batch(batch)
    expected_total = int(batch["laion"]["attention_mask"].sum() + batch["mmc4"]["attention_mask"].sum())
    assert tokens["total"] == expected_total < 8 * 6 + 4 * 10
    assert tokens["loss_generating"] == sum(int((sub["labels"][:, 1:] != -100).sum()) for sub in batch.values())


def test_split_batch_with_three_datasets_runs_them_in_the_given_order():
    """Lead = the batch's first dataset (config order); microbatches in the forward order given."""
    batch = {"cc": _sub(8, 1, 6, 0), "docs": _sub(4, 3, 10, 100), "laion": _sub(2, 1, 6, 200)}
    pieces = split_batch(batch, 4, order=["docs", "cc", "laion"])  # 2 chunks each: 4 cc, 2 docs, 1 laion rows
    assert [next(iter(piece)) for piece in pieces] == ["docs", "docs", "cc", "cc", "laion", "laion"]
    assert [piece[name]["input_ids"].shape[0] for piece in pieces for name in piece] == [2, 2, 4, 4, 1, 1]
    with pytest.raises(ValueError, match=r"\['laion'\] are not in the forward order"):
        split_batch(batch, 4, order=["docs", "cc"])
    with pytest.raises(ValueError, match="kind: missing; dataset 'cc'"):
        split_batch(batch, 4)  # a hand-built batch without an order: only laion and mmc4 have a default kind


def test_validate_microbatch_size_names_the_key():
    validate_microbatch_size({"laion": 64, "mmc4": 32}, 16)  # 4 chunks: 16 LAION + 8 MMC4 each
    validate_microbatch_size({"mmc4": 32}, 8)  # MMC4 only: counts documents
    validate_microbatch_size({"laion": 64}, 64)
    validate_microbatch_size({"cc": 8, "laion": 4, "docs": 2}, 4)  # 2 chunks of every batch
    with pytest.raises(ValueError, match=r"24 does not cut data.laion.batch_size=64 into equal chunks"):
        validate_microbatch_size({"laion": 64, "mmc4": 32}, 24)
    with pytest.raises(ValueError, match=r"data.mmc4.batch_size=6 cannot be cut into the 4 equal chunks"):
        validate_microbatch_size({"laion": 8, "mmc4": 6}, 2)  # 4 LAION chunks cannot cut 6 MMC4 docs equally
    with pytest.raises(ValueError, match=r"data.docs.batch_size=3 cannot be cut into the 2 equal chunks"):
        validate_microbatch_size({"cc": 8, "laion": 4, "docs": 3}, 4)
    with pytest.raises(ValueError, match="microbatch_size=0"):
        validate_microbatch_size({"laion": 8, "mmc4": 4}, 0)


class _FixedBatcher:
    """Stand-in for a SourceBatcher: same batch every time."""

    def __init__(self, sub: dict):
        self.sub, self.batch_size, self.num_workers, self.position = sub, sub["input_ids"].shape[0], 0, 0

    def next_batch(self) -> dict:
        self.position += 1
        return self.sub


def test_build_dataspec_wires_our_functions():
    loader = DualBatchLoader(
        {"laion": _FixedBatcher(_sub(8, 1, 6, 0)), "mmc4": _FixedBatcher(_sub(4, 3, 10, 0))}, 3,
        forward_order=FORWARD,
    )  # fmt: skip
    spec = build_dataspec(loader)
    assert isinstance(spec, DataSpec) and spec.dataloader is loader
    assert loader.batch_size == 8 and len(loader) == 3  # the first dataset's batch: what microbatches count
    batch = next(iter(spec.dataloader))
    assert list(batch) == ["laion", "mmc4"]  # config order
    assert spec.get_num_samples_in_batch(batch) == 12
    assert spec.get_num_tokens_in_batch(batch) == get_num_tokens_in_batch(batch)["total"]
    assert spec.get_num_tokens_in_batch(batch, token_type="loss_generating") > 0
    pieces = spec.split_batch(batch, 4)
    assert [next(iter(piece)) for piece in pieces] == ["mmc4", "mmc4", "laion", "laion"]  # the loader's order
    with pytest.raises(ValueError, match="forward order"):
        DualBatchLoader({"laion": _FixedBatcher(_sub(8, 1, 6, 0))}, 3, forward_order=FORWARD)


def test_microbatches_drop_trailing_padding_columns_only():
    batch = _batch(4, None)
    sub = batch["laion"]
    sub["attention_mask"][:, 4:] = 0  # every row ends in padding from column 4
    sub["labels"][:, 4:] = -100
    (piece,) = split_batch(batch, 4)
    assert piece["laion"]["input_ids"].shape == (4, 4) and piece["laion"]["labels"].shape == (4, 4)
    assert torch.equal(piece["laion"]["input_ids"], sub["input_ids"][:, :4])
    left = _batch(4, None)
    left["laion"]["attention_mask"] = torch.ones_like(left["laion"]["attention_mask"])
    left["laion"]["attention_mask"][:, :2] = 0  # left padding (generation batches): nothing is cut
    (piece,) = split_batch(left, 4)
    assert piece["laion"]["input_ids"].shape == left["laion"]["input_ids"].shape
