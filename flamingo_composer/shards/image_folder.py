"""Image-caption pairs from a folder of image files and a captions table that names each file: a researcher's own
data. The table is CSV (a header row; `.tsv` tab-separated) or JSONL (one object per line), with a file column
(paths relative to the folder, as in Hugging Face's imagefolder `metadata.csv`) and a caption column (a string, or
in JSONL a list of strings: one pair each). Image files are checked here, since this is where a missing or broken
file shows up: each one missing or undecodable is counted and named, and its rows are left out."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flamingo_composer.data.images import decode_image
from flamingo_composer.data.items import SkipSample
from flamingo_composer.shards.convert import ConversionReport
from flamingo_composer.shards.pairs import ImagePair, captions_of, pair_key, write_pairs_mds

CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".json")


def iter_image_folder_pairs(
    images_dir: str | os.PathLike,
    captions_file: str | os.PathLike,
    file_column: str,
    caption_column: str,
    report: ConversionReport,
) -> Iterator[ImagePair]:
    """Every usable (image file, caption) pair, in table order; key = `<table stem>-<line>` (`-<i>` per caption
    of a list). Checked first: FileNotFoundError for a missing folder or table, ValueError for a table of another
    kind or whose header (CSV) / first object (JSONL) lacks a column, naming the columns it has."""
    images_dir, captions_file = Path(images_dir), Path(captions_file)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder {str(images_dir)!r} does not exist")
    if not captions_file.is_file():
        raise FileNotFoundError(f"captions file {str(captions_file)!r} does not exist")
    suffix = captions_file.suffix.lower()
    if suffix not in CSV_DELIMITERS and suffix not in JSONL_SUFFIXES:
        kinds = ", ".join([*CSV_DELIMITERS, *JSONL_SUFFIXES])
        raise ValueError(f"captions file {str(captions_file)!r}: expected one of {kinds}, got {suffix or 'none'!r}")
    columns = _first_columns(captions_file, report)
    missing = [name for name in (file_column, caption_column) if name not in columns]
    if missing:
        raise ValueError(
            f"{captions_file}: no column {', '.join(repr(m) for m in missing)}; it has columns {columns}; wanted "
            f"--file-col {file_column!r} (image path relative to {str(images_dir)!r}) and --caption-col "
            f"{caption_column!r}"
        )
    return _pairs(images_dir, captions_file, file_column, caption_column, report)


def _records(captions_file: Path, report: ConversionReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line, record) of the table; JSONL lines that are not objects are counted and named."""
    delimiter = CSV_DELIMITERS.get(captions_file.suffix.lower())
    if delimiter is not None:
        with open(captions_file, newline="", encoding="utf-8-sig", errors="replace") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    report.skip("malformed_csv", f"{captions_file} line {reader.line_num}: {err}")
                    continue
                yield reader.line_num, record
    with open(captions_file, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as err:  # also bad UTF-8
                report.skip("malformed_json", f"{captions_file} line {number}: {err}")
                continue
            if not isinstance(record, dict):
                kind = type(record).__name__
                report.skip("malformed_json", f"{captions_file} line {number}: a {kind}, not an object")
                continue
            yield number, record


def _first_columns(captions_file: Path, report: ConversionReport) -> list[str]:
    """The CSV header, or the keys of the first JSONL object (what `iter_image_folder_pairs` checks)."""
    if captions_file.suffix.lower() in CSV_DELIMITERS:
        with open(captions_file, newline="", encoding="utf-8-sig", errors="replace") as handle:
            header = next(csv.reader(handle, delimiter=CSV_DELIMITERS[captions_file.suffix.lower()]), [])
        return header
    first = next(_records(captions_file, ConversionReport()), None)  # its skips are counted again when read
    return list(first[1]) if first else []


def _pairs(
    images_dir: Path, captions_file: Path, file_column: str, caption_column: str, report: ConversionReport
) -> Iterator[ImagePair]:
    stem = captions_file.name.split(".")[0]
    for line, record in _records(captions_file, report):
        where = f"{captions_file} line {line}"
        name = record.get(file_column)
        if not isinstance(name, str) or not name.strip():
            report.skip("missing_file_name", f"{where}: no {file_column!r}")
            continue
        captions = captions_of(record.get(caption_column))
        if not captions:
            report.skip("missing_caption", f"{where}: no {caption_column!r} for {name!r}")
            continue
        image = _image_file_bytes(images_dir / name.strip(), where, report)
        if image is None:
            continue
        for index, caption in captions:
            yield ImagePair(key=pair_key(stem, line, index), url=None, caption=caption, image=image, where=where)


def _image_file_bytes(path: Path, where: str, report: ConversionReport) -> bytes | None:
    if not path.is_file():
        report.skip("missing_image", f"{where}: {str(path)!r} does not exist")
        return None
    try:
        image = path.read_bytes()
    except OSError as err:
        report.skip("unreadable_image", f"{where}: {path}: {err}")
        return None
    try:
        decode_image(image, where=f"{where}: {path}")
    except SkipSample as skip:
        report.skip(skip.reason, skip.detail)
        return None
    return image


def convert_image_folder_to_mds(
    images_dir: str | os.PathLike,
    captions_file: str | os.PathLike,
    out: str | os.PathLike,
    *,
    file_column: str = "file_name",
    caption_column: str = "caption",
    compression: str | None = None,
    size_limit: str | int = "64mb",
    progress: bool = True,
) -> ConversionReport:
    """A folder of images + a captions CSV / JSONL -> LAION MDS, each image's original bytes."""
    report = ConversionReport()
    pairs = iter_image_folder_pairs(images_dir, captions_file, file_column, caption_column, report)
    return write_pairs_mds(
        pairs, out, report, compression=compression, size_limit=size_limit, progress=progress,
        desc="image folder -> mds",
    )  # fmt: skip
