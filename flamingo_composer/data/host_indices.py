"""What the host computes for a training microbatch so that its step reads nothing back from the device.

Every index whose size depends on the data (which slots hold an image, which positions are supervised, how long
each image's text run is) is computed here, on the host, from the microbatch's CPU tensors after its padding
columns are trimmed, and travels with it. On the device the model then runs only ops whose output shapes follow
from these tensors' shapes: no `nonzero`, no boolean-mask indexing, no `.item()` (each a GPU synchronisation).
The model computes the same values itself when a batch lacks them (hand-built and evaluation batches).
"""

from __future__ import annotations

from typing import Any

import torch

from flamingo_composer.models.cross_attention import image_segments
from flamingo_composer.training.loss import supervised_positions

TEXT_TIME = "text_time"  # (B, L) long: the `<image>` count up to each token (the collate computes it)
IMAGE_SLOTS = "image_slots"  # (N,) long: the flat slot b * T_img + t of each of the N compact images
SEGMENT_POSITIONS = "segment_positions"  # (B, T_img, S) long: the s-th token of image t's text run in row b
SEGMENT_VALID = "segment_valid"  # (B, T_img, S) bool: which of those entries are tokens of the run
SUPERVISED_POSITIONS = "supervised_positions"  # (N_sup,) long: flat positions b * L + t predicting a target


def add_host_indices(part: dict[str, Any]) -> dict[str, Any]:
    """The indices above for one microbatch `part` (CPU tensors: input_ids, labels, image_mask, text_time).

    Without `text_time` (a batch not made by the collate) only the image slots and the supervised positions are
    added. Shapes: see the field names. When the microbatch is in pinned memory (GPU machines), so are they: a
    copy from pageable memory would wait for the device like any other sync.
    """
    before = set(part)
    image_mask = part.get("image_mask")
    if image_mask is not None:
        part[IMAGE_SLOTS] = image_mask.reshape(-1).nonzero().squeeze(1)  # (N,)
        if TEXT_TIME in part:
            positions, valid = image_segments(part[TEXT_TIME], image_mask.shape[1])  # (B, T_img, S) each
            part[SEGMENT_POSITIONS], part[SEGMENT_VALID] = positions, valid
    if "labels" in part:
        part[SUPERVISED_POSITIONS] = supervised_positions(part["labels"])  # (N_sup,)
    if part["input_ids"].is_pinned():
        for field in set(part) - before:
            part[field] = part[field].pin_memory()
    return part


def text_segments_of(sub: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (positions, valid) pair for the cross-attention, when the host computed it."""
    if SEGMENT_POSITIONS not in sub:
        return None
    return sub[SEGMENT_POSITIONS], sub[SEGMENT_VALID]
