"""MDS (mosaicml-streaming): the column layouts of both datasets (what the converters and the synthetic generator
write), the MMC4 document <-> MDS sample mapping, and the reader, with exact per-rank resume.

Layouts: MMC4 images are stored as their original bytes (no lossy re-encode, base64 decoded once at conversion):
all of a document's images are concatenated in `image_bytes`, and each `image_info` entry holds
`image_bytes_range` [start, end) into it instead of `image_base64`. An empty range marks a missing image, or one
whose base64 was invalid; preprocessing then drops that image like any other unusable one. Natural-order documents
(`DOCUMENT_MDS_COLUMNS`, see `data.documents`) store their images the same way: each image entry of `document`
holds its `image_bytes_range`.

Reader: the `StreamingDataset` is used as what it is best at: shard download/caching, hash checks and random
access to raw MDS rows (`get_item`). The sample ORDER is ours, built from streaming's own shuffle (`py1e`,
seeded by (seed, epoch), one canonical node):

- epoch e's global order is `get_shuffle('py1e', shard sizes, 1, seed, e)`; rank r takes positions r, r+R, ...
  of it, and its endless item sequence is its epoch-0 part, then its epoch-1 part, and so on;
- item j of that sequence is produced by DataLoader worker (j - start) % W (see `items`), so the main
  process sees it in order for any number of workers, and the position is the number of items consumed.

Why not streaming's own `__iter__` + `state_dict(num_samples)`: our batches hold exactly B *valid* samples, so
ranks consume different numbers of raw samples (rejections differ per rank). Streaming stores one global
`sample_in_epoch` (it cannot hold per-rank positions), and every `__iter__` waits at a node-wide barrier of all
ranks' workers (`_resume_incr_epoch` -> `_shared_barrier`), so a rank that reaches the end of its epoch partition
earlier than the others would block while they wait for it in the next collective. Here each rank's position is
its own integer and epochs need no synchronisation. Resume at item n is O(1): nothing before it is read.

Cost: each worker computes the epoch's shuffle (an int64 array of the dataset size) when it enters an epoch.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from streaming import StreamingDataset
from streaming.base.dataset import _ShardState
from streaming.base.shuffle import get_shuffle
from streaming.base.world import World
from torch import distributed as torch_dist
from torch.utils.data import IterableDataset

from flamingo_composer.data.images import decode_base64
from flamingo_composer.data.items import (
    SHARD_ERROR,
    SampleProcessor,
    SkipSample,
    process_to_item,
    rejected,
    report_shard_once,
    worker_info,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Layouts.

LAION_MDS_COLUMNS = {"key": "str", "jpg": "bytes", "txt": "str"}
MMC4_MDS_COLUMNS = {"key": "str", "doc": "json", "image_bytes": "bytes"}
DOCUMENT_MDS_COLUMNS = {"key": "str", "document": "json", "image_bytes": "bytes"}  # natural-order documents

BYTES_RANGE_FIELD = "image_bytes_range"


def mmc4_doc_to_mds(doc: dict, key: str) -> dict[str, Any]:
    """MMC4 JSON document (with image_base64) -> one MDS sample in `MMC4_MDS_COLUMNS` layout."""
    if not isinstance(doc, dict) or not isinstance(doc.get("image_info"), list):
        raise SkipSample("malformed_json", f"document {key!r}: field 'image_info' must be a list of objects")
    stored = {name: value for name, value in doc.items() if name != "image_info"}
    stored = copy.deepcopy(stored)
    blob = bytearray()
    infos = []
    for i, info in enumerate(doc["image_info"]):
        if not isinstance(info, dict):
            raise SkipSample("malformed_json", f"document {key!r}: image_info[{i}] is not an object")
        entry = {name: copy.deepcopy(value) for name, value in info.items() if name != "image_base64"}
        try:
            raw = decode_base64(
                info.get("image_base64"), where=f"document {key!r} image_info[{i}].image_base64"
            )
        except SkipSample:
            raw = b""  # missing or invalid: empty range
        entry[BYTES_RANGE_FIELD] = [len(blob), len(blob) + len(raw)]
        blob.extend(raw)
        infos.append(entry)
    stored["image_info"] = infos
    return {"key": str(key), "doc": stored, "image_bytes": bytes(blob)}


def mmc4_doc_from_mds(sample: dict[str, Any]) -> tuple[dict, list[bytes | None]]:
    """One MDS sample -> (document without image bytes, per-image original bytes or None when missing)."""
    key = sample.get("key", "?")
    doc, blob = sample.get("doc"), sample.get("image_bytes")
    if not isinstance(doc, dict) or not isinstance(doc.get("image_info"), list):
        raise SkipSample("malformed_json", f"MDS sample {key!r}: column 'doc' has no 'image_info' list")
    if not isinstance(blob, bytes | bytearray):
        raise SkipSample("malformed_json", f"MDS sample {key!r}: column 'image_bytes' is not bytes")
    return doc, bytes_in_ranges(doc["image_info"], blob, where=f"MDS sample {key!r}: image_info")


def bytes_in_ranges(entries: list, blob: bytes, *, where: str) -> list[bytes | None]:
    """Each entry's `image_bytes_range` slice of `blob`: None for an entry without a range (or not a dict) and for an
    empty range; a range that does not fit the blob raises SkipSample('malformed_json') naming `where[i]`."""
    images: list[bytes | None] = []
    for i, entry in enumerate(entries):
        span = entry.get(BYTES_RANGE_FIELD) if isinstance(entry, dict) else None
        if span is None:
            images.append(None)
            continue
        if not (isinstance(span, list) and len(span) == 2 and 0 <= span[0] <= span[1] <= len(blob)):
            raise SkipSample(
                "malformed_json",
                f"{where}[{i}].{BYTES_RANGE_FIELD} = {span!r} is not a range into {len(blob)} bytes",
            )
        images.append(bytes(blob[span[0] : span[1]]) or None)
    return images


# ---------------------------------------------------------------------------------------------------------------
# Reader.

SHUFFLE_ALGO = "py1e"

# One StreamingDataset per (local, remote, split) per process. Streaming keeps every instance's shared memory
# (6 file descriptors) open until the process exits (atexit handlers hold them), and refuses a second instance
# on the same local cache of a remote; our readers only use random access, so one instance serves every loader.
_OPEN_DATASETS: dict[tuple[str, str | None, str | None], StreamingDataset] = {}


# Streaming names a dataset's shared memory by walking the prefixes in use and creating the first free one
# (`streaming.base.shared.prefix.get_shm_prefix`), with nothing between the walk and the create: two jobs on one
# machine that open a dataset at the same moment pick the same prefix and the later one dies with
# `FileExistsError: '/000000_locals'` (a sweep's jobs, a training run and an evaluation, parallel tests).
# One lock file per user (another user's would not be writable).
_SHM_REGISTRATION_LOCK = os.path.join(tempfile.gettempdir(), f"flamingo_composer-streaming-shm-{os.getuid()}.lock")


@contextlib.contextmanager
def _one_shm_registration_per_node():
    """The local leader (which creates the name) holds a node-wide file lock while its job registers; the job's
    other ranks wait at a barrier until it holds the lock, so their walk too comes after any other job's create."""
    with open(_SHM_REGISTRATION_LOCK, "a") as lock_file:
        if World.detect().is_local_leader:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.barrier()
        yield


@contextlib.contextmanager
def _prefix_probes_closed_streaming_0_13():
    """streaming 0.13 finds a free shared-memory prefix by attaching every segment of every prefix in use
    (`prefix._check_and_find`), and each attachment registers an atexit handler that keeps it, and its file
    descriptors, open until the process exits: about 10 descriptors per prefix, per dataset opened. A node keeps
    the prefixes of killed jobs (each DataLoader worker of each rank registers its own), so after a preempted
    multi-GPU run every worker of the next one could hold thousands and stop with "Too many open files". The
    probes here attach without the handler; each closes when the walk drops it. Creating and attaching for real
    (`get_shm_prefix`'s own calls, which the dataset keeps) are unchanged."""
    from streaming.base.shared import prefix

    attach = prefix.SharedMemory

    def probe(name=None, create=None, size=0, auto_cleanup=True):
        return attach(name, create, size, auto_cleanup=auto_cleanup and create is not False)

    prefix.SharedMemory = probe
    try:
        yield
    finally:
        prefix.SharedMemory = attach


def open_mds(local: str, remote: str | None = None, split: str | None = None) -> StreamingDataset:
    """A StreamingDataset over one MDS directory, used for random access only (our own order); shared per process."""
    if remote is None:
        index = os.path.join(local, split or "", "index.json")
        if not os.path.isfile(index):
            raise ValueError(f"local: MDS index not found: {index}")
    key = (os.path.abspath(local), remote, split)
    if key not in _OPEN_DATASETS:
        with _one_shm_registration_per_node(), _prefix_probes_closed_streaming_0_13():
            _OPEN_DATASETS[key] = StreamingDataset(
                local=local, remote=remote, split=split, batch_size=1, shuffle=False
            )
    return _OPEN_DATASETS[key]


def rank_epoch_order(
    shard_sizes: np.ndarray,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    block_size: int,
    rank: int,
    world_size: int,
) -> np.ndarray:
    """Sample ids rank `rank` reads in epoch `epoch`, in order: (N - rank) / R ids, rounded up."""
    num_samples = int(np.sum(shard_sizes))
    if shuffle:
        order = get_shuffle(SHUFFLE_ALGO, shard_sizes, 1, seed, epoch, block_size)  # (N,) sample ids
    else:
        order = np.arange(num_samples, dtype=np.int64)
    return order[rank::world_size]


class MDSItems(IterableDataset):
    """One rank's endless item stream over an MDS dataset, starting at item `start` of that stream."""

    def __init__(
        self,
        dataset: StreamingDataset,
        process: SampleProcessor,
        *,
        seed: int,
        shuffle: bool,
        block_size: int,
        rank: int,
        world_size: int,
        start: int = 0,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"MDSItems: rank {rank} is not in [0, {world_size})")
        self.dataset, self.process = dataset, process
        self.shard_sizes = np.asarray(dataset.samples_per_shard, dtype=np.int64)
        self.seed, self.shuffle, self.block_size = seed, shuffle, block_size
        self.rank, self.world_size, self.start = rank, world_size, start
        self.items_per_epoch = len(range(rank, int(self.shard_sizes.sum()), world_size))
        if self.items_per_epoch == 0:
            raise ValueError(
                f"local: MDS dataset {dataset.streams[0].local!r} has {int(self.shard_sizes.sum())} samples, "
                f"fewer than the {world_size} ranks"
            )

    def order(self, epoch: int) -> np.ndarray:
        return rank_epoch_order(
            self.shard_sizes,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            block_size=self.block_size,
            rank=self.rank,
            world_size=self.world_size,
        )

    def _read(self, sample_id: int, failed_shards: set[int]) -> dict[str, Any] | None:
        """The raw MDS row, or None when its shard failed to download or read (then skipped and counted)."""
        shard_id = self._shard_of(sample_id)
        if shard_id in failed_shards:
            return None
        try:
            return self.dataset.get_item(sample_id)
        except Exception as err:  # a shard that fails to download or read: skipped and counted, never fatal
            failed_shards.add(shard_id)
            self._unblock_shard(shard_id)
            report_shard_once(
                log, self._shard_name(shard_id), "MDS shard %s unreadable (%s: %s): its samples are skipped",
                self._shard_name(shard_id), type(err).__name__, err,
            )
            return None

    def _shard_of(self, sample_id: int) -> int:
        return int(self.dataset.spanner[sample_id][0])

    def _shard_name(self, shard_id: int) -> str:
        """`<local dir>/<shard file>` of an MDS shard, for messages."""
        stream = self.dataset.streams[self.dataset.stream_per_shard[shard_id]]
        return os.path.join(stream.local, self.dataset.shards[shard_id].raw_data.basename)

    def _unblock_shard(self, shard_id: int) -> None:
        """A failed download leaves the shard 'preparing' in streaming's shared state, and every later reader
        (any worker) would wait for it forever: mark it remote again so they try (and fail) themselves."""
        lock = getattr(self.dataset, "_cache_filelock", None)  # created lazily by streaming's prepare_shard
        if lock is not None:
            lock.acquire()
        try:
            if self.dataset._shard_states[shard_id] == _ShardState.PREPARING:
                self.dataset._shard_states[shard_id] = _ShardState.REMOTE
        finally:
            if lock is not None:
                lock.release()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_info()
        current_epoch, order, failed_shards = -1, None, set()  # failed_shards: ids this worker gave up on
        for item in range(self.start + worker, 2**62, num_workers):
            epoch, position = divmod(item, self.items_per_epoch)
            if (
                epoch != current_epoch
            ):  # failed shards are tried again each epoch (a failure may be transient)
                current_epoch, order, failed_shards = epoch, self.order(epoch), set()
            sample_id = int(order[position])
            raw = self._read(sample_id, failed_shards)
            if raw is None:
                yield rejected(SHARD_ERROR, sample_id, source=self._shard_name(self._shard_of(sample_id)))
                continue
            key = raw.get("key") or sample_id
            yield process_to_item(
                self.process, raw, epoch=epoch, key=key, source=self._shard_name(self._shard_of(sample_id))
            )
