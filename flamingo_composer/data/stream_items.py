"""One item per raw sample, and which DataLoader worker yields which item.

Readers run the expensive part (read, decode, preprocess or reject) in DataLoader workers and yield exactly one
item per raw sample: `{'sample': tensors, 'key': k}` or a rejection marker `{'skip': reason, 'key': k}`. The
DataLoader runs with `batch_size=None`, so it hands items to the main process in strict round robin over its
workers (item i comes from worker i % W). A reader therefore defines ONE endless item sequence per rank, lets
worker w produce the items i = start + w + k*W, and the main process sees that sequence in order, whatever W
is. The data position is then simply the number of items the main process has consumed.

A reader whose position is more than that count (webdataset: which shard, how far into it) also puts its own
position just after the item into `item[CURSOR]`; `note_cursor` keeps the latest one per logical worker, so
the loader state holds where every worker continues.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from flamingo_composer.data.skips import SkipSample

CURSOR = "cursor"  # item key: the producing reader's position after this item (see `note_cursor`)

SampleProcessor = Callable[
    ..., Mapping[str, torch.Tensor]
]  # process(raw, *, epoch, key) -> tensors / SkipSample


def accepted(sample: Mapping[str, torch.Tensor], key: Any) -> dict[str, Any]:
    return {"sample": sample, "key": key}


def rejected(reason: str, key: Any = None, *, source: str | None = None, detail: str = "") -> dict[str, Any]:
    """A rejection marker: why, which sample (`key`), from where (`source`: shard URL or MDS shard)."""
    return {"skip": reason, "key": key, "source": source, "detail": detail}


def is_rejected(item: Mapping[str, Any]) -> bool:
    return "skip" in item


def process_to_item(
    process: SampleProcessor, raw: Mapping[str, Any], *, epoch: int, key: Any, source: str | None = None
) -> dict[str, Any]:
    """Run per-sample preprocessing; a `SkipSample` becomes a rejection marker carrying its reason and detail."""
    try:
        return accepted(process(raw, epoch=epoch, key=key), key)
    except SkipSample as skip:
        return rejected(skip.reason, key, source=source, detail=skip.detail)


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


def passthrough_collate(item: Any) -> Any:
    """collate_fn for `batch_size=None`: hand each item to the main process unchanged."""
    return item
