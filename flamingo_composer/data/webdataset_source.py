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
import random
import tarfile
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset
from webdataset.filters import shuffle as shuffle_stage
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from flamingo_composer.data.config import is_remote_url, local_path
from flamingo_composer.data.stream_items import (
    SampleProcessor,
    items_before,
    logical_worker,
    process_to_item,
    rejected,
    worker_info,
)

log = logging.getLogger(__name__)

SHARD_ERROR = "shard_error"
EMPTY_SHARDS = "empty_shards"  # a whole pass over this reader's shards held no sample
_MARKER = "__marker__"


def _rng(*parts: Any) -> random.Random:
    """A generator seeded by a tuple of ints/strings (stable across processes, unlike hash())."""
    return random.Random("/".join(str(p) for p in parts))


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar shard ({'__key__', '__url__', ext: bytes}); a failure ends it with a marker.

    A `pipe:` command's exit status is checked when the stream closes, so a command that fails after writing
    part of a tar still yields the samples it delivered, then the marker.
    """
    stream = None
    try:
        stream = gopen(url, "rb")
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
        yield from group_by_keys(files, handler=reraise_exception)
        closing, stream = stream, None
        closing.close()
    except Exception as err:  # gopen/tarfile/subprocess raise many types; the shard is skipped, never the run
        log.warning("skipping the rest of shard %s: %s: %s", url, type(err).__name__, err)
        yield {_MARKER: SHARD_ERROR, "__url__": url}
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # already failing or abandoned: the status no longer matters
                pass


def split_plan(num_shards: int, world_size: int, num_workers: int) -> tuple[bool, bool]:
    """(split ranks by shard, split workers by shard); False = that level splits at sample level."""
    by_node = num_shards >= world_size
    shards_per_rank = num_shards // world_size if by_node else num_shards
    return by_node, shards_per_rank >= num_workers


def every_kth(stream: Iterator[dict], k: int, offset: int) -> Iterator[dict]:
    """Keep raw items number offset, offset + k, ... (sample-level split); markers count like samples."""
    return itertools.islice(stream, offset, None, k) if k > 1 else stream


def count_local_samples(urls: list[str]) -> int:
    """Number of samples (distinct consecutive keys) in local tar shards, reading headers only."""
    total = 0
    for url in urls:
        if is_remote_url(url):
            raise ValueError(
                f"epoch_size: required for remote webdataset shards (cannot count the samples of {url})"
            )
        previous = None
        with tarfile.open(local_path(url), "r:*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                prefix, _ = base_plus_ext(member.name)
                if prefix is not None and prefix != previous:
                    total += 1
                    previous = prefix
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
                yield rejected(sample[_MARKER], sample["__url__"])
            else:
                yield process_to_item(self.process, sample, epoch=sample["__epoch__"], key=sample["__key__"])
