"""The batch loader ({name: sub-batch} per step, one per enabled dataset of `data:`): items -> batches of SPEC 2's
schema, and its resume state. (`dataspec` then cuts each batch into microbatches for the trainer.)

Per dataset, a `SourceBatcher` in the main process pulls items from an endless reader (webdataset or MDS) through
a DataLoader with `batch_size=None` (items cross by value: `items.send_by_value`), groups them into batches of
exactly B valid samples, counts rejections by reason (so the counts reach the trainer even when workers made them)
and tracks the raw position (items consumed up to the last sample of the last batch).

A batch leaves here compact: SPEC 2's text tensors and `image_mask`, plus `images` (N, 3, H, W) uint8 holding
only the N real images, row by row (no zero slots), in pinned memory on GPU machines; the DataSpec turns them
into the model's float images on the device (`dataspec.NormalizeImages`).

Epochs: every source is an endless stream, and a loader epoch is a fixed number of batches,
min over datasets of epoch_size / (world size * B) (epoch_size defaults to the dataset's sample count). So every
rank yields the same number of batches however many of its samples are rejected, and no rank runs dry.

Resume (`state_dict` / `load_state_dict`): the raw positions of every dataset's stream on every rank, the readers'
cursors (webdataset: per rank and logical worker, where that worker continues; see `wds`), plus the batches
already yielded in the current epoch, so `__iter__` after a resume yields the rest of that epoch. The
Trainer must not replay batches itself: use `spin_dataloaders=False` (Composer's spinning would consume batches).
Exact with the same ranks and workers (MDS: any workers). Otherwise a logged approximation: MDS restarts at the
mean position, webdataset readers at a shard boundary at the saved readers' mean progress.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from composer.utils import dist
from torch.utils.data import DataLoader, IterableDataset

from flamingo_composer.data.config import DataConfig, DatasetConfig
from flamingo_composer.data.images import SplitImageTransform
from flamingo_composer.data.items import (
    DROPPED_IMAGES,
    EMPTY_SHARDS,
    SHARD_ERROR,
    SkipCounter,
    is_rejected,
    note_cursor,
    received,
    send_by_value,
)
from flamingo_composer.data.mds import MDSItems, open_mds
from flamingo_composer.data.wds import WebDatasetItems, count_local_samples, split_plan
from flamingo_composer.special_tokens import SpecialTokens

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: + webdataset reader cursors (version 1 re-read the stream from its start)
NAMED_REJECTIONS_PER_REASON = 3  # rejections logged with shard and key, per reason and dataset (then counted only)


# ---------------------------------------------------------------------------------------------------------------
# Per dataset: an item stream -> batches of exactly B valid samples.


class SourceBatcher:
    """One dataset's endless item stream -> batches of exactly `batch_size` valid samples.

    `make_items(start, cursors)` builds the reader that continues after `start` consumed items, its logical
    workers at `cursors` (None: the readers' own beginning).
    """

    def __init__(
        self,
        name: str,
        make_items: Callable[[int, list | None], IterableDataset],
        *,
        batch_size: int,
        collate: Callable[..., dict],
        num_workers: int = 0,
        prefetch_factor: int = 2,
        max_consecutive_skips: int = 10_000,
        return_keys: bool = False,
    ):
        self.name, self.make_items, self.batch_size, self.collate = name, make_items, batch_size, collate
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.max_consecutive_skips, self.return_keys = max_consecutive_skips, return_keys
        self.readers = max(num_workers, 1)  # logical workers of the round robin
        self.position = 0
        self.cursors: list = [None] * self.readers  # latest cursor per logical worker (None: not started)
        self._items: Iterator[dict] | None = None
        self._named: Counter[tuple[str, str]] = Counter()  # problems named in the log so far, per (what, reason)

    def seek(self, position: int, cursors: list | None = None) -> None:
        """Restart the stream so the next item is item `position`, the readers at `cursors` (restarted lazily)."""
        self.close()
        if cursors is not None and len(cursors) != self.readers:
            raise ValueError(f"{self.name}: {len(cursors)} reader cursors for {self.readers} workers")
        if cursors is not None:
            self.make_items(int(position), list(cursors))  # checks the cursors now, not in a worker
        self.position = int(position)
        self.cursors = list(cursors) if cursors is not None else [None] * self.readers

    def seek_near(self, position: int, saved_cursors: list) -> None:
        """Restart at `position` after a layout change; readers that keep cursors (`cursors_near`) start near the
        saved readers' progress (any ranks and workers), the others at `position` alone."""
        near = getattr(self.make_items(0, None), "cursors_near", None)
        self.seek(position, near(saved_cursors, self.readers) if near is not None else None)

    def close(self) -> None:
        self._items = None  # the DataLoader iterator shuts its workers down when released

    def _next_item(self) -> dict:
        if self._items is None:
            loader = DataLoader(
                self.make_items(self.position, list(self.cursors)),
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=send_by_value,
                prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            )
            self._items = iter(loader)
        try:
            item = received(next(self._items))
        except StopIteration:
            raise RuntimeError(f"{self.name}: the item stream ended; readers must be endless") from None
        note_cursor(self.cursors, self.position, item)
        self.position += 1
        return item

    def _name_problem(self, what: str, reason: str, item: Mapping[str, Any], detail: str) -> None:
        """Warn with shard and key for the first few problems of each reason (`what`: "skipped sample" or "dropped
        an image of sample"), so the data can be found and fixed; later ones are only counted (`data/skipped/...`,
        `data/dropped_images/...`). Shard failures are reported by the readers."""
        if reason in (SHARD_ERROR, EMPTY_SHARDS) or self._named[what, reason] >= NAMED_REJECTIONS_PER_REASON:
            return
        self._named[what, reason] += 1
        last = self._named[what, reason] == NAMED_REJECTIONS_PER_REASON
        log.warning(
            "%s: %s %r from %s: %s%s%s",
            self.name,
            what,
            item.get("key"),
            item.get("source") or "?",
            reason,
            f" ({detail})" if detail else "",
            f"; further '{reason}' cases are counted, not named" if last else "",
        )

    def next_batch(self) -> dict[str, Any]:
        samples, keys, skipped, dropped_images, consecutive = [], [], SkipCounter(), SkipCounter(), 0
        while len(samples) < self.batch_size:
            item = self._next_item()
            if is_rejected(item):
                skipped.add(item["skip"])
                self._name_problem("skipped sample", item["skip"], item, item.get("detail", ""))
                consecutive += 1
                if consecutive >= self.max_consecutive_skips:
                    raise RuntimeError(
                        f"{self.name}: {consecutive} consecutive samples were rejected (this batch: "
                        f"{dict(skipped)}); check the data and the preprocessing settings"
                    )
                continue
            consecutive = 0
            samples.append(item["sample"])
            keys.append(item["key"])
            for reason, detail in item.get(DROPPED_IMAGES, ()):
                dropped_images.add(reason)
                self._name_problem("dropped an image of sample", reason, item, detail)
        batch = self.collate(samples, skipped=skipped.take())
        batch[DROPPED_IMAGES] = dropped_images.take()
        batch["position"] = self.position
        if self.return_keys:
            batch["keys"] = keys
        return batch


class DualBatchLoader:
    """Yields `{name: sub}` per step, the datasets of `batchers` in their order (config order; a disabled
    dataset has no batcher); `len()` batches per epoch.

    `rewind_each_epoch=True` (held-out evaluation) restarts every stream at item 0 on each `__iter__`, so every
    evaluation sees the same batches. `image_transform`: the split transform whose normalisation the DataSpec
    applies on the device (None: the batches carry the model's float images already). `forward_order`: the order
    the DataSpec runs the datasets' microbatches in (data/kinds.forward_order; None: the default-kind names').
    """

    def __init__(
        self,
        batchers: Mapping[str, SourceBatcher],
        batches_per_epoch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        rewind_each_epoch: bool = False,
        image_transform: SplitImageTransform | None = None,
        forward_order: Sequence[str] | None = None,
    ):
        if not batchers:
            raise ValueError("DualBatchLoader needs at least one dataset")
        if batches_per_epoch < 1:
            raise ValueError(f"DualBatchLoader: batches_per_epoch must be >= 1, got {batches_per_epoch}")
        if forward_order is not None and sorted(forward_order) != sorted(batchers):
            raise ValueError(f"DualBatchLoader: forward order {list(forward_order)} != datasets {list(batchers)}")
        self.batchers = dict(batchers)
        self.batches_per_epoch = batches_per_epoch
        self.rank, self.world_size, self.rewind_each_epoch = rank, world_size, rewind_each_epoch
        self.image_transform = image_transform
        self.forward_order = list(forward_order) if forward_order is not None else None
        self.batches_in_epoch = 0

    @property
    def batch_size(self) -> int:
        """The first dataset's per-rank batch size: what microbatch sizes count."""
        return next(iter(self.batchers.values())).batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, dict[str, Any]]]:
        if self.rewind_each_epoch:
            for batcher in self.batchers.values():
                batcher.seek(0)
            self.batches_in_epoch = 0
        elif self.batches_in_epoch >= self.batches_per_epoch:
            self.batches_in_epoch = 0  # the previous epoch was consumed to its end
        while self.batches_in_epoch < self.batches_per_epoch:
            batch = {name: batcher.next_batch() for name, batcher in self.batchers.items()}
            self.batches_in_epoch += 1
            yield batch

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()

    def state_dict(self) -> dict[str, Any]:
        """Raw positions and reader cursors of every rank's streams (a collective when distributed: call it on all
        ranks). Small: one int per rank, and per rank one cursor (5 ints) per webdataset worker."""
        own = {name: (batcher.position, list(batcher.cursors)) for name, batcher in self.batchers.items()}
        everyone = dist.all_gather_object(own) if self.world_size > 1 else [own]
        return {
            "version": STATE_VERSION,
            "world_size": self.world_size,
            "batches_in_epoch": self.batches_in_epoch,
            "num_workers": {name: batcher.num_workers for name, batcher in self.batchers.items()},
            "positions": {name: [ranks[name][0] for ranks in everyone] for name in self.batchers},
            "cursors": {name: [ranks[name][1] for ranks in everyone] for name in self.batchers},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue every stream where this rank stopped: exactly with the same ranks and workers, else a logged
        approximation (see the module docstring)."""
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"data loader state: version {version!r} cannot be resumed by this loader (it reads version "
                f"{STATE_VERSION}"
                + (", which adds the webdataset shard cursors; version 1 was written before them)" if version == 1
                   else ")")
            )
        self.batches_in_epoch = int(state["batches_in_epoch"])
        for name, batcher in self.batchers.items():
            positions = state["positions"].get(name)
            if positions is None:
                log.warning("data loader state has no position for %s: it starts from its beginning", name)
                batcher.seek(0)
                continue
            cursors = state["cursors"][name]  # per saved rank, per saved logical worker
            saved_readers = max(int(state["num_workers"][name]), 1)
            has_cursors = any(c is not None for rank in cursors for c in rank)
            if len(positions) == self.world_size and (saved_readers == batcher.readers or not has_cursors):
                batcher.seek(positions[self.rank], cursors[self.rank] if has_cursors else None)
                continue
            log.warning(
                "%s: checkpoint from %d ranks x %d workers resumed on %d ranks x %d workers: no exact position "
                "exists; %s",
                name, len(positions), saved_readers, self.world_size, batcher.readers,
                "each webdataset worker restarts at the start of a shard at the saved workers' mean progress "
                "(samples near the checkpoint may be read twice or skipped; nothing before is re-read)"
                if has_cursors else "the stream restarts near the same global progress, not at the exact sample",
            )  # fmt: skip
            position = positions[self.rank] if len(positions) == self.world_size else sum(positions) // self.world_size
            batcher.seek_near(position, [c for rank in cursors for c in rank])


# ---------------------------------------------------------------------------------------------------------------
# Building from the config.


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    world_size = dist.get_world_size() if world_size is None else world_size
    rank = dist.get_global_rank() if rank is None else rank
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return rank, world_size


def _source(name: str, cfg: DatasetConfig, process, rank: int, world_size: int):
    """(make_items(start, cursors) -> IterableDataset, samples in the data or None when unknown) for one dataset."""
    if cfg.format == "mds":
        dataset = open_mds(cfg.local, cfg.remote, cfg.split)

        def make_items(start: int, cursors: list | None = None) -> IterableDataset:  # MDS: start is the position
            return MDSItems(
                dataset,
                process,
                seed=cfg.seed,
                shuffle=cfg.shuffle,
                block_size=cfg.shuffle_block_size,
                rank=rank,
                world_size=world_size,
                start=start,
            )

        make_items(0)  # validates sizes now, not in a worker
        return make_items, int(dataset.num_samples)

    urls = cfg.shard_urls()
    by_node, by_worker = split_plan(len(urls), world_size, max(cfg.num_workers, 1))
    if not cfg.resample and not (by_node and by_worker):
        log.warning(
            "%s: %d shards for %d ranks x %d workers: splitting at sample level (every reader reads the shards "
            "and keeps every k-th sample); write more shards for efficient reading",
            name,
            len(urls),
            world_size,
            max(cfg.num_workers, 1),
        )

    def make_items(start: int, cursors: list | None = None) -> IterableDataset:
        return WebDatasetItems(
            urls,
            process,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            shuffle_buffer=cfg.shuffle_buffer,
            resample=cfg.resample,
            rank=rank,
            world_size=world_size,
            start=start,
            cursors=cursors,
        )

    samples = None if cfg.epoch_size is not None else count_local_samples(urls)
    return make_items, samples


def batches_per_epoch(name: str, cfg: DatasetConfig, num_samples: int | None, world_size: int) -> int:
    """epoch_size (or the data's sample count) / (world size * batch size), at least 1 (else an error)."""
    samples = cfg.epoch_size if cfg.epoch_size is not None else num_samples
    if samples is None:
        raise ValueError(f"{name}.epoch_size: required (the number of samples is unknown)")
    batches = samples // (world_size * cfg.batch_size)
    if batches < 1:
        raise ValueError(
            f"{name}: {samples} samples per epoch are fewer than one global batch "
            f"({world_size} ranks x batch_size {cfg.batch_size}); set {name}.epoch_size or a smaller batch"
        )
    return batches


def build_dual_loader(
    data: DataConfig,
    tokenizer,
    image_transform,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    for_eval: bool = False,
    return_keys: bool = False,
    pin_memory: bool | None = None,
) -> DualBatchLoader:
    """Readers, processors and batchers for the enabled datasets, each by its kind (data/kinds.py); rank/world
    default to Composer's dist.

    `image_transform`: open_clip's eval transform (or any `SplitImageTransform.of` accepts); its PIL steps run in
    the workers, its normalisation in the DataSpec (`loader.image_transform`). `pin_memory`: batches in pinned
    memory (default: when CUDA is available).
    """
    rank, world_size = _world(rank, world_size)
    special = SpecialTokens.from_tokenizer(tokenizer)
    split = SplitImageTransform.of(image_transform)
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    batchers, lengths = {}, []
    for name, cfg in data.enabled().items():
        kind = cfg.kind_spec
        process = kind.processor(tokenizer, split, cfg.preprocess, cfg.seed)  # the kind's processor (data/kinds.py)
        try:
            make_items, num_samples = _source(name, cfg, process, rank, world_size)
        except ValueError as exc:  # its messages start with the key ("shards: ..."): name the dataset too
            raise ValueError(f"{name}.{exc}") from exc
        lengths.append(batches_per_epoch(name, cfg, num_samples, world_size))
        batchers[name] = SourceBatcher(
            name,
            make_items,
            batch_size=cfg.batch_size,
            collate=functools.partial(kind.collate, special=special, pin_memory=pin),
            num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor,
            max_consecutive_skips=cfg.max_consecutive_skips,
            return_keys=return_keys,
        )
    return DualBatchLoader(
        batchers, min(lengths), rank=rank, world_size=world_size, rewind_each_epoch=for_eval,
        image_transform=split, forward_order=data.forward_order(),
    )  # fmt: skip
