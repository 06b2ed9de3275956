"""Image-caption pairs from parquet files whose rows hold an image and its caption, the way caption sets are
published on the Hugging Face hub: the image as raw bytes or as the `datasets` Image struct `{bytes, path}` (read
by field name: the struct's field order differs between `datasets` versions), the caption as a string or a list of
strings (one pair per caption, e.g. COCO's five). Read a row group and a bounded batch at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from flamingo_composer.shards.convert import ConversionReport, expand_inputs
from flamingo_composer.shards.pairs import ImagePair, captions_of, pair_key, write_pairs_mds
from flamingo_composer.shards.parquet_rows import iter_parquet_rows, read_schema

IMAGE_STRUCT_BYTES = "bytes"  # the field of `datasets.Image`'s struct that holds the encoded image


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _image_type_ok(kind: pa.DataType) -> bool:
    """Raw bytes, or a struct with a binary `bytes` field (datasets' Image, whatever its field order)."""
    if _is_binary(kind):
        return True
    if pa.types.is_struct(kind):
        index = kind.get_field_index(IMAGE_STRUCT_BYTES)
        return index >= 0 and _is_binary(kind.field(index).type)
    return False


def _caption_type_ok(kind: pa.DataType) -> bool:
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _is_text(kind.value_type)
    return _is_text(kind)


def check_columns(path: str, schema: pa.Schema, image_column: str, caption_column: str) -> None:
    """ValueError naming the file, the columns it has (with their types) and the ones wanted."""
    has = ", ".join(f"{field.name} ({field.type})" for field in schema)
    wanted = (
        f"wanted --image-col {image_column!r} (bytes, or an Image struct with a 'bytes' field) and "
        f"--caption-col {caption_column!r} (a string or a list of strings)"
    )
    for column, type_ok in ((image_column, _image_type_ok), (caption_column, _caption_type_ok)):
        if column not in schema.names:
            raise ValueError(f"{path}: no column {column!r}; it has columns {has}; {wanted}")
        if not type_ok(schema.field(column).type):
            raise ValueError(f"{path}: column {column!r} is {schema.field(column).type}; {wanted}")


def iter_parquet_pairs(
    files: list[str], image_column: str, caption_column: str, report: ConversionReport
) -> Iterator[ImagePair]:
    """Every (image, caption) pair of the files, in order; key = `<file stem>-<row>` (`-<i>` per caption of a
    list). Columns are checked in every file before anything is read (ValueError, see `check_columns`); unreadable
    files and rows without image bytes or caption are counted and named."""
    readable = []
    for path in files:
        schema = read_schema(path, report)
        if schema is not None:
            check_columns(path, schema, image_column, caption_column)
            readable.append(path)
    return _pairs(readable, image_column, caption_column, report)


def _pairs(files: list[str], image_column: str, caption_column: str, report: ConversionReport) -> Iterator[ImagePair]:
    for path in files:
        stem = Path(path).name.split(".")[0]
        for row, values in iter_parquet_rows(path, [image_column, caption_column], report):
            where = f"{path} row {row}"
            image = _image_bytes(values[image_column], where, report)
            if image is None:
                continue
            captions = captions_of(values[caption_column])
            if not captions:
                report.skip("missing_caption", f"{where}: no caption")
            for index, caption in captions:
                yield ImagePair(key=pair_key(stem, row, index), url=None, caption=caption, image=image, where=where)


def _image_bytes(value: Any, where: str, report: ConversionReport) -> bytes | None:
    if isinstance(value, dict):  # datasets' Image struct
        if not value.get(IMAGE_STRUCT_BYTES) and value.get("path"):
            report.skip("image_not_embedded", f"{where}: the image is a path ({value['path']!r}), not bytes")
            return None
        value = value.get(IMAGE_STRUCT_BYTES)
    if not value:
        report.skip("missing_image", f"{where}: no image bytes")
        return None
    return value


def convert_parquet_pairs_to_mds(
    inputs: list[str],
    out: str | os.PathLike,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    compression: str | None = None,
    size_limit: str | int = "64mb",
    progress: bool = True,
    require_all: bool = False,
) -> ConversionReport:
    """Caption parquet files (brace patterns, files or directories of `*.parquet`) -> LAION MDS, original bytes."""
    report = ConversionReport()
    files = expand_inputs(inputs, suffixes=(".parquet",), report=report, require_all=require_all)
    pairs = iter_parquet_pairs(files, image_column, caption_column, report)
    return write_pairs_mds(
        pairs, out, report, compression=compression, size_limit=size_limit, progress=progress,
        desc="parquet pairs -> mds",
    )  # fmt: skip
