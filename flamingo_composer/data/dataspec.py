"""The Composer DataSpec of the dual batch: the trainer's view of one loader batch.

`split_batch` cuts a per-rank batch into microbatches (one dataset per microbatch, see its docstring), and the
sample and token counts tell Composer how to weight them. `validate_microbatch_size` checks a configured size
before any data is read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from composer.core import DataSpec

PER_BATCH_KEYS = ("skipped", "position", "keys")  # travel with the full batch, not with each microbatch


def validate_microbatch_size(
    laion_batch_size: int | None, mmc4_batch_size: int | None, microbatch_size: int
) -> None:
    """Raise ValueError unless both per-rank batches split into the same number of equal chunks.

    microbatch_size counts LAION samples (MMC4 documents when LAION is off, i.e. laion_batch_size is None).
    """
    sizes = f"laion batch_size={laion_batch_size}, mmc4 batch_size={mmc4_batch_size}, microbatch_size={microbatch_size}"
    if not isinstance(microbatch_size, int) or microbatch_size < 1:
        raise ValueError(f"microbatch size must be an int >= 1 ({sizes})")
    lead = laion_batch_size if laion_batch_size is not None else mmc4_batch_size
    if lead is None:
        raise ValueError(f"no dataset enabled ({sizes})")
    if lead % microbatch_size:
        raise ValueError(f"microbatch size does not divide the batch into equal chunks ({sizes})")
    chunks = lead // microbatch_size
    if laion_batch_size is not None and mmc4_batch_size is not None and mmc4_batch_size % chunks:
        raise ValueError(
            f"{chunks} LAION chunks cannot cut the MMC4 batch into equal chunks ({sizes}); "
            "choose sizes where mmc4 batch_size is a multiple of laion batch_size / microbatch_size"
        )


def _lead(batch: Mapping[str, Any]) -> str:
    return "laion" if "laion" in batch else "mmc4"


def _rows(sub: Mapping[str, Any]) -> int:
    return int(sub["input_ids"].shape[0])


def _is_row_tensor(field: str, value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and field != "num_supervised_tokens"


def _model_part(sub: Mapping[str, Any], rows: slice | None) -> dict[str, Any]:
    """The rows `rows` of a sub-batch (None: zero rows), with its whole-batch values; per-batch bookkeeping
    (`skipped`, `position`, `keys`) stays with the full batch, which the callbacks read."""
    return {
        field: (value[rows] if rows is not None else value[:0]) if _is_row_tensor(field, value) else value
        for field, value in sub.items()
        if field not in PER_BATCH_KEYS
    }


def split_batch(batch: Mapping[str, Any], microbatch_size: int | float) -> list[dict[str, Any]]:
    """One dataset per microbatch: the LAION chunks, then the MMC4 chunks (Composer passes the SIZE).

    Both sub-batches are cut into n = ceil(B_lead / microbatch_size) chunks (any size works, e.g. after
    auto-microbatching halves it). Each microbatch holds its dataset's rows and a zero-row entry of every other
    dataset, whose `num_supervised_tokens` (the whole per-rank count, copied into every chunk) the model needs to
    normalise the loss; a zero-row part has no forward. So every microbatch gets its own forward and backward:
    only one dataset's activations are alive at a time (as in the reference's training loop), and each FSDP unit
    runs one forward per backward.
    """
    microbatch_size = max(1, int(microbatch_size))
    num_chunks = max(1, math.ceil(_rows(batch[_lead(batch)]) / microbatch_size))
    chunks: list[dict[str, Any]] = []
    for name, sub in batch.items():
        bounds = torch.tensor_split(torch.arange(_rows(sub)), num_chunks)
        for rows in (slice(int(b[0]), int(b[-1]) + 1) for b in bounds if len(b)):
            chunks.append({
                other: _model_part(part, rows if other == name else None) for other, part in batch.items()
            })
    return chunks


def get_num_samples_in_batch(batch: Mapping[str, Any]) -> int:
    """LAION pairs + MMC4 documents."""
    return sum(_rows(sub) for sub in batch.values())


def get_num_tokens_in_batch(batch: Mapping[str, Any]) -> dict[str, int]:
    """'total': non-pad tokens of both parts; 'loss_generating': supervised (shifted) targets of both parts."""
    total = sum(int(sub["attention_mask"].sum()) for sub in batch.values())
    supervised = sum(int((sub["labels"][:, 1:] != -100).sum()) for sub in batch.values())
    return {"total": total, "loss_generating": supervised}


def build_dataspec(loader: Iterable[dict]) -> DataSpec:
    """Composer DataSpec for the dual batch: our split and the sample/token counts of both datasets.

    `loader` is a DualBatchLoader or any iterable of dual batches with a `batch_size` (tests, benchmarks).
    """
    return DataSpec(
        loader,
        split_batch=split_batch,
        get_num_samples_in_batch=get_num_samples_in_batch,
        get_num_tokens_in_batch=get_num_tokens_in_batch,
    )
