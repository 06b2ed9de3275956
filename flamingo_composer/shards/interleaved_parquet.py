"""Natural-order interleaved parquet (OBELICS, MINT-1T-HTML, OmniCorpus-CC; `interleaved_presets`) -> whole documents
in `data.documents`' stored layout, as MDS (`DOCUMENT_MDS_COLUMNS`) or webdataset shards.

Rows are read a bounded batch at a time (`parquet_rows`); every file's columns are checked before anything is
written. Each image's bytes resolve, in order, from:
1. an inline Hugging Face `Image` struct in the `images` list (its `bytes` field, read by name);
2. img2dataset output joined by URL (`img2dataset_dir`: tars or parquet, successes only), through an on-disk URL
   index (sqlite in a temporary folder: memory stays bounded, the folder needs about the download's size);
3. a folder of files named by sha256(url) (with or without an extension).
Nothing is fetched: an image none of them holds is counted as `not_downloaded` and left out, its document's text
kept. Documents that cannot train whatever the recipe (lists that do not line up, metadata that does not, no image
position, no image resolved) are skipped and counted; the rest (image sizes, decoding, image runs, windows) is the
training-time processor's job, so one conversion serves any recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from flamingo_composer.data.documents import StoredImage, check_positions, pack_document, wds_sample
from flamingo_composer.data.items import SkipSample
from flamingo_composer.data.mds import DOCUMENT_MDS_COLUMNS
from flamingo_composer.shards.convert import ConversionReport, MdsSink, WdsSink, _progress, expand_inputs
from flamingo_composer.shards.img2dataset import iter_img2dataset_pairs
from flamingo_composer.shards.interleaved_presets import PRESETS, ParquetPreset
from flamingo_composer.shards.parquet_rows import iter_parquet_rows, read_schema

OUTPUT_FORMATS = ("mds", "wds")


@dataclass
class DocumentReport(ConversionReport):
    """ConversionReport plus what survived: images written by source, and the speed."""

    images_written: Counter = field(default_factory=Counter)  # source -> images written
    index: ConversionReport | None = None  # the img2dataset URL index: images read, failed downloads by status
    seconds: float = 0.0

    def summary(self, out: str | os.PathLike) -> str:
        lines = [super().summary(out)]
        skipped = sum(self.skipped.values())
        lines.append(f"documents: {self.written} written, {skipped} skipped")
        sources = ", ".join(f"{source} {count}" for source, count in sorted(self.images_written.items()))
        dropped = sum(self.images_dropped.values())
        lines.append(f"images: {sum(self.images_written.values())} written ({sources or 'none'}), {dropped} left out")
        if self.index is not None:
            failed = ", ".join(f"{status} {count}" for status, count in sorted(self.index.skipped.items()))
            lines.append(f"img2dataset index: {self.index.written} images by URL; not downloaded: {failed or 'none'}")
        rate = (self.written + skipped) / self.seconds if self.seconds > 0 else 0.0
        lines.append(f"{self.written + skipped} documents read in {self.seconds:.1f} s ({rate:.1f} documents/s)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Image bytes.


@dataclass(frozen=True)
class ImageRef:
    """One image position of a parquet row: its URL (or HF Image path) and, when the row embeds it, its bytes."""

    url: str | None
    data: bytes | None = None


def image_ref(item: Any) -> ImageRef:
    """An `images` list item: a URL string, or an HF `Image` struct ({'bytes', 'path'} in any field order)."""
    if isinstance(item, dict):
        return ImageRef(url=item.get("path") or item.get("url"), data=item.get("bytes") or None)
    return ImageRef(url=str(item))


def url_file_name(url: str) -> str:
    """The name of a URL's file in a folder of downloads named by sha256(url) (before any extension)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


class Img2datasetIndex:
    """URL -> downloaded bytes from an img2dataset output folder, in an on-disk sqlite table (bounded memory)."""

    def __init__(self, folder: str | os.PathLike, report: ConversionReport, workdir: str):
        self.db = sqlite3.connect(os.path.join(workdir, "img2dataset-urls.sqlite"))
        self.db.execute("CREATE TABLE images (url TEXT PRIMARY KEY, data BLOB)")
        with self.db:
            for pair in iter_img2dataset_pairs(folder, report):
                if pair.url:
                    self.db.execute("INSERT OR IGNORE INTO images VALUES (?, ?)", (pair.url, pair.image))
                    report.written += 1

    def get(self, url: str) -> bytes | None:
        found = self.db.execute("SELECT data FROM images WHERE url = ?", (url,)).fetchone()
        return bytes(found[0]) if found else None

    def close(self) -> None:
        self.db.close()


class ImageResolver:
    """An image position's bytes from the sources in the module docstring's order, and the source's name."""

    def __init__(self, img2dataset: Img2datasetIndex | None = None, url_folder: str | os.PathLike | None = None):
        self.img2dataset = img2dataset
        self.url_files: dict[str, Path] = {}
        if url_folder is not None:
            if not Path(url_folder).is_dir():
                raise FileNotFoundError(f"image folder {str(url_folder)!r} does not exist")
            with os.scandir(url_folder) as entries:  # one listing, then dictionary look-ups
                self.url_files = {e.name.split(".")[0]: Path(e.path) for e in entries if e.is_file()}

    def resolve(self, ref: ImageRef) -> tuple[bytes | None, str]:
        if ref.data:
            return ref.data, "inline"
        if ref.url and self.img2dataset is not None:
            data = self.img2dataset.get(ref.url)
            if data:
                return data, "img2dataset"
        if ref.url and self.url_files:
            path = self.url_files.get(url_file_name(ref.url))
            if path is not None:
                return path.read_bytes() or None, "image_folder"
        return None, "not_downloaded"


# ---------------------------------------------------------------------------------------------------------------
# Rows -> documents.


def check_columns(path: str, names: list[str], preset_name: str) -> None:
    """ValueError naming the columns the file has and the ones the preset wants, when any is missing."""
    wanted = PRESETS[preset_name].required_columns()
    missing = [name for name in wanted if name not in names]
    if missing:
        raise ValueError(
            f"{path}: not {preset_name} parquet: it has columns {names}; wanted {wanted} (missing {missing}); "
            f"choose the preset of this corpus ({', '.join(PRESETS)})"
        )


def _parsed(value: Any) -> Any:
    """A JSON string parsed (OBELICS stores metadata as JSON text); anything else as it is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def image_metadata(values: dict[str, Any], preset: ParquetPreset, positions: list[int], key: str) -> list[dict]:
    """Per image (in order), {column: its entry} of the preset's image-metadata columns; SkipSample
    ('misaligned_metadata') when a column's list does not line up with the positions or the images."""
    per_image: list[dict] = [{} for _ in positions]
    for column in preset.image_metadata:
        entries = _parsed(values.get(column))
        if entries is None:
            continue
        expected = len(values[preset.texts]) if preset.metadata_order == "position" else len(positions)
        if not isinstance(entries, list) or len(entries) != expected:
            got = f"{len(entries)} entries" if isinstance(entries, list) else f"a {type(entries).__name__}"
            raise SkipSample(
                "misaligned_metadata",
                f"document {key!r}: {column!r} holds {got}, expected {expected} (one per "
                f"{'position' if preset.metadata_order == 'position' else 'image'})",
            )
        for k, position in enumerate(positions):
            per_image[k][column] = _parsed(entries[position if preset.metadata_order == "position" else k])
    return per_image


def document_row(
    values: dict[str, Any], preset: ParquetPreset, key: str, resolver: ImageResolver, report: DocumentReport,
    where: str,
) -> dict[str, Any] | None:
    """One parquet row -> an MDS row of `pack_document`, or None (counted): unresolved images left out, texts kept."""
    texts, images = values[preset.texts], values[preset.images]
    check_positions(texts, images, key=key)
    positions = [i for i, item in enumerate(images) if item is not None]
    if not positions:
        raise SkipSample("no_image", f"document {key!r} has no image")
    metadata = image_metadata(values, preset, positions, key)
    stored: list[StoredImage | None] = [None] * len(texts)
    failures, sources = Counter(), Counter()
    for k, position in enumerate(positions):
        ref = image_ref(images[position])
        data, source = resolver.resolve(ref)
        if data is None:
            failures[source] += 1
            report.drop_image(source, f"{where}: image at position {position} ({ref.url!r})")
            continue
        sources[source] += 1
        stored[position] = StoredImage(data=data, url=ref.url, metadata=metadata[k] or None)
    if not sources:
        reason = next(iter(failures)) if len(failures) == 1 else "no_usable_image"
        raise SkipSample(reason, f"document {key!r}: none of its {len(positions)} images is downloaded")
    report.images_written.update(sources)
    kept = [i for i in range(len(texts)) if texts[i] is not None or stored[i] is not None]
    document_metadata = {c: _parsed(values[c]) for c in preset.document_metadata if values.get(c) is not None}
    return pack_document(key, [texts[i] for i in kept], [stored[i] for i in kept], document_metadata or None)


def iter_document_rows(
    schemas: dict[str, pa.Schema | None], preset_name: str, resolver: ImageResolver, report: DocumentReport
) -> Iterator[dict[str, Any]]:
    """Every convertible document of the files (path -> schema; None: unreadable, counted already), in order, as
    MDS rows; the others counted in `report`."""
    preset = PRESETS[preset_name]
    for path, schema in schemas.items():
        if schema is None:
            continue
        columns = [c for c in [*preset.required_columns(), *preset.document_metadata] if c in schema.names]
        stem = Path(path).name.split(".")[0]  # dot-free keys: webdataset splits member names at the first dot
        for row, values in iter_parquet_rows(path, columns, report):
            key, where = f"{stem}-{row:07d}", f"{path} row {row}"
            try:
                yield document_row(values, preset, key, resolver, report, where)
            except SkipSample as skip:
                report.skip(skip.reason, f"{where}: {skip.detail}")


# ---------------------------------------------------------------------------------------------------------------
# Outputs and the conversion.


def convert_interleaved_parquet(
    inputs: list[str],
    out: str | os.PathLike,
    *,
    preset: str,
    output_format: str = "mds",
    img2dataset_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    compression: str | None = None,
    size_limit: str | int = "64mb",
    docs_per_shard: int = 1000,
    progress: bool = True,
    require_all: bool = False,
) -> DocumentReport:
    """Parquet files (brace patterns, files or directories of `*.parquet`) of corpus `preset` -> documents in `out`.

    FileNotFoundError / ValueError (nothing written) for missing inputs, an unknown preset or format, or a file
    whose columns do not fit the preset (named with the columns it has and the ones wanted).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}")
    report = DocumentReport()
    files = expand_inputs(inputs, suffixes=(".parquet",), report=report, require_all=require_all)
    schemas = {path: read_schema(path, report) for path in files}  # footers only
    for path, schema in schemas.items():  # a wrong file stops the run before anything is written
        if schema is not None:
            check_columns(path, schema.names, preset)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="img2dataset-index-") as workdir:
        index = None
        if img2dataset_dir is not None:
            report.index = ConversionReport()
            index = Img2datasetIndex(img2dataset_dir, report.index, workdir)
        resolver = ImageResolver(index, image_dir)
        if output_format == "mds":
            sink = MdsSink(Path(out), DOCUMENT_MDS_COLUMNS, compression=compression, size_limit=size_limit)
            write = sink.write
        else:
            sink = WdsSink(Path(out), maxcount=docs_per_shard)
            write = lambda row: sink.write_sample(wds_sample(row))  # noqa: E731  (KEY.document.json + image bytes)
        with _progress(progress, f"{preset} parquet -> {output_format}") as bar:
            for row in iter_document_rows(schemas, preset, resolver, report):
                write(row)
                report.written += 1
                bar.update(1)
        report.outputs = sink.close()
        if index is not None:
            index.close()
    report.seconds = time.perf_counter() - started
    return report
