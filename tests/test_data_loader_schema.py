"""Batch loader output: SPEC 2's schema, single-dataset runs, seeded order, config errors at build time."""

from __future__ import annotations

import itertools

import pytest
import torch
from data_loader_helpers import (
    IMAGE_SIDE,
    MAX_IMAGES,
    MMC4_TOKENS,
    data_config,
    laion_config,
    mmc4_config,
)
from data_loader_helpers import image_transform as transform
from step_utils import device_vision_x

from flamingo_composer.data.config import DataConfig, DatasetConfig
from flamingo_composer.data.dual_loader import build_dual_loader
from flamingo_composer.special_tokens import SpecialTokens


def _check_sub(sub: dict, batch_size: int, num_slots: int, length: int, special: SpecialTokens,
               image_transform) -> None:
    # The loader's compact form: uint8 images of the real slots only.
    assert sub["image_mask"].shape == (batch_size, num_slots) and sub["image_mask"].dtype == torch.bool
    assert sub["images"].shape == (int(sub["image_mask"].sum()), 3, IMAGE_SIDE, IMAGE_SIDE)
    assert sub["images"].dtype == torch.uint8 and "vision_x" not in sub
    for name in ("input_ids", "attention_mask", "labels"):
        assert sub[name].shape == (batch_size, length) and sub[name].dtype == torch.long, name
    # The model's form (the DataSpec's device transform): image_mask marks exactly the slots holding an image,
    # one per surviving <image> token.
    vision_x = device_vision_x(image_transform, sub)
    assert vision_x.shape == (batch_size, num_slots, 1, 3, IMAGE_SIDE, IMAGE_SIDE)
    assert vision_x.dtype == torch.float32
    filled = vision_x.flatten(2).abs().sum(-1) > 0  # (B, T_img)
    assert torch.equal(sub["image_mask"], filled)
    assert torch.equal(sub["image_mask"].sum(1), (sub["input_ids"] == special.media).sum(1))
    supervised = sub["labels"][:, 1:] != -100
    assert supervised.any(1).all(), "a row with every label -100 reached the batch"
    assert isinstance(sub["skipped"], dict) and isinstance(sub["position"], int)


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_batches_follow_the_schema(root, tok, fmt):
    special = SpecialTokens.from_tokenizer(tok)
    loader = build_dual_loader(
        data_config(root, fmt, laion={"num_workers": 2}), tok, transform, rank=0, world_size=1
    )
    assert loader.batch_size == 4
    batches = list(itertools.islice(iter(loader), 3))
    loader.close()
    positions = {"laion": 0, "mmc4": 0}
    expand = loader.image_transform
    for batch in batches:
        assert set(batch) == {"laion", "mmc4"}
        _check_sub(batch["laion"], 4, 1, 32, special, expand)
        _check_sub(batch["mmc4"], 2, MAX_IMAGES, MMC4_TOKENS, special, expand)
        for name, sub in batch.items():
            # Every raw item consumed went into the batch or into its skip counts.
            consumed = sub["position"] - positions[name]
            assert consumed == sub["input_ids"].shape[0] + sum(sub["skipped"].values())
            positions[name] = sub["position"]


@pytest.mark.parametrize("only", ["laion", "mmc4"])
def test_single_dataset_runs(root, tok, only):
    other = "mmc4" if only == "laion" else "laion"
    cfg = data_config(root, "mds", **{other: {"enabled": False}})
    loader = build_dual_loader(cfg, tok, transform, rank=0, world_size=1)
    assert loader.batch_size == (4 if only == "laion" else 2)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    assert all(set(batch) == {only} for batch in batches)


def test_len_counts_batches_per_epoch(root, tok):
    # MDS: samples // (world x B), min over both datasets: LAION 96 // 4 = 24, MMC4 40 // 2 = 20.
    loader = build_dual_loader(data_config(root, "mds"), tok, transform, rank=0, world_size=1)
    assert len(loader) == 20
    # epoch_size (global samples per epoch) wins: 2 ranks x 4 = 8 per batch -> 40 // 8 = 5.
    cfg = data_config(root, "wds", laion={"epoch_size": 40}, mmc4={"epoch_size": 1000})
    assert len(build_dual_loader(cfg, tok, transform, rank=1, world_size=2)) == 5


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_order_is_fixed_by_the_seed(root, tok, fmt):
    def keys(seed: int, workers: int) -> list[str]:
        cfg = data_config(root, fmt, laion={"seed": seed, "num_workers": workers}, mmc4={"enabled": False})
        loader = build_dual_loader(cfg, tok, transform, rank=0, world_size=1, return_keys=True)
        out = [key for batch in itertools.islice(iter(loader), 5) for key in batch["laion"]["keys"]]
        loader.close()
        return out

    first = keys(seed=11, workers=0)
    assert keys(seed=11, workers=0) == first
    assert keys(seed=12, workers=0) != first
    if fmt == "mds":  # the MDS order does not depend on the number of workers
        assert keys(seed=11, workers=2) == first


def test_missing_local_shard_fails_at_build_naming_it(root):
    with pytest.raises(ValueError, match=r"train-000006.tar.*94 of 100 missing"):
        DatasetConfig(kind="pairs", shards=f"{root}/wds/laion/train-{{000000..000099}}.tar")
    with pytest.raises(ValueError, match="empty"):
        DatasetConfig(kind="pairs", shards=[])
    with pytest.raises(ValueError, match="no shards"):
        DatasetConfig(kind="interleaved", format="wds")
    with pytest.raises(ValueError, match="nowhere/index.json"):
        DatasetConfig(kind="interleaved", format="mds", local=str(root / "nowhere"))
    # Remote URLs and pipe: commands are only opened while training; a disabled dataset is not checked.
    DatasetConfig(kind="pairs", shards=["pipe:false", "s3://bucket/shard-{0..3}.tar"])
    DatasetConfig(kind="pairs", enabled=False, shards="/does/not/exist.tar")
    with pytest.raises(ValueError, match="no dataset is enabled"):
        DataConfig({"laion": DatasetConfig(kind="pairs", enabled=False)})


def test_remote_webdataset_needs_epoch_size(root, tok):
    cfg = DataConfig({"laion": laion_config(root, "wds", shards=f"pipe:cat {root}/wds/laion/train-000000.tar")})
    with pytest.raises(ValueError, match="epoch_size"):
        build_dual_loader(cfg, tok, transform, rank=0, world_size=1)
    cfg = DataConfig(
        {"mmc4": mmc4_config(root, "wds", shards=f"pipe:cat {root}/wds/mmc4/train-000000.tar", epoch_size=4)}
    )
    loader = build_dual_loader(cfg, tok, transform, rank=0, world_size=1)
    assert len(list(loader)) == len(loader) == 2


def test_eval_loader_rewinds_every_time(root, tok):
    cfg = data_config(root, "wds", laion={"num_workers": 2}, mmc4={"enabled": False})
    loader = build_dual_loader(cfg, tok, transform, rank=0, world_size=1, for_eval=True, return_keys=True)
    first = [batch["laion"]["keys"] for batch in itertools.islice(iter(loader), 3)]
    again = [batch["laion"]["keys"] for batch in itertools.islice(iter(loader), 3)]
    loader.close()
    assert first == again
