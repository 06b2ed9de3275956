"""Why a sample was dropped, and how many were dropped per reason.

Preprocessing raises `SkipSample(reason)` for anything it cannot turn into a training row; the reader catches it,
counts the reason in a `SkipCounter`, and moves on. The counts are made inside DataLoader worker processes,
where a plain counter is invisible to the trainer, so each batch carries `counter.take()` as `batch['skipped']`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

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
    SHARD_ERROR,
    EMPTY_SHARDS,
)


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
