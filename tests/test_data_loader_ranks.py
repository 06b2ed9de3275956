"""Splitting over ranks and workers: disjoint and complete, no hang with few shards, equal batch counts."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from data_loader_helpers import data_config, deadline, tokenizer
from data_loader_helpers import image_transform as transform
from torch.utils.data import DataLoader

from flamingo_composer.data.dual_loader import build_dual_loader
from flamingo_composer.data.items import received, send_by_value
from flamingo_composer.data.laion import LaionProcessor
from flamingo_composer.data.mds import MDSItems, open_mds
from flamingo_composer.data.wds import WebDatasetItems, split_plan


@pytest.fixture(scope="module")
def process(root):
    return LaionProcessor(tokenizer(), transform, data_config(root, "wds")["laion"].preprocess, seed=0)


def _keys(dataset, workers: int, count: int) -> list[str]:
    """Keys of the first `count` items (accepted or rejected) a rank's DataLoader delivers."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=send_by_value)
    return [item["key"] for item in itertools.islice(map(received, loader), count)]


def _shards(root, split: str) -> list[str]:
    return sorted(str(p) for p in (root / "wds" / "laion").glob(f"{split}-*.tar"))


def test_split_plan_falls_back_to_sample_level():
    assert split_plan(num_shards=8, world_size=2, num_workers=4) == (True, True)
    assert split_plan(num_shards=6, world_size=2, num_workers=4) == (
        True,
        False,
    )  # 3 shards per rank < 4 workers
    assert split_plan(num_shards=1, world_size=2, num_workers=2) == (False, False)


@pytest.mark.parametrize("shuffle", [False, True])
def test_fewer_shards_than_readers_does_not_hang_and_covers_the_data(root, process, shuffle):
    """One 16-sample shard, 2 ranks x 2 workers: every reader gets data; one pass = every sample once."""
    (url,) = _shards(root, "val")
    with deadline(120, "reading 1 shard with 2 ranks x 2 workers"):
        per_rank = [
            _keys(
                WebDatasetItems([url], process, seed=4, shuffle=shuffle, shuffle_buffer=4, resample=False,
                                rank=rank, world_size=2),
                workers=2, count=8,
            )
            for rank in range(2)
        ]  # fmt: skip
    assert all(len(keys) == 8 for keys in per_rank)
    everything = Counter(f"val-{i:07d}" for i in range(16))
    if (
        shuffle
    ):  # the sample buffer mixes passes, so a pass is no longer a clean set; still every reader reads
        assert set(per_rank[0] + per_rank[1]) <= set(everything) and per_rank[0] != per_rank[1]
    else:
        assert Counter(per_rank[0] + per_rank[1]) == everything


def test_shard_level_split_is_disjoint_and_complete(root, process):
    """4 shards, 2 ranks x 2 workers: each worker reads one shard per pass, so (without the sample buffer, which
    mixes passes) both ranks' first 32 items are the 64 samples, each once."""
    urls = _shards(root, "train")[:4]
    per_rank = [
        _keys(
            WebDatasetItems(urls, process, seed=4, shuffle=True, shuffle_buffer=0, resample=False, rank=rank,
                            world_size=2),
            workers=2, count=32,
        )
        for rank in range(2)
    ]  # fmt: skip
    assert Counter(per_rank[0] + per_rank[1]) == Counter(f"train-{i:07d}" for i in range(64))


def test_mds_ranks_are_disjoint_and_complete(root, process):
    dataset = open_mds(str(root / "mds" / "laion" / "train"))
    per_rank = [
        _keys(
            MDSItems(dataset, process, seed=2, shuffle=True, block_size=1 << 18, rank=rank, world_size=3),
            2,
            32,
        )
        for rank in range(3)
    ]
    assert Counter(sum(per_rank, [])) == Counter(f"train-{i:07d}" for i in range(96))


# Each job, for each MDS directory in turn: marks itself ready, waits until all are, opens it at once with the
# others. Then it stays alive (its shared memory held) until all have opened all (or one failed: 20 s later).
_OPEN_AT_ONCE = """
import pathlib, sys, time
from flamingo_composer.data.mds import open_mds
meeting, job, jobs, directories = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
def all_marked(stage, wait_s):
    (meeting / f"{stage}-{job}").touch()
    until = time.time() + wait_s
    while len(list(meeting.glob(f"{stage}-*"))) < jobs and time.time() < until:
        time.sleep(0.001)
for i, local in enumerate(directories):
    all_marked(f"ready{i}", 180 if i == 0 else 20)  # the first waits for the imports
    print(open_mds(local)._shm_prefix_int, flush=True)
all_marked("opened", 20)
"""


def test_jobs_opening_mds_at_the_same_moment_each_get_their_own_shared_memory(root, tmp_path):
    """Streaming's shared-memory prefix is picked by a walk then a create: without open_mds's node lock, 4 jobs
    opening 2 directories at once collided (FileExistsError '/000000_locals') in 2 of 4 tries here."""
    jobs, directories = 4, [str(root / "mds" / name / "train") for name in ("laion", "mmc4")]
    launched = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AT_ONCE, str(tmp_path), str(job), str(jobs), *directories],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for job in range(jobs)
    ]  # fmt: skip
    results = [job.communicate(timeout=300) for job in launched]
    assert [job.returncode for job in launched] == [0] * jobs, [err[-1500:] for _, err in results]
    prefixes = {int(prefix) for out, _ in results for prefix in out.split()}
    assert len(prefixes) == jobs * len(directories)  # distinct, all alive at once (others may hold low ones)


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_opening_mds_holds_no_descriptor_of_other_jobs_shared_memory(root, tmp_path):
    """Killed jobs leave their shared-memory prefixes behind (here 30 stand-ins, first free ones on): opening a
    dataset must not keep each one's segments open (streaming 0.13 kept about 10 descriptors per prefix)."""
    import fcntl
    from multiprocessing.shared_memory import SharedMemory

    from streaming.base.constant import SHM_TO_CLEAN

    from flamingo_composer.data import mds

    local = tmp_path / "laion"
    shutil.copytree(root / "mds" / "laion" / "train", local / "train")  # a directory no one has opened
    stale = []
    with open(mds._SHM_REGISTRATION_LOCK, "a") as lock:  # no other job registers while the stand-ins appear
        fcntl.flock(lock, fcntl.LOCK_EX)
        prefix = 0
        while len(stale) < 30 * len(SHM_TO_CLEAN):
            names = [f"{prefix:06}_{name}" for name in SHM_TO_CLEAN]
            if not os.path.exists(f"/dev/shm/{names[0]}"):
                stale += [SharedMemory(name, create=True, size=8) for name in names]
            prefix += 1
    try:
        before = _open_descriptors()
        dataset = open_mds(str(local), None, "train")
        assert dataset.get_item(0)["key"]
        assert _open_descriptors() - before < 60  # its own segments and files; 300+ before the fix
    finally:
        for shm in stale:
            shm.close()
            shm.unlink()


def test_resampling_draws_different_streams_per_rank(root, process):
    urls = _shards(root, "train")
    keys = [
        _keys(WebDatasetItems(urls, process, seed=4, shuffle=True, shuffle_buffer=8, resample=True, rank=rank,
                              world_size=2), 0, 40)
        for rank in range(2)
    ]  # fmt: skip
    assert keys[0] != keys[1]
    assert all(len(k) == 40 for k in keys)


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_every_rank_yields_the_same_number_of_batches(root, fmt):
    """Ranks reject different numbers of samples but yield exactly len(loader) batches per epoch, each."""
    tok = tokenizer()
    cfg = data_config(root, fmt, laion={"num_workers": 2, "batch_size": 3}, mmc4={"num_workers": 1})
    lengths, positions = [], []
    with deadline(240, "two loader epochs on each of 3 ranks"):
        for rank in range(3):
            loader = build_dual_loader(cfg, tok, transform, rank=rank, world_size=3)
            counts = [sum(1 for _ in loader) for _ in range(2)]
            assert counts == [len(loader)] * 2
            lengths.append(len(loader))
            positions.append(loader.state_dict()["positions"]["laion"][0])
            loader.close()
    assert len(set(lengths)) == 1
    assert len(set(positions)) > 1, "ranks should have consumed different raw counts (rejections differ)"


def test_few_shards_warn_at_build(root, caplog):
    cfg = data_config(
        root, "wds", laion={"shards": _shards(root, "val"), "num_workers": 2}, mmc4={"enabled": False}
    )
    with caplog.at_level("WARNING"):
        build_dual_loader(cfg, tokenizer(), transform, rank=0, world_size=2)
    assert "splitting at sample level" in caplog.text
