"""The reference's padded image form, kept at the interop edge only (parity tests, the reference benchmark).

The reference takes `vision_x` (B, T_img, F=1, C, H, W), empty slots zero; our model takes the real images alone,
(N, C, H, W) in slot order, with `image_mask` (B, T_img). These convert one into the other.
"""

from __future__ import annotations

import torch


def compact_images(
    vision_x: torch.Tensor | None, image_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """vision_x (B, T_img, 1, C, H, W) -> (images (N, C, H, W), image_mask (B, T_img)): the occupied slots
    (`image_mask`, or the slots that are not all zero) in slot order. Boolean indexing reads the mask back to
    the host: fine here, never on the training path."""
    if vision_x is None or vision_x.dim() != 6 or vision_x.shape[2] != 1:
        shape = None if vision_x is None else tuple(vision_x.shape)
        raise ValueError(f"vision_x must be (B, T_img, 1, C, H, W) (one frame per image), got {shape}")
    b, t_img = vision_x.shape[:2]
    if image_mask is None:
        image_mask = vision_x.flatten(2).ne(0).any(dim=-1)  # (B, T_img)
    elif image_mask.shape != (b, t_img):
        raise ValueError(f"image_mask shape {tuple(image_mask.shape)} != vision_x slots {(b, t_img)}")
    image_mask = image_mask.to(device=vision_x.device, dtype=torch.bool)  # (B, T_img)
    return vision_x[:, :, 0][image_mask], image_mask  # (N, C, H, W), (B, T_img)


def padded_vision_x(images: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """The inverse of `compact_images`: images (N, C, H, W) in slot order and image_mask (B, T_img) -> vision_x
    (B, T_img, 1, C, H, W), empty slots zero. The gather index is a cumulative sum of the mask, so it reads
    nothing back from the device."""
    b, t_img = image_mask.shape
    padded = torch.cat([images, images.new_zeros((1, *images.shape[1:]))])  # (N + 1, C, H, W): row N = zeros
    flat = image_mask.reshape(-1).to(images.device)  # (B * T_img,)
    index = torch.where(flat, flat.long().cumsum(0) - 1, images.shape[0])  # (B * T_img,): its image or the zeros
    return padded.index_select(0, index).view(b, t_img, 1, *images.shape[1:])  # (B, T_img, 1, C, H, W)
