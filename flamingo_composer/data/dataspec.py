"""The Composer DataSpec of the loader's batch ({name: sub-batch}): the trainer's view of one loader batch.

On the host, `split_batch` cuts a per-rank batch into microbatches (one dataset per microbatch, see its
docstring), and the sample and token counts tell Composer how to weight them. Composer then copies each
microbatch to the device, where `NormalizeImages` (the DataSpec's `microbatch_transforms`) turns the loader's
compact uint8 `images` into the model's input: the same N images, normalised floats. Each microbatch also carries
the indices the host computed for it (`host_indices`), so its step reads nothing back from the device.
`validate_microbatch_size` checks a configured size before any data is read.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from composer.core import DataSpec

from flamingo_composer.data.host_indices import TEXT_TIME, add_host_indices
from flamingo_composer.data.images import SplitImageTransform
from flamingo_composer.data.items import DROPPED_IMAGES
from flamingo_composer.data.kinds import default_kinds, forward_order
from flamingo_composer.training.loss import count_supervised_tokens

PER_BATCH_KEYS = ("skipped", DROPPED_IMAGES, "position", "keys")  # travel with the full batch, not each microbatch


def validate_microbatch_size(batch_sizes: Mapping[str, int], microbatch_size: int) -> None:
    """Raise ValueError unless every dataset's per-rank batch splits into the same number of equal chunks.

    `batch_sizes`: {name: per-rank batch size} of the enabled datasets in config order; microbatch_size counts
    the samples of the first (the lead), whose batch it cuts into n chunks; every other batch must be a
    multiple of n. The message names the offending `data.<name>.batch_size`.
    """
    sizes = ", ".join(f"data.{name}.batch_size={size}" for name, size in batch_sizes.items())
    if not isinstance(microbatch_size, int) or microbatch_size < 1:
        raise ValueError(f"microbatch size must be an int >= 1 ({sizes}, microbatch_size={microbatch_size})")
    if not batch_sizes:
        raise ValueError("no dataset enabled")
    lead, lead_size = next(iter(batch_sizes.items()))
    if lead_size % microbatch_size:
        raise ValueError(
            f"{microbatch_size} does not cut data.{lead}.batch_size={lead_size} into equal chunks (it counts the "
            f"samples of {lead}, the first dataset; {sizes})"
        )
    chunks = lead_size // microbatch_size
    for name, size in batch_sizes.items():
        if size % chunks:
            raise ValueError(
                f"data.{name}.batch_size={size} cannot be cut into the {chunks} equal chunks that microbatches of "
                f"{microbatch_size} make of data.{lead}.batch_size={lead_size} ({sizes}); every batch_size must "
                f"be a multiple of {chunks}"
            )


def _lead(batch: Mapping[str, Any]) -> str:
    """The batch's first dataset (config order): microbatch sizes count its rows."""
    return next(iter(batch))


def _rows(sub: Mapping[str, Any]) -> int:
    return int(sub["input_ids"].shape[0])


def _is_row_tensor(field: str, value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and field != "images"


def _image_span(sub: Mapping[str, Any], rows: slice) -> slice:
    """The compact `images` of rows `rows`: each row holds image_mask.sum() of them, after the previous rows'."""
    per_row = sub["image_mask"].sum(1)  # (B,) on the host: split_batch runs before the copy to the device
    if int(per_row.sum()) != sub["images"].shape[0]:
        raise ValueError(
            f"split_batch: image_mask marks {int(per_row.sum())} images but 'images' holds {sub['images'].shape[0]}"
        )
    start = int(per_row[: rows.start].sum())
    return slice(start, start + int(per_row[rows].sum()))


def select_rows(sub: Mapping[str, Any], rows: slice) -> dict[str, Any]:
    """The rows `rows` of a sub-batch with their compact images; values that are not per row (the step's global
    supervised-token counts, `skipped`) as they are."""
    part = {field: value[rows] if _is_row_tensor(field, value) else value for field, value in sub.items()}
    if "images" in sub:
        part["images"] = sub["images"][_image_span(sub, rows)]  # (N_rows, 3, H, W)
    return part


def _model_part(sub: Mapping[str, Any], rows: slice) -> dict[str, Any]:
    """A microbatch: `select_rows` of the sub-batch, trimmed, with its host indices. Per-batch bookkeeping
    (`skipped`, `dropped_images`, `position`, `keys`) stays with the full batch, which the callbacks read."""
    part = select_rows({field: value for field, value in sub.items() if field not in PER_BATCH_KEYS}, rows)
    return add_host_indices(_trim_padding(part))


SEQUENCE_FIELDS = ("input_ids", "attention_mask", "labels", TEXT_TIME)  # (B, L), right-padded


def _trim_padding(part: dict[str, Any]) -> dict[str, Any]:
    """Drop the text columns after the last real token of the microbatch (trailing padding), on the host.

    Exact: with right padding and a causal LM no real token sees a later position, and padded positions are
    never supervised (labels -100), so logits and loss of the real tokens do not change; the LM, cross-attention
    and head simply do not run on the padding. (Under FSDP/DDP every rank still runs the same modules.)
    """
    mask = part.get("attention_mask")
    if mask is None or mask.shape[0] == 0:
        return part
    used = mask.any(dim=0).nonzero()  # columns holding a real token of some row (a CPU tensor: no device sync)
    length = int(used[-1]) + 1 if len(used) else 1  # left-padded text (generation) ends with real tokens: kept
    if length < mask.shape[1]:
        for field in SEQUENCE_FIELDS:
            if field in part:
                part[field] = part[field][:, :length]
    return part


def split_batch(
    batch: Mapping[str, Any], microbatch_size: int | float, order: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One dataset per microbatch, the datasets in `order` (Composer passes the SIZE).

    Every sub-batch is cut into n = ceil(B_lead / microbatch_size) chunks, B_lead the first dataset's rows (any
    size works, e.g. after auto-microbatching halves it). Each microbatch holds one dataset's rows only, so every
    microbatch gets its own forward and backward: only one dataset's activations are alive at a time (as in the
    reference's training loop), and each FSDP unit runs one forward per backward. The loss's normalisation needs
    nothing from the other datasets' rows: the step's global counts travel in every sub-batch (training/loss.py).
    `order`: the datasets' forward order (data/kinds.forward_order: interleaved kinds first, says why); the
    loader's (`build_dataspec`), or for hand-built batches without one, that of the default-kind names.
    """
    order = list(order) if order is not None else forward_order(default_kinds(batch))
    missing = [name for name in batch if name not in order]
    if missing:
        raise ValueError(f"split_batch: datasets {missing} are not in the forward order {order}")
    microbatch_size = max(1, int(microbatch_size))
    num_chunks = max(1, math.ceil(_rows(batch[_lead(batch)]) / microbatch_size))
    chunks: list[dict[str, Any]] = []
    for name in (name for name in order if name in batch):
        sub = batch[name]
        bounds = torch.tensor_split(torch.arange(_rows(sub)), num_chunks)
        chunks += [{name: _model_part(sub, slice(int(b[0]), int(b[-1]) + 1))} for b in bounds if len(b)]
    return chunks


def get_num_samples_in_batch(batch: Mapping[str, Any]) -> int:
    """Rows (pairs, documents) of every dataset."""
    return sum(_rows(sub) for sub in batch.values())


def get_num_tokens_in_batch(batch: Mapping[str, Any]) -> dict[str, int]:
    """'total': non-pad tokens of every dataset; 'loss_generating': their supervised (shifted) targets."""
    total = sum(int(sub["attention_mask"].sum()) for sub in batch.values())
    supervised = sum(int(count_supervised_tokens(sub["labels"])) for sub in batch.values())
    return {"total": total, "loss_generating": supervised}


class NormalizeImages:
    """microbatch_transforms: each sub-batch's compact uint8 `images` (N, 3, H, W) -> the model's float images.

    On the device, after Composer's `batch_to_device`: `/255` and the transform's Normalize on the N real images
    (`SplitImageTransform.normalize`); which slot each fills travels as the host's `image_slots`. Images that are
    floats already (hand-built batches in the model's form, `data/fake_batches.py`) are left as they are.
    """

    def __init__(self, image_transform: SplitImageTransform | None):
        self.image_transform = image_transform

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self.normalize(sub) if sub["images"].dtype == torch.uint8 else sub for name, sub in batch.items()}

    def normalize(self, sub: Mapping[str, Any]) -> dict[str, Any]:
        if self.image_transform is None:
            raise ValueError(
                "batch holds uint8 'images' but the DataSpec has no image transform to normalise them: build it "
                "with build_dataspec(loader) on a loader from build_dual_loader"
            )
        return {**sub, "images": self.image_transform.normalize(sub["images"])}  # (N, 3, H, W) float32


def build_dataspec(loader: Iterable[dict]) -> DataSpec:
    """Composer DataSpec for the loader's batches: our split in the loader's `forward_order`, the sample/token
    counts of every dataset, and the device image normalisation with the loader's `image_transform` (none: the
    batches must carry float images already).

    `loader` is a DualBatchLoader or any iterable of batches with a `batch_size` (tests, benchmarks; their
    datasets then take the default-kind names' order).
    """
    order = getattr(loader, "forward_order", None)
    return DataSpec(
        loader,
        split_batch=functools.partial(split_batch, order=order) if order is not None else split_batch,
        get_num_samples_in_batch=get_num_samples_in_batch,
        get_num_tokens_in_batch=get_num_tokens_in_batch,
        microbatch_transforms=NormalizeImages(getattr(loader, "image_transform", None)),
    )
