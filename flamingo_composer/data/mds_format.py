"""MDS (mosaicml-streaming) column layouts for both datasets, and the MMC4 document <-> MDS sample mapping.

MMC4 images are stored as their original bytes (no lossy re-encode, base64 decoded once at conversion): all of a
document's images are concatenated in `image_bytes`, and each `image_info` entry holds `image_bytes_range`
[start, end) into it instead of `image_base64`. An empty range marks a missing image, or one whose base64 was
invalid; preprocessing then drops that image like any other unusable one.
"""

from __future__ import annotations

import copy
from typing import Any

from flamingo_composer.data.images import decode_base64
from flamingo_composer.data.skips import SkipSample

LAION_MDS_COLUMNS = {"key": "str", "jpg": "bytes", "txt": "str"}
MMC4_MDS_COLUMNS = {"key": "str", "doc": "json", "image_bytes": "bytes"}

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
    images: list[bytes | None] = []
    for i, info in enumerate(doc["image_info"]):
        span = info.get(BYTES_RANGE_FIELD) if isinstance(info, dict) else None
        if span is None:
            images.append(None)
            continue
        if not (isinstance(span, list) and len(span) == 2 and 0 <= span[0] <= span[1] <= len(blob)):
            raise SkipSample(
                "malformed_json",
                f"MDS sample {key!r}: image_info[{i}].{BYTES_RANGE_FIELD} = {span!r} is not a range into {len(blob)} bytes",
            )
        images.append(bytes(blob[span[0] : span[1]]) or None)
    return doc, images
