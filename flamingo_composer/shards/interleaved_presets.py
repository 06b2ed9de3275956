"""The parquet layouts of the open natural-order interleaved corpora: which columns hold a document's texts, images
and metadata, and how each one's per-image metadata lines up with the images (no heavy imports: the commands list
the preset names before parsing).

All three store a document as equal-length `texts` and `images` lists, one non-null item per position (images as
URLs). They differ in their metadata:
- OBELICS (HuggingFaceM4/OBELICS): `metadata`, a JSON string of a list aligned by position (null at texts), and
  `general_metadata`, a JSON string about the page;
- MINT-1T-HTML (mlfoundations/MINT-1T-HTML): `image_hashes` and `images_metadata` in image-only order (the k-th
  entry belongs to the k-th non-null image), and the page's `url`;
- OmniCorpus-CC (OpenGVLab/OmniCorpus-CC): `metadata`, a native list of structs aligned by position, and
  `general_metadata`, a native struct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ParquetPreset:
    """Column names of one corpus. `image_metadata` columns are required and lined up by `metadata_order`:
    'position' (one entry per position, null at texts) or 'image' (one entry per non-null image, in order);
    `document_metadata` columns are copied when the file has them."""

    texts: str = "texts"
    images: str = "images"
    image_metadata: tuple[str, ...] = ()
    metadata_order: Literal["position", "image"] = "position"
    document_metadata: tuple[str, ...] = ()

    def required_columns(self) -> list[str]:
        return [self.texts, self.images, *self.image_metadata]


PRESETS = {
    "obelics": ParquetPreset(image_metadata=("metadata",), document_metadata=("general_metadata",)),
    "mint-html": ParquetPreset(
        image_metadata=("image_hashes", "images_metadata"), metadata_order="image", document_metadata=("url",)
    ),
    "omnicorpus": ParquetPreset(image_metadata=("metadata",), document_metadata=("general_metadata",)),
}
