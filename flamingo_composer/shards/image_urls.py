"""The documented download path of natural-order interleaved parquet: every image URL of the files, de-duplicated in
first-seen order (so img2dataset's shards follow the documents), written as the parquet img2dataset reads (a `url`
column), and the img2dataset command that downloads them for `convert_interleaved_parquet --images-from-img2dataset`.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flamingo_composer.shards.convert import ConversionReport, expand_inputs
from flamingo_composer.shards.interleaved_parquet import check_columns, image_ref
from flamingo_composer.shards.interleaved_presets import PRESETS
from flamingo_composer.shards.parquet_rows import iter_parquet_rows, read_schema

URLS_PER_WRITE = 65_536  # URLs buffered before each parquet write (bounded memory besides the de-duplication set)


def iter_image_urls(files: list[str], preset: str, report: ConversionReport) -> Iterator[str]:
    """Each image URL of the (readable) files once, in first-seen order (inline images need no download)."""
    seen: set[str] = set()
    column = PRESETS[preset].images
    for path in files:
        for _, values in iter_parquet_rows(path, [column], report):
            for item in values[column] or []:
                if item is None:
                    continue
                ref = image_ref(item)
                if ref.data is None and ref.url and ref.url not in seen:
                    seen.add(ref.url)
                    yield ref.url


def img2dataset_command(url_file: str | os.PathLike, output_folder: str | os.PathLike) -> str:
    """The img2dataset call whose output `--images-from-img2dataset` joins by URL: webdataset tars (the URL in each
    KEY.json), the shorter side resized to 256 px without padding or upscaling (the trainer crops to its own size)."""
    return (
        f"img2dataset --url_list {shlex.quote(str(url_file))} --input_format parquet --url_col url "
        f"--output_format webdataset --output_folder {shlex.quote(str(output_folder))} "
        "--image_size 256 --resize_mode keep_ratio --resize_only_if_bigger True "
        "--processes_count 16 --thread_count 64"
    )


def export_image_urls(
    inputs: list[str], out: str | os.PathLike, *, preset: str, require_all: bool = False
) -> tuple[int, ConversionReport]:
    """Write the URL parquet `out` (one `url` column); returns (URLs written, report of unreadable inputs).
    ValueError naming the columns for a file that is not `preset` parquet, FileExistsError when `out` exists."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{str(out)!r} exists; choose a new output file")
    report = ConversionReport()
    files = expand_inputs(inputs, suffixes=(".parquet",), report=report, require_all=require_all)
    schemas = {path: read_schema(path, report) for path in files}  # footers only; None: unreadable (counted)
    for path, schema in schemas.items():
        if schema is not None:
            check_columns(path, schema.names, preset)
    readable = [path for path, schema in schemas.items() if schema is not None]
    schema = pa.schema([("url", pa.string())])
    written, pending = 0, []
    with pq.ParquetWriter(out, schema) as writer:
        for url in iter_image_urls(readable, preset, report):
            pending.append(url)
            if len(pending) == URLS_PER_WRITE:
                writer.write_table(pa.table({"url": pending}, schema=schema))
                written, pending = written + len(pending), []
        writer.write_table(pa.table({"url": pending}, schema=schema))
        written += len(pending)
    report.written = written
    return written, report
