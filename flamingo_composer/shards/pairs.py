"""The image-caption pair every pair source yields (img2dataset output, caption parquet, an image folder) and the one
writer that turns pairs into LAION MDS shards, so every source gives the same rows."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flamingo_composer.data.mds import LAION_MDS_COLUMNS
from flamingo_composer.shards.convert import ConversionReport, MdsSink, _progress


@dataclass(frozen=True)
class ImagePair:
    """One image with its caption: `image` holds the source's original encoded bytes (never re-encoded); `url` is
    where the image was downloaded from when the source says (img2dataset does), else None; `caption` is None when
    the source has none (img2dataset run on a URL list without captions); `where` names the file (and row) for
    messages."""

    key: str
    url: str | None
    caption: str | None
    image: bytes
    where: str = ""

    def mds_row(self) -> dict[str, object]:
        """The row in `LAION_MDS_COLUMNS` (the training path reads it as a webdataset LAION sample)."""
        return {"key": self.key, "jpg": self.image, "txt": self.caption}


def captions_of(value: object) -> list[tuple[int | None, str]]:
    """The captions a source's caption field holds: [(None, text)] for a string, [(i, text_i), ...] for a list of
    strings (one pair each, e.g. COCO's five); blank and non-string entries left out, so [] means none."""
    if isinstance(value, list):
        return [(i, text) for i, text in enumerate(value) if isinstance(text, str) and text.strip()]
    return [(None, value)] if isinstance(value, str) and value.strip() else []


def pair_key(stem: str, record: int, caption_index: int | None) -> str:
    """`<file stem>-<record>`, plus `-<i>` for the i-th caption of a list: unique per (file, record, caption)."""
    return f"{stem}-{record:07d}" + (f"-{caption_index}" if caption_index is not None else "")


def write_pairs_mds(
    pairs: Iterable[ImagePair],
    out: str | os.PathLike,
    report: ConversionReport,
    *,
    compression: str | None = None,
    size_limit: str | int = "64mb",
    progress: bool = True,
    desc: str = "pairs -> mds",
) -> ConversionReport:
    """Write every pair that has a caption as a LAION MDS row into the new (or empty) folder `out`; a pair without
    one is counted (`missing_caption`); counts land in `report`."""
    sink = MdsSink(Path(out), LAION_MDS_COLUMNS, compression=compression, size_limit=size_limit)
    with _progress(progress, desc) as bar:
        for pair in pairs:
            bar.update(1)
            if pair.caption is None:
                report.skip("missing_caption", f"{pair.where}: pair {pair.key!r} has no caption")
                continue
            sink.write(pair.mds_row())
            report.written += 1
    report.outputs = sink.close()
    return report
