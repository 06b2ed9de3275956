"""Image bytes -> RGB PIL image -> transformed tensor, with failures turned into `SkipSample` reasons."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import torch
from PIL import Image

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


def decode_image(image_bytes: bytes | None, *, min_bytes: int = 0, where: str = "image") -> Image.Image:
    """Decode to an RGB image; missing, too small or undecodable bytes raise SkipSample with the reason."""
    if not image_bytes:
        raise SkipSample("missing_image", f"{where} has no bytes")
    if len(image_bytes) < min_bytes:
        raise SkipSample("image_too_small", f"{where} has {len(image_bytes)} bytes < {min_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF/palette data; a decode error still raises
            with Image.open(io.BytesIO(image_bytes)) as image:
                return image.convert("RGB")  # convert() forces the full decode
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise SkipSample("corrupt_image", f"{where}: {type(err).__name__}: {err}") from None


def image_to_tensor(image: Image.Image, image_transform, flip: bool) -> torch.Tensor:
    """Apply the (open_clip eval) transform, then the optional horizontal flip: (3, H, W) float."""
    pixels = image_transform(image)  # (3, H, W)
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 3:
        raise TypeError(
            f"image_transform must return a (3, H, W) tensor, got {getattr(pixels, 'shape', pixels)!r}"
        )
    return torch.flip(pixels, dims=[-1]) if flip else pixels
