"""Webdataset resume in O(1 shard): a late resume reads at most one shard before its first new item, continues
exactly (workers, rejects, `pipe:` shards, sample-level split, resampling), and changed layouts log a fallback."""

from __future__ import annotations

import itertools
import os
import pickle
from collections import defaultdict
from pathlib import Path

import pytest
from data_loader_helpers import data_config, deadline
from data_loader_helpers import image_transform as transform
from torch.utils.data import DataLoader

from flamingo_composer.data import wds
from flamingo_composer.data.dual_loader import build_dual_loader
from flamingo_composer.data.items import note_cursor, received, send_by_value
from flamingo_composer.data.laion import LaionProcessor
from flamingo_composer.data.wds import ShardCursor, WebDatasetItems

SHARD_SIZE = 16  # SMALL_DATA: 96 LAION train pairs in 6 shards
LATE = 60  # batches of 4 before the checkpoint: about 270 items, each reader 2-3 passes in


def _shards(root: Path, split: str = "train") -> list[str]:
    return sorted(str(p) for p in (root / "wds" / "laion").glob(f"{split}-*.tar"))


def _instrument(monkeypatch, log: Path) -> None:
    """From now on, log every raw sample read from a shard and every item a reader yields, with the reading
    process's pid (DataLoader workers are forked, so they inherit the patches)."""
    read_shard, iterate = wds.shard_samples, WebDatasetItems.__iter__

    def write(what: str, url: str = "") -> None:
        with open(log, "a") as handle:
            handle.write(f"{what} {os.getpid()} {url}\n")

    def counted_shard_samples(url):
        for sample in read_shard(url):
            write("read", url.split()[-1])  # a pipe:'s shard is its last word
            yield sample

    def logged_iter(self):
        for item in iterate(self):
            write("item")
            yield item

    monkeypatch.setattr(wds, "shard_samples", counted_shard_samples)
    monkeypatch.setattr(WebDatasetItems, "__iter__", logged_iter)


def _before_first_item(log: Path, what: str) -> dict[str, list[str]]:
    """Per reading process: the `what` lines (their shards) it logged before its first item."""
    lines, started = defaultdict(list), set()
    for line in log.read_text().splitlines():
        kind, pid, *shard = line.split()
        if kind == "item":
            started.add(pid)
        elif kind == what and pid not in started:
            lines[pid].append(" ".join(shard))
    return {pid: lines[pid] for pid in started}


def _loader(root: Path, tok, workers: int, shards: list[str] | None = None):
    """A LAION-only loader of batches of 4 over the 6 train shards (8-sample shuffle buffer), rank 0 of 1."""
    laion = {"num_workers": workers, "epoch_size": 96}
    if shards is not None:
        laion["shards"] = shards
    cfg = data_config(root, "wds", laion=laion, mmc4={"enabled": False})
    return build_dual_loader(cfg, tok, transform, rank=0, world_size=1, return_keys=True)


def _batches(loader, count: int) -> list[dict]:
    """`count` batches across loader epochs (as the Trainer iterates), then the loader's workers stop."""
    out = list(itertools.islice(itertools.chain.from_iterable(iter(loader) for _ in itertools.count()), count))
    loader.close()
    return [{key: batch["laion"][key] for key in ("keys", "skipped", "position")} for batch in out]


@pytest.mark.parametrize("workers,source", [(0, "file"), (2, "file"), (2, "pipe")])
def test_late_resume_reads_at_most_one_shard_and_continues_exactly(root, tok, tmp_path, monkeypatch, workers, source):
    fetch_log = tmp_path / "reads.log"
    shards = None
    if source == "pipe":  # `pipe:cat`, logging each fetch with the fetching worker's pid ($PPID of the shell)
        shards = [f"pipe:echo fetch $PPID >> {fetch_log} && cat {path}" for path in _shards(root)]
    with deadline(240, "a late webdataset resume"):
        reference = _loader(root, tok, workers, shards)
        before = _batches(reference, LATE)
        state = reference.state_dict()
        expected = _batches(reference, 4)
        assert sum(sum(b["skipped"].values()) for b in before + expected) > 0, "the stream must carry rejects"
        cursors = [ShardCursor.from_state(c) for c in state["cursors"]["laion"][0]]
        assert len(cursors) == max(workers, 1) and all(c.epoch >= 2 for c in cursors), cursors
        assert any(0 < c.offset < SHARD_SIZE for c in cursors), "the checkpoint must fall inside a shard"
        assert len(pickle.dumps(state)) < 1024, "the loader state must stay small"

        fetch_log.write_text("")  # only the resumed run is counted
        _instrument(monkeypatch, fetch_log)
        resumed = _loader(root, tok, workers, shards)
        resumed.load_state_dict(state)
        got = _batches(resumed, 4)
    assert got == expected
    reads = _before_first_item(fetch_log, "read")
    position = state["positions"]["laion"][0]
    print(f"\nresume at item {position} ({[c.to_state() for c in cursors]}), {workers} workers, {source} shards: "
          f"raw samples read before each reader's first new item {sorted(map(len, reads.values()))} (shard: "
          f"{SHARD_SIZE}); a replay from pass 0 reads about {position // max(workers, 1)} per reader")
    assert len(reads) == max(workers, 1)
    assert all(0 < len(shards) <= SHARD_SIZE and len(set(shards)) == 1 for shards in reads.values()), reads
    if source == "pipe":
        fetches = _before_first_item(fetch_log, "fetch")
        assert {pid: len(f) for pid, f in fetches.items()} == dict.fromkeys(reads, 1), "one fetch: the cursor's"


@pytest.mark.parametrize("change", ["workers", "ranks"])
def test_changed_layout_logs_a_fallback_near_the_saved_progress(root, tok, tmp_path, monkeypatch, caplog, change):
    """2 workers -> 1 worker, or 2 ranks -> 1 rank: no exact position exists. The loader warns, and every new
    reader starts at a shard boundary of the saved mean pass, reading nothing before that shard."""
    reference = _loader(root, tok, 2)
    _batches(reference, LATE)
    state = reference.state_dict()
    saved = [ShardCursor.from_state(c) for c in state["cursors"]["laion"][0]]
    if change == "ranks":  # the same readers' state, as if rank 1 of 2 had stood at the same place
        state = {**state, "world_size": 2, "positions": {"laion": state["positions"]["laion"] * 2},
                 "cursors": {"laion": state["cursors"]["laion"] * 2}}  # fmt: skip
    log = tmp_path / "reads.log"
    _instrument(monkeypatch, log)
    resumed = _loader(root, tok, 1 if change == "workers" else 2)
    with caplog.at_level("WARNING"):
        resumed.load_state_dict(state)
    assert "no exact position" in caplog.text and "start of a shard" in caplog.text
    mean_pass = int(sum(c.progress for c in saved) / len(saved))
    starts = [ShardCursor.from_state(c) for c in resumed.batchers["laion"].cursors]
    assert all(c.epoch == mean_pass and c.offset == 0 for c in starts), starts
    with deadline(120, "a resume after a layout change"):
        first = _batches(resumed, 1)[0]
    fresh = _batches(_loader(root, tok, 1 if change == "workers" else 2), 1)[0]
    assert first["keys"] != fresh["keys"], "the stream must not restart from the beginning"
    reads = _before_first_item(log, "read")
    assert reads and all(len(set(shards)) == 1 and len(shards) <= SHARD_SIZE for shards in reads.values()), reads


@pytest.mark.parametrize("mode", ["sample_split", "resample"])
@pytest.mark.parametrize("workers", [0, 2])
def test_sample_split_and_resampling_resume_exactly(root, tok, mode, workers):
    """Rank 1 of 3 over one 16-sample shard keeps every 3rd (x workers) raw sample, so the split's phase moves
    from pass to pass; resampling draws shards with replacement. Both continue exactly from a late cursor."""
    process = LaionProcessor(tok, transform, data_config(root, "wds")["laion"].preprocess, seed=0)
    urls, world_size = (_shards(root, "val"), 3) if mode == "sample_split" else (_shards(root)[:2], 2)

    def items(start: int = 0, cursors=None):
        return WebDatasetItems(urls, process, seed=7, shuffle=True, shuffle_buffer=4, resample=mode == "resample",
                               rank=1, world_size=world_size, start=start, cursors=cursors)  # fmt: skip

    phases = set()

    def keys(dataset, count: int, cursors: list | None = None) -> list:
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=send_by_value)
        out = []
        for position, item in enumerate(itertools.islice(map(received, loader), count)):
            phases.add(ShardCursor.from_state(item["cursor"]).phase)
            if cursors is not None:
                note_cursor(cursors, position, item)
            out.append((item.get("skip"), item["key"]))
        return out

    start, more = 90, 20
    with deadline(120, f"{mode} resume"):
        reference = keys(items(), start + more)
        cursors = [None] * max(workers, 1)
        keys(items(), start, cursors)
        assert all(ShardCursor.from_state(c).epoch >= 2 for c in cursors), cursors
        assert keys(items(start, cursors), more) == reference[start:]
    if mode == "sample_split":  # 16 samples per pass, split 3 (x 2 workers) ways: the phase moves every pass
        assert len(phases) > 1, phases


def test_old_state_version_and_bad_cursors_are_named(root, tok):
    loader = _loader(root, tok, 0)
    state = {"version": 1, "world_size": 1, "batches_in_epoch": 0, "num_workers": {"laion": 0},
             "positions": {"laion": [5]}}  # fmt: skip
    with pytest.raises(ValueError, match="version 1 .*webdataset shard cursors"):
        loader.load_state_dict(state)
    with pytest.raises(ValueError, match="start=5 needs the readers' cursors"):
        loader.batchers["laion"].make_items(5, None)
    bad = {**loader.state_dict(), "cursors": {"laion": [[[0, 1, -2, 3, 0]]]}, "positions": {"laion": [9]}}
    with pytest.raises(ValueError, match="cursor must be 5 ints"):
        loader.load_state_dict(bad)



def test_a_cursor_after_the_last_sample_of_a_shard_points_at_the_next(root, tok, tmp_path, monkeypatch):
    """Resuming right after a shard's last item opens the next shard, not that one again to find its end."""
    process = LaionProcessor(tok, transform, data_config(root, "wds")["laion"].preprocess, seed=0)

    def items(start: int = 0, cursors=None):
        return WebDatasetItems(_shards(root), process, seed=7, shuffle=True, shuffle_buffer=8, resample=False,
                               rank=0, world_size=1, start=start, cursors=cursors)  # fmt: skip

    reference = list(itertools.islice(iter(items()), SHARD_SIZE + 3))
    after_first_shard = reference[SHARD_SIZE - 1]["cursor"]
    assert after_first_shard == [0, 1, 0, 6, 0]
    log = tmp_path / "reads.log"
    _instrument(monkeypatch, log)
    resumed = list(itertools.islice(iter(items(SHARD_SIZE, [after_first_shard])), 3))
    assert [item["key"] for item in resumed] == [item["key"] for item in reference[SHARD_SIZE:]]
    (shards,) = _before_first_item(log, "read").values()
    assert len(set(shards)) == 1 and len(shards) <= SHARD_SIZE, shards  # only the next shard
