"""Bad shards and bad samples are skipped and counted by reason (also when workers made the counts)."""

from __future__ import annotations

import io
import itertools
import logging
import re
import shutil
import tarfile
from collections import Counter

import pytest
from data_loader_helpers import data_config, deadline, laion_config, mmc4_config
from data_loader_helpers import image_transform as transform

from flamingo_composer.data.config import DataConfig
from flamingo_composer.data.dual_loader import NAMED_REJECTIONS_PER_REASON, build_dual_loader
from flamingo_composer.data.mds import open_mds
from flamingo_composer.data.wds import count_local_samples, shard_samples


def _totals(loader, batches: int) -> tuple[dict[str, Counter], dict[str, list]]:
    """Summed skip counts per dataset and the accepted keys, over `batches` batches."""
    skipped, keys = {}, {}
    for batch in itertools.islice(iter(loader), batches):
        for name, sub in batch.items():
            skipped.setdefault(name, Counter()).update(sub["skipped"])
            keys.setdefault(name, []).extend(sub["keys"])
            # Every consumed item is either in a batch or counted.
            assert sub["position"] == len(keys[name]) + sum(skipped[name].values())
    return skipped, keys


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_skip_counts_made_in_workers_reach_the_batches(root, tok, fmt):
    """Bad samples of every kind are counted by reason; with 2 workers the counts equal those without."""

    def run(workers: int):
        cfg = data_config(root, fmt, laion={"num_workers": workers, "shuffle": False},
                          mmc4={"num_workers": workers, "shuffle": False})  # fmt: skip
        loader = build_dual_loader(cfg, tok, transform, rank=0, world_size=1, return_keys=True)
        try:
            return _totals(loader, 15)
        finally:
            loader.close()

    with deadline(240, "15 batches with and without workers"):
        in_workers, in_workers_keys = run(2)
        in_main, in_main_keys = run(0)
    # Unshuffled, the first 15 LAION batches read samples 0..~70 where every 7th is broken in one of 3 ways.
    assert {"corrupt_image", "empty_caption", "missing_image"} <= set(in_workers["laion"])
    bad_mmc4 = (
        {"bad_base64", "bad_similarity_matrix", "malformed_json"}
        if fmt == "wds"
        else {"missing_image", "bad_similarity_matrix", "malformed_json"}
    )  # MDS stores invalid base64 as no bytes
    assert bad_mmc4 <= set(in_workers["mmc4"])
    if fmt == "mds":  # same order for any number of workers: the counts must agree exactly
        assert in_workers == in_main and in_workers_keys == in_main_keys
    else:
        assert sum(in_workers["laion"].values()) > 0


def test_truncated_tar_and_failing_pipe_are_skipped_and_counted(root, tok, tmp_path):
    good = root / "wds" / "laion" / "train-000001.tar"
    data = (root / "wds" / "laion" / "train-000000.tar").read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])  # cut mid-member
    shards = [str(truncated), "pipe:false", f"pipe:cat {good}", "pipe:exit 3"]
    cfg = DataConfig(
        {"laion": laion_config(root, "wds", shards=shards, shuffle=False, num_workers=2, epoch_size=16)}
    )
    loader = build_dual_loader(cfg, tok, transform, rank=0, world_size=1, return_keys=True)
    with deadline(120, "reading broken shards"):
        skipped, keys = _totals(loader, 12)  # 48 samples: several passes over the two readable halves
    loader.close()
    laion_keys = set(keys["laion"])
    assert any(key < "train-0000016" for key in laion_keys), "samples before the truncation point are kept"
    assert any(key >= "train-0000016" for key in laion_keys), "the shard behind the failures is read"
    assert skipped["laion"]["shard_error"] >= 3  # the truncated tar and both failing commands, at least once


@pytest.mark.parametrize("broken", ["pipe:false", "empty.tar"])
def test_nothing_usable_stops_with_a_clear_error_instead_of_spinning(root, tok, tmp_path, broken):
    if broken == "empty.tar":
        tarfile.open(tmp_path / broken, "w").close()  # a valid tar without members
        broken, reason = str(tmp_path / broken), "empty_shards"
    else:
        reason = "shard_error"
    cfg = DataConfig({"mmc4": mmc4_config(root, "wds", shards=broken, epoch_size=10, max_consecutive_skips=5)})
    loader = build_dual_loader(cfg, tok, transform, rank=0, world_size=1)
    with deadline(60, "a stream without samples"), pytest.raises(RuntimeError, match=reason):
        next(iter(loader))
    loader.close()


def test_remote_mds_is_cached_and_a_missing_remote_shard_is_skipped(root, tok, tmp_path):
    """MDS from a remote (here a directory streaming copies from): same stream as local; a shard missing on
    the remote is counted as shard_error for each of its samples, and never blocks the other workers."""

    def run(**laion):
        cfg = data_config(root, "mds", laion={"num_workers": 2, **laion}, mmc4={"enabled": False})
        loader = build_dual_loader(cfg, tok, transform, rank=0, world_size=1, return_keys=True)
        try:
            return _totals(loader, 20)
        finally:
            loader.close()

    local_skips, local_keys = run()
    remote = tmp_path / "remote"
    shutil.copytree(root / "mds" / "laion" / "train", remote)
    cached_skips, cached_keys = run(remote=str(remote), local=str(tmp_path / "cache1"))
    assert (cached_skips, cached_keys) == (local_skips, local_keys)
    assert sorted(p.name for p in (tmp_path / "cache1").glob("shard.*.mds")) == sorted(
        p.name for p in remote.glob("shard.*.mds")
    )

    (remote / "shard.00002.mds").unlink()
    with deadline(120, "reading an MDS remote with a missing shard"):
        broken_skips, broken_keys = run(remote=str(remote), local=str(tmp_path / "cache2"))
    assert broken_skips["laion"]["shard_error"] > 0
    local = open_mds(str(root / "mds" / "laion" / "train"))
    first = int(local.samples_per_shard[:2].sum())
    lost = {local.get_item(i)["key"] for i in range(first, first + int(local.samples_per_shard[2]))}
    assert lost and not lost & set(broken_keys["laion"])
    assert len(broken_keys["laion"]) == len(local_keys["laion"])  # batches are still full


# ------------------------------------------------------------------------------------ damaged local shards


def _tar_of(path, keys: list[str]) -> None:
    """A tar with one 600-byte `.json` member per key (one member per sample, like MMC4 shards)."""
    with tarfile.open(path, "w") as tar:
        for key in keys:
            data = (f'{{"key": "{key}"}}' + " " * 600).encode()
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _cut_inside_member(path, index: int) -> None:
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[index].offset_data + 10
    path.write_bytes(path.read_bytes()[:cut])


def test_a_tar_cut_inside_a_member_keeps_every_complete_sample_before_it(tmp_path):
    shard = tmp_path / "cut.tar"
    _tar_of(shard, ["good_a", "good_b", "good_c"])
    _cut_inside_member(shard, 2)
    assert [s.get("__key__", s.get("__marker__")) for s in shard_samples(str(shard))] == [
        "good_a", "good_b", "shard_error"
    ]  # fmt: skip


def test_a_tar_cut_inside_a_header_is_noticed(tmp_path, caplog):
    """tarfile reads a header cut short as the end of the archive; the missing end block gives it away."""
    shard = tmp_path / "cut.tar"
    _tar_of(shard, ["good_a", "good_b", "good_c"])
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[2].offset + 100
    shard.write_bytes(shard.read_bytes()[:cut])
    assert [s.get("__key__", s.get("__marker__")) for s in shard_samples(str(shard))] == [
        "good_a", "good_b", "shard_error"
    ]  # fmt: skip
    caplog.set_level(logging.WARNING)
    assert count_local_samples([str(shard)]) == 2
    assert any("no end-of-archive block" in message for message in _shard_warnings(caplog, str(shard)))


def _damaged_shards(root, tmp_path) -> dict[str, str]:
    good = root / "wds" / "laion" / "train-000000.tar"
    truncated = tmp_path / "truncated.tar"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    (tmp_path / "zero.tar").write_bytes(b"")
    (tmp_path / "notatar.tar").write_bytes(b"<html>404 Not Found</html>" * 40)
    return {"good": str(good), "truncated": str(truncated), "zero": str(tmp_path / "zero.tar"),
            "notatar": str(tmp_path / "notatar.tar")}  # fmt: skip


def _shard_warnings(caplog, path: str) -> list[str]:
    """Warnings about the shard itself (not the named rejections of samples read from it)."""
    return [
        r.getMessage() for r in caplog.records
        if r.levelname == "WARNING" and r.getMessage().startswith(("shard ", "MDS shard ")) and path in r.getMessage()
    ]  # fmt: skip


def test_damaged_shards_are_counted_for_what_they_hold_and_named_once(root, tmp_path, caplog):
    shards = _damaged_shards(root, tmp_path)
    complete = len(list(shard_samples(shards["good"])))
    before_damage = len([s for s in shard_samples(shards["truncated"]) if "__key__" in s])
    caplog.set_level(logging.WARNING)
    assert count_local_samples(list(shards.values())) == complete + before_damage
    count_local_samples(list(shards.values()))  # a second count (another loader) reports nothing new
    for name in ("truncated", "zero", "notatar"):
        assert len(_shard_warnings(caplog, shards[name])) == 1, name
    assert not _shard_warnings(caplog, shards["good"])
    with pytest.raises(ValueError, match="no readable sample") as error:
        count_local_samples([shards["zero"], shards["notatar"]])
    assert shards["zero"] in str(error.value) and shards["notatar"] in str(error.value)


def test_a_default_config_trains_past_damaged_shards_and_warns_once_per_shard(root, tok, tmp_path, caplog):
    """epoch_size unset: the loader counts the local shards itself; damage must not stop it at start-up."""
    shards = _damaged_shards(root, tmp_path)
    cfg = DataConfig({"laion": laion_config(root, "wds", shards=list(shards.values()), shuffle=False)})
    caplog.set_level(logging.WARNING)
    loader = build_dual_loader(cfg, tok, transform, rank=0, world_size=1)
    assert len(loader) >= 1
    skipped = Counter()
    with deadline(120, "several passes over damaged shards"):
        for _ in range(3):  # 3 loader epochs: about 3 passes over the shards
            for batch in loader:
                skipped.update(batch["laion"]["skipped"])
    loader.close()
    assert skipped["shard_error"] >= 3 * 2  # 3 damaged shards, each counted on every pass
    for name in ("truncated", "zero", "notatar"):
        assert len(_shard_warnings(caplog, shards[name])) == 1, name  # counted every pass, named once


def test_rejected_samples_are_named_with_shard_and_key(root, tok, caplog):
    cfg = data_config(root, "wds", laion={"shuffle": False}, mmc4={"shuffle": False})
    caplog.set_level(logging.WARNING)
    loader = build_dual_loader(cfg, tok, transform, rank=0, world_size=1, return_keys=True)
    skipped, _ = _totals(loader, 30)
    loader.close()
    named = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    for dataset, counts in skipped.items():
        for reason, count in counts.items():
            lines = [m for m in named if m.startswith(f"{dataset}: ") and f": {reason}" in m]
            assert len(lines) == min(count, NAMED_REJECTIONS_PER_REASON), (dataset, reason)
            assert all(f"{root}/wds/{dataset}/train-" in line for line in lines)  # the shard is named
    corrupt = next(m for m in named if ": corrupt_image" in m)
    assert re.search(r"skipped sample '[^']+' from \S+\.tar: corrupt_image \(", corrupt)  # key and detail


def test_shards_may_name_a_directory_of_tars(root, tmp_path):
    cfg = laion_config(root, "wds", shards=str(root / "wds" / "laion"))
    assert cfg.shard_urls() == sorted(str(p) for p in (root / "wds" / "laion").glob("*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"directory '{tmp_path / 'empty'}' holds no \\*.tar file"):
        laion_config(root, "wds", shards=str(tmp_path / "empty"))
