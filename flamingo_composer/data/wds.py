"""Webdataset readers (both layouts): shard lists, shuffling, split by node/worker, resampling, shard errors, and
resume in O(1 shard).

Each rank reads an endless item stream (see `items`); each of its DataLoader workers is one *reader*.
Pass after pass, the shard list is shuffled with (seed, pass), split by rank, then by worker; a reader reads its
shards in turn, passes each shard's raw samples through a seeded shuffle buffer, and only then decodes and
preprocesses them. With `resample`, a reader instead draws len(shards) shards per pass with replacement, from a
generator seeded by (seed, rank, worker, pass).

Fewer shards than ranks (or than workers per rank) would leave some readers with nothing: the webdataset trap
where a rank hangs or runs dry. Then that level falls back to splitting at sample level: every reader reads the
shards and keeps every k-th raw sample of its own raw stream (with a warning, since each shard is read k times).

Shard errors (a `pipe:` command that fails, a remote URL that does not open, a truncated tar) end that shard with
one `shard_error` rejection item after the samples read before the failure; the stream goes on.

The shuffle buffer is drained at every shard boundary (webdataset's usual buffer carries samples across shards).
That is what makes resume cheap: a reader's position is a `ShardCursor` (pass, index in that pass's shard list,
outputs already taken from that shard, and the sample-split phase), and its output from there on depends on
nothing read before that shard. Storing the buffer's contents instead would mean re-reading the earlier shards
they came from (a `pipe:` shard fetched again per buffered shard), and a buffer of 1000 can span many small
shards. The price is mixing: samples of one shard are permuted among themselves only (fully, when the shard is
no larger than the buffer). Across shards the stream is still mixed: the shard order is reshuffled every pass,
each rank reads other shards, and a rank's batches interleave its W workers' shards. With the usual shard sizes
(about 10k LAION pairs or 1-2k MMC4 documents per tar, buffer 1000), a cross-shard buffer would also hold almost
only the current shard's samples, so the difference is in the ~buffer samples around each boundary.

Resume: every item carries its reader's cursor just after it (`items.CURSOR`); the batcher keeps the
latest cursor per logical worker and the loader's state stores them per rank. `WebDatasetItems(start, cursors)`
then opens each reader's cursor shard (a `pipe:` shard is fetched once; nothing before it is read), drops the
outputs already consumed without decoding them and continues: at most one shard of raw samples is read before
the first new item (a cursor after a shard's last output points at the next shard; only shards that give a
reader no sample at all, in a sample-level split of shards smaller than the split, are read on top). This is
exact when the shards read the same bytes as before (a transient remote failure changes the sequence) and the
numbers of shards, ranks and workers are unchanged (a changed shard list is logged by each reader). When ranks
or workers changed, a reader's shard list is a different one and no exact position exists: `cursors_near`
starts every new reader at the start of a shard at the saved readers' mean progress (pass + fraction of the
pass); the loader logs this as a warning. Samples near the checkpoint may then be read twice or skipped;
nothing is replayed from pass 0.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset
from webdataset.filters import shuffle as shuffle_stage
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from flamingo_composer.data.config import is_remote_url, local_path
from flamingo_composer.data.items import (
    CURSOR,
    EMPTY_SHARDS,
    SHARD_ERROR,
    SampleProcessor,
    logical_worker,
    process_to_item,
    rejected,
    report_shard_once,
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


def sample_split(num_shards: int, rank: int, world_size: int, logical: int, num_workers: int) -> tuple[int, int]:
    """(k, offset): a reader keeps the raw samples offset, offset + k, ... of its raw stream (k = 1: all).

    Sample-level splits of both levels combine into one: every R-th raw sample for the rank, of those every W-th
    for the worker, i.e. every (R * W)-th starting at rank + R * worker.
    """
    by_node, by_worker = split_plan(num_shards, world_size, num_workers)
    ranks = 1 if by_node else world_size
    workers = 1 if by_worker else num_workers
    return ranks * workers, (0 if by_node else rank) + ranks * (0 if by_worker else logical)


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


def _with_last(items: Iterator[Any]) -> Iterator[tuple[Any, bool]]:
    """(item, is it the last one) for each item: one item of look-ahead."""
    previous, started = None, False
    for item in items:
        if started:
            yield previous, False
        previous, started = item, True
    if started:
        yield previous, True


class _Counted:
    """An iterator that counts the items taken from it."""

    def __init__(self, items: Iterator[Any]):
        self.items, self.count = items, 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        item = next(self.items)
        self.count += 1
        return item


@dataclass(frozen=True)
class ShardCursor:
    """Where a reader's stream continues: pass `epoch`, shard number `shard` of that pass's list (`shards` long),
    after the first `offset` outputs of that shard (split, then buffer-shuffled); `phase` = raw samples this
    reader read before that shard, modulo the sample-split factor k (which raw samples of the shard it keeps)."""

    epoch: int = 0
    shard: int = 0
    offset: int = 0
    shards: int = 1
    phase: int = 0

    def to_state(self) -> list[int]:
        return [self.epoch, self.shard, self.offset, self.shards, self.phase]

    @classmethod
    def from_state(cls, value: Any) -> ShardCursor:
        if not (
            isinstance(value, list | tuple)
            and len(value) == 5
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        ):
            raise ValueError(
                f"data loader state: a webdataset cursor must be 5 ints >= 0 "
                f"[pass, shard, offset, shards, phase], got {value!r}"
            )
        return cls(*value)

    @property
    def progress(self) -> float:
        """Passes completed, with the fraction of the current one (shards done / shards in the pass)."""
        return self.epoch + self.shard / max(self.shards, 1)


class WebDatasetItems(IterableDataset):
    """One rank's endless item stream over webdataset shards (one item per raw sample or shard failure).

    `start`: items the main process already consumed (it fixes which worker plays which reader's role);
    `cursors`: per logical worker, the `ShardCursor.to_state()` it continues from (None: from the beginning).
    """

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
        cursors: Sequence[Sequence[int] | None] | None = None,
    ):
        super().__init__()
        if not urls:
            raise ValueError("WebDatasetItems: empty shard list")
        if not 0 <= rank < world_size:
            raise ValueError(f"WebDatasetItems: rank {rank} is not in [0, {world_size})")
        if start > 0 and cursors is None:
            raise ValueError(f"WebDatasetItems: start={start} needs the readers' cursors (from the loader state)")
        self.urls, self.process = list(urls), process
        self.seed, self.shuffle, self.shuffle_buffer, self.resample = seed, shuffle, shuffle_buffer, resample
        self.rank, self.world_size, self.start = rank, world_size, start
        self.cursors = None if cursors is None else [None if c is None else ShardCursor.from_state(c) for c in cursors]

    def _pass_shards(self, epoch: int, logical: int, num_workers: int) -> list[str]:
        """This reader's shards for one pass: the (seed, epoch)-shuffled list split by rank and worker, or
        len(urls) draws with replacement (`resample`)."""
        if self.resample:
            rng = _rng(self.seed, "resample", self.rank, logical, epoch)
            return [self.urls[rng.randrange(len(self.urls))] for _ in self.urls]
        order = list(self.urls)
        if self.shuffle:
            _rng(self.seed, "shards", epoch).shuffle(order)
        by_node, by_worker = split_plan(len(order), self.world_size, num_workers)
        if by_node:
            order = order[self.rank :: self.world_size]
        if by_worker:
            order = order[logical::num_workers]
        return order

    def cursors_near(self, saved: Sequence[Sequence[int] | None], num_workers: int) -> list[list[int]]:
        """Start cursors for this rank's `num_workers` readers when the saved readers (any ranks and workers,
        None = not started) had another layout: each starts at a shard boundary at their mean progress."""
        progress = [ShardCursor.from_state(c).progress if c is not None else 0.0 for c in saved] or [0.0]
        epoch, fraction = divmod(sum(progress) / len(progress), 1.0)
        out = []
        for logical in range(num_workers):
            shards = len(self._pass_shards(int(epoch), logical, num_workers))
            out.append(ShardCursor(int(epoch), min(int(fraction * shards), shards - 1), 0, shards, 0).to_state())
        return out

    def _shard_outputs(self, raw: _Counted, epoch: int, index: int, logical: int, split: tuple[int, int],
                       phase: int) -> Iterator[dict]:
        """One shard's outputs for this reader: of its raw samples `raw`, those this reader keeps (see
        `sample_split`), buffer-shuffled within the shard."""
        k, offset = split
        stream: Iterator[dict] = raw
        if k > 1:
            stream = itertools.islice(stream, (offset - phase) % k, None, k)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = _rng(self.seed, "buffer", self.rank, logical, epoch, index)
            stream = shuffle_stage(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream)
        return stream

    def _reader_samples(
        self, logical: int, num_workers: int, cursor: ShardCursor
    ) -> Iterator[tuple[dict, ShardCursor]]:
        """Endless raw samples of one reader from `cursor` on, each with the cursor just after it. A pass that
        reads nothing at all (every shard empty) yields one `empty_shards` marker, so the main process counts it
        instead of waiting forever."""
        split = sample_split(len(self.urls), self.rank, self.world_size, logical, num_workers)
        phase = cursor.phase
        for epoch in itertools.count(cursor.epoch):
            shards = self._pass_shards(epoch, logical, num_workers)
            resuming = epoch == cursor.epoch
            produced = resuming and (cursor.shard > 0 or cursor.offset > 0)  # an earlier shard of it was read
            if resuming and produced and cursor.shards != len(shards):
                log.warning("webdataset reader %d of rank %d: its pass had %d shards at the checkpoint, %d now (the "
                            "shard list changed): it continues at shard %d, not at the exact sample", logical,
                            self.rank, cursor.shards, len(shards), cursor.shard)  # fmt: skip
            for index in range(cursor.shard if resuming else 0, len(shards)):
                skip = cursor.offset if resuming and index == cursor.shard else 0
                raw, done = _Counted(shard_samples(shards[index])), 0  # raw.count: for the next shard's phase
                outputs = self._shard_outputs(raw, epoch, index, logical, split, phase)
                for done, (sample, last) in enumerate(_with_last(outputs), 1):
                    if done <= skip:  # consumed before the checkpoint: dropped undecoded
                        continue
                    if not last:
                        yield sample, ShardCursor(epoch, index, done, len(shards), phase)
                        continue
                    # The shard's last output points past the shard, so a resume does not re-read it to find
                    # its end (the shard is read to its end by now, so raw.count is final).
                    following = (phase + raw.count) % split[0]
                    if index + 1 < len(shards):
                        yield sample, ShardCursor(epoch, index + 1, 0, len(shards), following)
                    else:
                        yield sample, ShardCursor(epoch + 1, 0, 0, len(shards), following)
                if skip and done <= skip:  # before the checkpoint it had outputs after the first `skip`
                    log.warning("shard %s gave %d samples on resume, more than %d before the checkpoint: it "
                                "changed since; continuing with the next shard", shards[index], done, skip)
                produced = produced or raw.count > 0
                phase = (phase + raw.count) % split[0]
            if not produced:
                marker = {_MARKER: EMPTY_SHARDS, "__url__": ",".join(shards[:3])}
                yield marker, ShardCursor(epoch + 1, 0, 0, len(shards), phase)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_info()
        logical = logical_worker(worker, num_workers, self.start)
        if self.cursors is not None and len(self.cursors) != num_workers:
            raise ValueError(f"WebDatasetItems: {len(self.cursors)} reader cursors for {num_workers} workers")
        cursor = (self.cursors[logical] if self.cursors else None) or ShardCursor()
        for sample, after in self._reader_samples(logical, num_workers, cursor):
            if _MARKER in sample:
                item = rejected(sample[_MARKER], sample["__url__"], source=sample["__url__"])
            else:
                item = process_to_item(
                    self.process, sample, epoch=after.epoch, key=sample["__key__"], source=sample["__url__"]
                )
            item[CURSOR] = after.to_state()
            yield item
