"""What a reader hands the batcher: one item per raw sample (a preprocessed sample or a rejection with its reason),
which DataLoader worker yields which item, and the per-sample random generator.

Readers (`wds`, `mds`) run the expensive part (read, decode, preprocess or reject) in DataLoader workers and yield
exactly one item per raw sample: `{'sample': tensors, 'key': k}` or a rejection marker `{'skip': reason, 'key': k}`.
The DataLoader runs with `batch_size=None`, so it hands items to the main process in strict round robin over its
workers (item i comes from worker i % W). A reader therefore defines ONE endless item sequence per rank, lets
worker w produce the items i = start + w + k*W, and the main process sees that sequence in order, whatever W
is. The data position is then simply the number of items the main process has consumed.

A reader whose position is more than that count (webdataset: which shard, how far into it) also puts its own
position just after the item into `item[CURSOR]`; `note_cursor` keeps the latest one per logical worker, so
the loader state holds where every worker continues.

Rejections: preprocessing raises `SkipSample(reason)` for anything it cannot turn into a training row; the item
carries the reason, and the batcher (main process) counts it in a `SkipCounter`, so the counts reach the trainer
(`batch['skipped']`) even though workers made them. A kept document may still lose some of its images (corrupt,
missing, too small): its processor lists them under `DROPPED_IMAGES`, which travels in the item the same way and
is counted apart (`batch['dropped_images']`), since `skipped` counts whole samples.

Random choices (flip, single-image drop) come from `sample_rng(seed, epoch, key)`, so a sample gets the same
choices whatever worker, rank or resume point reads it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

CURSOR = "cursor"  # item key: the producing reader's position after this item (see `note_cursor`)
SHARD_ERROR = "shard_error"  # a shard (tar, pipe, MDS shard) that failed to open or read; the reader reports it
EMPTY_SHARDS = "empty_shards"  # a whole pass over a reader's shards held no sample

# Reasons used by this package (readers may add their own short snake_case reasons).
KNOWN_REASONS = (
    "corrupt_image",  # bytes present but not decodable as an image
    "missing_image",  # no image bytes at all
    "image_too_small",  # fewer bytes than the configured minimum
    "bad_base64",  # image_base64 is not valid base64
    "malformed_json",  # a document field is missing or has the wrong type (the detail names it)
    "bad_similarity_matrix",  # similarity_matrix is not images x sentences of finite numbers
    "no_usable_image",  # an MMC4 document whose images all failed for different reasons
    "low_similarity",  # no image-sentence pair reaches the similarity threshold
    "too_few_images",  # fewer than min_num_images <image> tokens survive truncation
    "single_image_dropped",  # the random drop of single-image MMC4 documents
    "empty_caption",  # nothing left of the caption after cleaning
    "bad_utf8",  # text bytes that are not UTF-8
    "no_supervised_tokens",  # the row's labels would be all -100
    "misaligned_lists",  # a natural-order document whose texts/images lists do not give one item per position
    "consecutive_images",  # a natural-order document with three or more images in a row (no text between)
    "trailing_images",  # a natural-order document ending in two or more images (no text after them)
    SHARD_ERROR,
    EMPTY_SHARDS,
)

DROPPED_IMAGES = "dropped_images"  # item key: [(reason, detail)] of the images a kept sample lost

SampleProcessor = Callable[..., Mapping[str, torch.Tensor]]  # process(raw, *, epoch, key) -> tensors / SkipSample


# ---------------------------------------------------------------------------------------------------------------
# Rejections and their counts.


class SkipSample(Exception):
    """Raised by per-sample preprocessing: the sample is dropped and counted under `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class SkipCounter(Mapping):
    """Per-reason skip counts since the last `take()`; reads like a `dict[str, int]`."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self._counts[reason] = self._counts.get(reason, 0) + int(n)

    def take(self) -> dict[str, int]:
        """Return the counts gathered since the previous take and start again from zero."""
        counts, self._counts = self._counts, {}
        return counts

    def __getitem__(self, reason: str) -> int:
        return self._counts[reason]

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def __repr__(self) -> str:
        return f"SkipCounter({self._counts!r})"


_REPORTED_SHARDS: set[str] = set()  # shards this process already reported (a broken shard is re-read every pass)


def report_shard_once(log: logging.Logger, shard: str, message: str, *args) -> None:
    """Warn about a failing shard the first time this process meets it; later passes only count it."""
    if shard in _REPORTED_SHARDS:
        return
    _REPORTED_SHARDS.add(shard)
    log.warning(f"{message} (reported once per shard; later passes only count it as {SHARD_ERROR})", *args)


# ---------------------------------------------------------------------------------------------------------------
# Items.


def accepted(sample: Mapping[str, torch.Tensor], key: Any) -> dict[str, Any]:
    return {"sample": sample, "key": key}


def with_dropped_images(sample: dict[str, Any], dropped: list[SkipSample]) -> dict[str, Any]:
    """`sample` noting the images it lost (`dropped`, one SkipSample each), for `process_to_item` to move into the
    item; a sample that lost none is returned as it is."""
    if dropped:
        sample[DROPPED_IMAGES] = [(skip.reason, skip.detail) for skip in dropped]
    return sample


def rejected(reason: str, key: Any = None, *, source: str | None = None, detail: str = "") -> dict[str, Any]:
    """A rejection marker: why, which sample (`key`), from where (`source`: shard URL or MDS shard)."""
    return {"skip": reason, "key": key, "source": source, "detail": detail}


def is_rejected(item: Mapping[str, Any]) -> bool:
    return "skip" in item


def process_to_item(
    process: SampleProcessor, raw: Mapping[str, Any], *, epoch: int, key: Any, source: str | None = None
) -> dict[str, Any]:
    """Run per-sample preprocessing; a `SkipSample` becomes a rejection marker carrying its reason and detail. The
    images a kept sample lost (`with_dropped_images`) move from the sample into the item, with the sample's source."""
    try:
        sample = process(raw, epoch=epoch, key=key)
    except SkipSample as skip:
        return rejected(skip.reason, key, source=source, detail=skip.detail)
    if DROPPED_IMAGES not in sample:
        return accepted(sample, key)
    sample = dict(sample)
    dropped = sample.pop(DROPPED_IMAGES)
    return {**accepted(sample, key), DROPPED_IMAGES: dropped, "source": source}


def send_by_value(item: Any) -> Any:
    """collate_fn for `batch_size=None`, run in the worker: the item's tensors as numpy arrays, pickled by value.

    A tensor crosses the worker queue as a shared-memory file descriptor, passed over a socket with a handshake
    per tensor (~1 ms each): with items sent one by one (4 tensors each) that was most of a tiny model's step.
    Copying the bytes is far cheaper (an item is a few kB; a 224 px uint8 image 150 kB). `received` undoes it.
    """
    if torch.utils.data.get_worker_info() is None:
        return item  # the main process itself (num_workers=0): nothing crosses
    return _map_tensors(item, lambda t: t.numpy() if t.dtype in _NUMPY_DTYPES else t, torch.Tensor)


def received(item: Any) -> Any:
    """An item from `send_by_value`, its arrays back as tensors (sharing the unpickled memory, no copy)."""
    return _map_tensors(item, torch.from_numpy, np.ndarray)


_NUMPY_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, torch.float32}


def _map_tensors(value: Any, convert: Callable[[Any], Any], kind: type) -> Any:
    if isinstance(value, kind):
        return convert(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, convert, kind) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------------------
# Workers and cursors.


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the calling DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def logical_worker(worker: int, num_workers: int, start: int) -> int:
    """The role a worker plays in the rank's round robin when the stream restarts at item `start`.

    The DataLoader always asks worker 0 first, so after consuming `start` items worker 0 must produce item
    `start`, which belonged to worker `start % W` in the uninterrupted run.
    """
    return (worker + start) % num_workers


def note_cursor(cursors: list, position: int, item: dict[str, Any]) -> None:
    """Move `item[CURSOR]` (if any) into `cursors[logical worker]`; item `position` (0-based, counted by the main
    process) came from logical worker position % len(cursors)."""
    cursor = item.pop(CURSOR, None)
    if cursor is not None:
        cursors[position % len(cursors)] = cursor


# ---------------------------------------------------------------------------------------------------------------
# Per-sample random choices.


def _key_words(key: str | bytes | int) -> list[int]:
    """A stable 128-bit digest of the sample key (Python's hash() is salted per process)."""
    data = key if isinstance(key, bytes) else str(key).encode("utf-8")
    digest = hashlib.blake2b(data, digest_size=16).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def sample_rng(seed: int, epoch: int, key: str | bytes | int) -> np.random.Generator:
    """The generator for one sample's random choices: same (seed, epoch, key) -> same draws."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"sample_rng: seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), *_key_words(key)]))
