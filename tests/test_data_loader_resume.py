"""Exact resume: a restored loader continues at the very next raw sample, with workers and rejected samples."""

from __future__ import annotations

import itertools

import pytest
import torch
from data_loader_helpers import data_config
from data_loader_helpers import image_transform as transform
from torch.utils.data import DataLoader

from flamingo_composer.data.dual_loader import build_dual_loader
from flamingo_composer.data.items import note_cursor, received, send_by_value
from flamingo_composer.data.laion import LaionProcessor
from flamingo_composer.data.mds import MDSItems, open_mds
from flamingo_composer.data.wds import WebDatasetItems


def endless(loader):
    """Iterate loader epochs back to back, as the Trainer does."""
    while True:
        yield from loader


def _assert_same_batches(expected: list[dict], actual: list[dict]) -> None:
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        assert set(want) == set(got)
        for name in want:
            assert got[name]["keys"] == want[name]["keys"]
            assert got[name]["position"] == want[name]["position"]
            assert got[name]["skipped"] == want[name]["skipped"]
            for field in ("images", "image_mask", "input_ids", "attention_mask", "labels"):
                assert torch.equal(got[name][field], want[name][field]), (name, field)


@pytest.mark.parametrize("fmt,workers", [("mds", 0), ("mds", 2), ("wds", 0), ("wds", 2)])
def test_resumed_loader_continues_at_the_next_sample(root, tok, fmt, workers):
    cfg = data_config(root, fmt, laion={"num_workers": workers}, mmc4={"num_workers": workers})

    def build():
        return build_dual_loader(cfg, tok, transform, rank=0, world_size=1, return_keys=True)

    reference = build()
    stream = endless(reference)
    stop = len(reference) + 3  # stop 3 batches into the second loader epoch, past the first pass over LAION
    before = list(itertools.islice(stream, stop))
    state = reference.state_dict()
    after = list(itertools.islice(stream, 4))
    reference.close()
    assert state["positions"]["laion"] == [before[-1]["laion"]["position"]]
    assert state["batches_in_epoch"] == 3
    skipped = sum(sum(b[name]["skipped"].values()) for b in before for name in b)
    assert skipped > 0, "the resumed stream must have rejected samples behind it"

    resumed = build()
    resumed.load_state_dict(state)
    # The interrupted epoch is finished first (len - 3 batches), then full epochs follow.
    assert sum(1 for _ in iter(resumed)) == len(resumed) - 3
    resumed = build()
    resumed.load_state_dict(state)
    _assert_same_batches(after, list(itertools.islice(endless(resumed), 4)))
    resumed.close()


def _items(dataset, workers: int, count: int, cursors: list | None = None) -> list[tuple]:
    """The first `count` items as comparable tuples; `cursors` (one per reader) collects the readers' latest
    cursors as the batcher does."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=send_by_value)
    out = []
    for position, item in enumerate(itertools.islice(map(received, loader), count)):
        if cursors is not None:
            note_cursor(cursors, position, item)
        if "skip" in item:
            out.append(("skip", item["skip"], item["key"]))
        else:
            out.append(("sample", item["key"], item["sample"]["input_ids"].tolist()))
    return out


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_item_stream_restarts_at_any_position(root, tok, fmt):
    """Workers restart in the right round-robin role for every start, odd ones included."""
    process = LaionProcessor(tok, transform, data_config(root, fmt)["laion"].preprocess, seed=0)

    def items(start: int, cursors=None):
        if fmt == "mds":
            dataset = open_mds(str(root / "mds" / "laion" / "train"))
            return MDSItems(
                dataset, process, seed=1, shuffle=True, block_size=1 << 18, rank=0, world_size=1, start=start
            )
        urls = sorted(str(p) for p in (root / "wds" / "laion").glob("train-*.tar"))
        return WebDatasetItems(
            urls,
            process,
            seed=1,
            shuffle=True,
            shuffle_buffer=8,
            resample=False,
            rank=0,
            world_size=1,
            start=start,
            cursors=cursors,
        )

    total = 110  # crosses the end of the first pass (96 samples)
    reference = _items(items(0), 2, total)
    assert {kind for kind, *_ in reference} == {"sample", "skip"}
    for start in (1, 5, 96, 97):
        cursors = [None, None]  # webdataset: where each worker stood after the first `start` items
        _items(items(0), 2, start, cursors)
        assert _items(items(start, cursors), 2, total - start) == reference[start:], start


def test_state_from_another_world_size_keeps_the_global_progress(root, tok, caplog):
    cfg = data_config(root, "mds")
    state = {
        "version": 2, "world_size": 4, "batches_in_epoch": 2, "num_workers": {"laion": 0, "mmc4": 0},
        "positions": {"laion": [10, 12, 11, 13], "mmc4": [5, 6, 5, 6]},
        "cursors": {"laion": [[None]] * 4, "mmc4": [[None]] * 4},
    }  # fmt: skip
    loader = build_dual_loader(cfg, tok, transform, rank=1, world_size=2)
    with caplog.at_level("WARNING"):
        loader.load_state_dict(state)
    assert "resumed on 2" in caplog.text
    assert loader.state_dict()["positions"] == {"laion": [23], "mmc4": [11]}  # (sum over 4 ranks) / 2
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({**state, "version": 1})
