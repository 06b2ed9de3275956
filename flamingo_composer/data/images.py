"""Image bytes -> RGB PIL image -> uint8 pixels in the workers; /255 and the CLIP normalisation on the device.

The image transform (open_clip's eval transform: resize bicubic, center crop, RGB, ToTensor, Normalize) is cut at
its ToTensor step (`SplitImageTransform`): the PIL steps run in the DataLoader workers and give uint8 (3, H, W), a
quarter of the float bytes to send; ToTensor's /255 and the Normalize step run on the trainer's device
(`normalize`, called by the DataSpec), with the mean and std read from the transform's own Normalize step. Flips
commute with both per-pixel steps, so the result equals `transform(image)` (flipped) up to fp32 rounding.
Failures to decode become `SkipSample` reasons.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import Compose, Normalize, ToTensor

from flamingo_composer.data.items import SkipSample


def decode_base64(data: str | bytes | None, *, where: str = "image_base64") -> bytes:
    """Strict base64 decoding (whitespace tolerated); bad input -> SkipSample('bad_base64')."""
    if data is None:
        raise SkipSample("missing_image", f"{where} is missing")
    if not isinstance(data, str | bytes):
        raise SkipSample("bad_base64", f"{where} is a {type(data).__name__}, not a string")
    if isinstance(data, str):
        data = data.encode("ascii", errors="replace")
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise SkipSample("bad_base64", f"{where}: {err}") from None


def check_image_bytes(image_bytes: bytes | None, *, min_bytes: int = 0, where: str = "image") -> bytes:
    """The checks that need no decode: bytes present, at least `min_bytes` of them (else SkipSample)."""
    if not image_bytes:
        raise SkipSample("missing_image", f"{where} has no bytes")
    if len(image_bytes) < min_bytes:
        raise SkipSample("image_too_small", f"{where} has {len(image_bytes)} bytes < {min_bytes}")
    return image_bytes


def decode_image(image_bytes: bytes | None, *, min_bytes: int = 0, where: str = "image") -> Image.Image:
    """Decode to an RGB image; missing, too small or undecodable bytes raise SkipSample with the reason."""
    check_image_bytes(image_bytes, min_bytes=min_bytes, where=where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF/palette data; a decode error still raises
            with Image.open(io.BytesIO(image_bytes)) as image:
                return image.convert("RGB")  # convert() forces the full decode
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise SkipSample("corrupt_image", f"{where}: {type(err).__name__}: {err}") from None


class SplitImageTransform:
    """An image transform cut at ToTensor: `to_uint8` (PIL steps, in the workers) and `normalize` (on the device).

    `SplitImageTransform.of(transform)` accepts a torchvision `Compose` of PIL steps, one `ToTensor` (open_clip's
    `MaybeToTensor` is one) and at most one `Normalize` after it (none: mean 0, std 1); anything else raises
    ValueError naming the step, since only those steps are known to commute with moving the rest to the device.
    """

    def __init__(self, pil_steps: Callable, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"image_transform: Normalize must have 3 channels, got mean={mean}, std={std}")
        self.pil_steps, self.mean, self.std = pil_steps, tuple(map(float, mean)), tuple(map(float, std))
        self._stats: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def of(cls, transform) -> SplitImageTransform:
        """Split `transform` (a SplitImageTransform is returned as it is)."""
        if isinstance(transform, SplitImageTransform):
            return transform
        steps = list(getattr(transform, "transforms", None) or []) if isinstance(transform, Compose) else None
        if steps is None:
            raise ValueError(
                f"image_transform: cannot split {transform!r} into PIL steps + ToTensor (+ Normalize) for uint8 "
                "workers and device normalisation; pass a torchvision Compose such as open_clip's eval transform"
            )
        cut = [i for i, step in enumerate(steps) if isinstance(step, ToTensor)]
        if len(cut) != 1:
            raise ValueError(f"image_transform: expected exactly one ToTensor step, found {len(cut)} in {transform!r}")
        after = steps[cut[0] + 1 :]
        if len(after) > 1 or (after and not isinstance(after[0], Normalize)):
            raise ValueError(
                f"image_transform: only one Normalize may follow ToTensor (it moves to the device), got {after!r}"
            )
        mean, std = (after[0].mean, after[0].std) if after else ((0.0,) * 3, (1.0,) * 3)
        return cls(Compose(steps[: cut[0]]), mean, std)

    def to_uint8(self, image: Image.Image, flip: bool = False) -> torch.Tensor:
        """The PIL steps, then the optional horizontal flip: (3, H, W) uint8, what ToTensor would scale by 1/255."""
        out = self.pil_steps(image)
        if not isinstance(out, Image.Image) or out.mode != "RGB":
            raise TypeError(
                f"image_transform: its steps before ToTensor must give an RGB PIL image, got "
                f"{getattr(out, 'mode', type(out).__name__)!r}"
            )
        pixels = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)
        return pixels.flip(-1) if flip else pixels

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float32 `(x / 255 - mean) / std`, as ToTensor + Normalize compute it."""
        if images.dtype != torch.uint8:
            raise TypeError(f"normalize: expected uint8 images, got {images.dtype}")
        mean, std = self._on(images.device)
        return images.float().div_(255).sub_(mean).div_(std)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean, std (3, 1, 1) on `device`, copied there once (no host-device copy per batch)."""
        key = (device, torch.float32)
        if key not in self._stats:
            self._stats[key] = tuple(
                torch.tensor(v, dtype=torch.float32).view(3, 1, 1).to(device) for v in (self.mean, self.std)
            )
        return self._stats[key]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stats": {}}  # device tensors stay in the process that made them

    def __repr__(self) -> str:
        return f"SplitImageTransform({self.pil_steps!r}, mean={self.mean}, std={self.std})"
