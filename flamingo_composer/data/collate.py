"""Collation: one dataset's preprocessed samples -> one sub-batch of SPEC 2's schema (any kind; the kind gives the
label rule for samples built by hand without labels, see `data.kinds`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from flamingo_composer.data.host_indices import TEXT_TIME
from flamingo_composer.models.cross_attention import media_text_time
from flamingo_composer.special_tokens import SpecialTokens

LabelRule = Callable[..., torch.Tensor]  # (input_ids (B, L), special, attention_mask (B, L)) -> labels (B, L)


def _join(tensors: Sequence[torch.Tensor], name: str, kind: str, pin: bool, *, cat: bool = False) -> torch.Tensor:
    """Stack (or concatenate) the samples' `name` tensors, straight into pinned memory when `pin`."""
    shapes = {tuple(t.shape[1:] if cat else t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"collate ({kind}): samples disagree on the shape of {name!r}: {sorted(shapes)}")
    shape = (sum(t.shape[0] for t in tensors), *shapes.pop()) if cat else (len(tensors), *shapes.pop())
    out = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=pin)
    return torch.cat(tensors, out=out) if cat else torch.stack(tensors, out=out)


def collate_samples(
    samples,
    special: SpecialTokens,
    labels_of: LabelRule,
    kind: str,
    skipped: Mapping[str, int] | None = None,
    *,
    pin_memory: bool = False,
) -> dict:
    """Samples -> sub-batch; `skipped` = skip counts since the previous batch of this dataset.

    Preprocessed samples give `images` (N, 3, H, W) uint8, the real images only, row by row, with `image_mask`
    (B, T_img) ((B, 1) for samples without one: a pair's single image); the DataSpec normalises them on the
    device. Samples built by hand without labels (`data/fake_batches.py`) get theirs here from `labels_of`; their
    images may be the model's floats already (the DataSpec then leaves them). Plus input_ids, attention_mask,
    labels, text_time (B, L) (`media_text_time`), skipped. `pin_memory`: every tensor in pinned memory, for
    asynchronous copies to the GPU.
    """
    if not samples:
        raise ValueError(f"collate ({kind}): no samples to collate")
    field = lambda name, **kw: _join([s[name] for s in samples], name, kind, pin_memory, **kw)  # noqa: E731
    input_ids, attention_mask = field("input_ids").long(), field("attention_mask").long()  # (B, L), (B, L)
    if "labels" in samples[0]:
        labels = field("labels")  # (B, L): masked once, per sample, in the workers
    else:
        labels = labels_of(input_ids, special, attention_mask)  # (B, L): hand-built samples
    text_time = media_text_time(input_ids, special.media)  # (B, L): computed once, on the host
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, TEXT_TIME: text_time}
    for i, sample in enumerate(samples):
        slots = int(sample["image_mask"].sum()) if "image_mask" in sample else 1
        if sample["images"].dim() != 4 or sample["images"].shape[0] != slots:
            raise ValueError(
                f"collate ({kind}): sample {i} has images {tuple(sample['images'].shape)} for {slots} image slots "
                "(expected (slots, 3, H, W), one image per filled slot)"
            )
    batch["images"] = field("images", cat=True)  # (N, 3, H, W): the real images, row by row (uint8 from the loader)
    if "image_mask" in samples[0]:
        batch["image_mask"] = field("image_mask").bool()  # (B, T_img)
    else:
        batch["image_mask"] = torch.ones((len(samples), 1), dtype=torch.bool)  # (B, 1): one image per pair
    if pin_memory:
        batch = {name: t if t.is_pinned() else t.pin_memory() for name, t in batch.items()}
    batch["skipped"] = dict(skipped or {})
    return batch
