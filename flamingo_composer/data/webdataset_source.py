"""Webdataset readers (both layouts): shard lists, shuffling, split by node/worker, resampling, shard errors.

Each rank reads an endless item stream (see `stream_items`): epoch after epoch, the shard list is shuffled with
(seed, epoch), split by rank, then by DataLoader worker; each worker reads its shards in turn, passes the raw
samples through a seeded shuffle buffer, and only then decodes and preprocesses them. With `resample`, every
worker instead draws shards with replacement, len(shards) per pass, from a generator seeded by (seed, rank,
worker, pass).

Fewer shards than ranks (or than workers per rank) would leave some readers with nothing: the webdataset trap
where a rank hangs or runs dry. Then that level falls back to splitting at sample level: every reader reads the
shards and keeps every k-th raw sample (with a warning, since each shard is read k times).

Shard errors (a `pipe:` command that fails, a remote URL that does not open, a truncated tar) end that shard with
one `shard_error` rejection item after the samples read before the failure; the stream goes on.

Resume: the item stream is a deterministic function of (urls, seed, rank, world size, num_workers), so
`WebDatasetItems(start=n)` continues exactly after the first n items: each worker re-reads its shards and drops
the raw samples it had already produced, without decoding them (the tar bytes are read again, nothing is
decoded or preprocessed). This is exact as long as the shards read the same bytes as before (a transient remote
failure changes the sequence) and the number of ranks and workers is unchanged.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset
from webdataset.filters import shuffle as shuffle_stage
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from flamingo_composer.data.config import is_remote_url, local_path
from flamingo_composer.data.skips import EMPTY_SHARDS, SHARD_ERROR, report_shard_once
from flamingo_composer.data.stream_items import (
    SampleProcessor,
    items_before,
    logical_worker,
    process_to_item,
    rejected,
    worker_info,
)

log = logging.getLogger(__name__)

_MARKER = "__marker__"


def _rng(*parts: Any) -> random.Random:
    """A generator seeded by a tuple of ints/strings (stable across processes, unlike hash())."""
    return random.Random("/".join(str(p) for p in parts))


def _members_until_error(files: Iterator[dict], errors: list[BaseException]) -> Iterator[dict]:
    """The tar's members up to the first failure, which is recorded instead of raised (so the grouping below
    still flushes the last complete sample)."""
    try:
        yield from files
    except Exception as err:  # tarfile/gopen/subprocess raise many types; the shard ends here
        errors.append(err)


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar shard ({'__key__', '__url__', ext: bytes}); a failure ends it with a marker.

    Every sample whose members were all read before the damage arrives (a sample is complete once the next
    key starts, or the stream ends). A `pipe:` command's exit status is checked when the stream closes, so a
    command that fails after writing part of a tar still yields the samples it delivered, then the marker.
    """
    errors: list[BaseException] = []
    stream = None
    try:
        stream = _TailRecorder(gopen(url, "rb"))
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
        yield from group_by_keys(_members_until_error(files, errors), handler=reraise_exception)
        if not errors:
            stream.drain()
            if stream.cut_short():
                errors.append(tarfile.ReadError(_CUT_MESSAGE))
        closing, stream = stream, None
        closing.close()
    except Exception as err:  # gopen fails, a duplicate member, a failing pipe's status: the shard ends here
        errors.append(err)
    if errors:
        err = errors[0]
        message = str(err.args[0]).split(" @ ")[0] if err.args else str(err)
        report_shard_once(log, url, "shard %s is damaged or failed (%s: %s): kept the samples before it", url,
                            type(err).__name__, message)
        yield {_MARKER: SHARD_ERROR, "__url__": url}


def split_plan(num_shards: int, world_size: int, num_workers: int) -> tuple[bool, bool]:
    """(split ranks by shard, split workers by shard); False = that level splits at sample level."""
    by_node = num_shards >= world_size
    shards_per_rank = num_shards // world_size if by_node else num_shards
    return by_node, shards_per_rank >= num_workers


def every_kth(stream: Iterator[dict], k: int, offset: int) -> Iterator[dict]:
    """Keep raw items number offset, offset + k, ... (sample-level split); markers count like samples."""
    return itertools.islice(stream, offset, None, k) if k > 1 else stream


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz
_END_BLOCK = bytes(tarfile.BLOCKSIZE)  # a tar ends with zero blocks; a cut one (even inside a header) does not
_CUT_MESSAGE = "no end-of-archive block: the tar is cut"


def _ends_like_a_tar(size: int, last_block: bytes) -> bool:
    """tarfile reads a header cut short as the end of the archive; the missing zero block tells the cut apart."""
    return size > 0 and size % tarfile.BLOCKSIZE == 0 and last_block == _END_BLOCK


class _TailRecorder:
    """A read-only byte stream that remembers its length and last block (for `_ends_like_a_tar`)."""

    def __init__(self, stream):
        self.stream, self.size, self.head, self.tail = stream, 0, b"", b""

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if len(self.head) < 6:
            self.head = (self.head + data)[:6]
        self.size += len(data)
        self.tail = (self.tail + data)[-tarfile.BLOCKSIZE :]
        return data

    def cut_short(self) -> bool:
        """After the whole stream was read: an uncompressed tar without its end block (compressed ones fail to
        decompress instead)."""
        return not self.head.startswith(_COMPRESSED_MAGIC) and not _ends_like_a_tar(self.size, self.tail)

    def drain(self) -> None:
        while self.read(1 << 16):
            pass

    def close(self) -> None:
        self.stream.close()


def _count_shard_samples(path: str) -> int:
    """Samples (distinct consecutive keys) of one local tar whose members all lie inside the file, from the
    headers only; raises `DamagedShard` at the first damage, holding the samples the reader delivers before it."""
    size = os.path.getsize(path)
    if size == 0:
        raise DamagedShard(0, "empty file (0 bytes)")
    with open(path, "rb") as handle:
        compressed = handle.read(6).startswith(_COMPRESSED_MAGIC)  # member offsets are not file offsets then
        handle.seek(max(0, size - tarfile.BLOCKSIZE))
        last_block = handle.read()
    count, previous = 0, None
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        raise DamagedShard(0, "not a readable tar archive") from None
    try:
        for member in tar:
            if not member.isreg():
                continue
            prefix, _ = base_plus_ext(member.name)
            if prefix != previous and previous is not None:
                count += 1  # the previous sample is complete: the next key started
            previous = prefix
            if not compressed and member.offset_data + member.size > size:
                raise DamagedShard(count, f"member {member.name!r} is cut off at the end of the file")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DamagedShard(count, f"{type(err).__name__}: {err}") from err
    finally:
        tar.close()
    count += previous is not None  # the stream ended: its last sample is flushed, as the reader does
    if not compressed and not _ends_like_a_tar(size, last_block):
        raise DamagedShard(count, _CUT_MESSAGE)
    return count


class DamagedShard(Exception):
    """A local shard that is cut, empty or not a tar; `count` = its complete samples before the damage."""

    def __init__(self, count: int, reason: str):
        super().__init__(reason)
        self.count = count


def count_local_samples(urls: list[str]) -> int:
    """Number of samples in local tar shards, reading headers only (an epoch's length when epoch_size is unset).

    A damaged shard counts the complete samples before the damage and is reported once, naming the file; the
    run goes on (the reader skips the damage the same way). Only shards holding no readable sample at all stop
    the run here, naming them.
    """
    total, damaged = 0, []
    for url in urls:
        if is_remote_url(url):
            raise ValueError(
                f"epoch_size: required for remote webdataset shards (cannot count the samples of {url})"
            )
        path = local_path(url)
        try:
            total += _count_shard_samples(path)
        except DamagedShard as err:
            total += err.count
            damaged.append(path)
            report_shard_once(log, url, "shard %s is damaged (%s): counted its %d complete samples before the damage",
                                path, err, err.count)
    if total == 0:
        shown = ", ".join(urls[:5]) + (f" (and {len(urls) - 5} more)" if len(urls) > 5 else "")
        broken = f"; damaged or not a tar: {', '.join(damaged[:5])}" if damaged else ""
        raise ValueError(f"shards: no readable sample in {shown}{broken}")
    return total


class WebDatasetItems(IterableDataset):
    """One rank's endless item stream over webdataset shards (one item per raw sample or shard failure)."""

    def __init__(
        self,
        urls: list[str],
        process: SampleProcessor,
        *,
        seed: int,
        shuffle: bool,
        shuffle_buffer: int,
        resample: bool,
        rank: int,
        world_size: int,
        start: int = 0,
    ):
        super().__init__()
        if not urls:
            raise ValueError("WebDatasetItems: empty shard list")
        if not 0 <= rank < world_size:
            raise ValueError(f"WebDatasetItems: rank {rank} is not in [0, {world_size})")
        self.urls, self.process = list(urls), process
        self.seed, self.shuffle, self.shuffle_buffer, self.resample = seed, shuffle, shuffle_buffer, resample
        self.rank, self.world_size, self.start = rank, world_size, start

    def _epoch_shards(self, epoch: int, logical: int, num_workers: int) -> list[str]:
        """This reader's shards for one pass: the (seed, epoch)-shuffled list, split by rank and worker."""
        order = list(self.urls)
        if self.shuffle:
            _rng(self.seed, "shards", epoch).shuffle(order)
        by_node, by_worker = split_plan(len(order), self.world_size, num_workers)
        if by_node:
            order = order[self.rank :: self.world_size]
        if by_worker:
            order = order[logical::num_workers]
        return order

    def _split_raw(self, logical: int, num_workers: int) -> Iterator[dict]:
        """Endless raw samples (with '__epoch__') of this reader, before the shuffle buffer."""
        by_node, by_worker = split_plan(len(self.urls), self.world_size, num_workers)
        stream = self._pass_raw(logical, num_workers)
        if not by_node:
            stream = every_kth(stream, self.world_size, self.rank)
        if not by_worker:
            stream = every_kth(stream, num_workers, logical)
        return stream

    def _pass_raw(self, logical: int, num_workers: int) -> Iterator[dict]:
        """Endless raw samples, pass after pass (or draw after draw). A pass that yields nothing at all (every
        shard empty) yields one `empty_shards` marker, so the main process counts it instead of waiting forever."""
        for epoch in itertools.count():
            if self.resample:
                rng = _rng(self.seed, "resample", self.rank, logical, epoch)
                shards = [
                    self.urls[rng.randrange(len(self.urls))] for _ in self.urls
                ]  # one pass = len(urls) draws
            else:
                shards = self._epoch_shards(epoch, logical, num_workers)
            produced = 0
            for url in shards:
                for sample in shard_samples(url):
                    sample["__epoch__"] = epoch
                    produced += 1
                    yield sample
            if not produced:
                yield {_MARKER: EMPTY_SHARDS, "__url__": ",".join(shards[:3])}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_info()
        logical = logical_worker(worker, num_workers, self.start)
        raw = self._split_raw(logical, num_workers)
        if self.shuffle and self.shuffle_buffer > 1:
            buffer_rng = _rng(self.seed, "buffer", self.rank, logical)
            raw = shuffle_stage(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=buffer_rng)(raw)
        # Resume: drop (unread by preprocessing) the raw samples this worker produced before `start`.
        raw = itertools.islice(raw, items_before(self.start, logical, num_workers), None)
        for sample in raw:
            if _MARKER in sample:
                yield rejected(sample[_MARKER], sample["__url__"], source=sample["__url__"])
            else:
                yield process_to_item(
                    self.process, sample, epoch=sample["__epoch__"], key=sample["__key__"], source=sample["__url__"]
                )
