"""Reading what img2dataset wrote, in any of its three output forms, as `ImagePair`s: successes only, each failed
download counted by img2dataset's own status.

- `webdataset`: `00000.tar` (KEY.jpg + KEY.txt + KEY.json) beside `00000.parquet`, the status of every URL;
- `files`: `00000/` (the same three files per success) beside `00000.parquet`;
- `parquet`: `00000.parquet` holding every row, `jpg` (or `png` / `webp`, after `--encode_format`) null where the
  download failed, with `url`, `caption`, `status` and `error_message`.

Captions are optional (img2dataset runs on URL lists without one): such pairs carry `caption=None` and the pair
writer counts them; a URL join (interleaved documents) needs only `url` and `image`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from webdataset import tariterators

from flamingo_composer.data.laion import LAION_IMAGE_FIELDS
from flamingo_composer.shards.convert import ConversionReport, iter_tar_samples
from flamingo_composer.shards.pairs import ImagePair, write_pairs_mds
from flamingo_composer.shards.parquet_rows import iter_parquet_rows, read_schema

SUCCESS = "success"  # img2dataset's status of a downloaded image; the others (failed_to_download, ...) are reasons
CAPTION_COLUMNS = ("caption", "txt")  # img2dataset's metadata column, or the sample's own caption field


def iter_img2dataset_pairs(folder: str | os.PathLike, report: ConversionReport) -> Iterator[ImagePair]:
    """Every downloaded image of an img2dataset output folder, in shard order; failures land in `report`.

    The form is read from the folder: tars when there are any, else parquet files with an image column, else the
    `files` form's subfolders. Checked before anything is read: FileNotFoundError if `folder` is not a directory,
    ValueError naming the columns it has and the ones wanted for image parquet without a `key` column.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"img2dataset output folder {str(folder)!r} does not exist")
    tars = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith((".tar", ".tar.gz")))
    if tars:
        return _webdataset_form(tars, report)
    parquets = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    schemas = {path: read_schema(path, report) for path in parquets}
    with_images = {path: schema for path, schema in schemas.items() if schema is not None and _image_column(schema)}
    for path, schema in with_images.items():
        if "key" not in schema.names:
            raise ValueError(
                f"{path}: not img2dataset parquet output: it has columns {schema.names}; wanted 'key', "
                f"{_image_column(schema)!r}, 'url', 'caption', 'status', 'error_message'"
            )
    if with_images:
        return _parquet_form(with_images, report)
    return _files_form(folder, [path for path, schema in schemas.items() if schema is not None], report)


def _webdataset_form(tars: list[Path], report: ConversionReport) -> Iterator[ImagePair]:
    for tar in tars:
        for sample in iter_tar_samples(str(tar), report):
            pair = _sample_pair(sample, str(tar), report)
            if pair is not None:
                yield pair
        status_file = tar.with_name(tar.name.split(".")[0] + ".parquet")
        if status_file.is_file():
            count_failures(status_file, report)


def _parquet_form(schemas: dict[Path, pa.Schema], report: ConversionReport) -> Iterator[ImagePair]:
    for path, schema in schemas.items():
        yield from _parquet_pairs(path, schema, report)


def _files_form(folder: Path, status_files: list[Path], report: ConversionReport) -> Iterator[ImagePair]:
    yield from _files_pairs(folder, report)
    for path in status_files:
        count_failures(path, report)


def count_failures(path: Path, report: ConversionReport) -> None:
    """Count the rows of an img2dataset status parquet whose status is not `success`, by status."""
    schema = read_schema(path, report)
    if schema is None or "status" not in schema.names:
        return
    columns = [name for name in ("key", "url", "status", "error_message") if name in schema.names]
    for row, values in iter_parquet_rows(path, columns, report):
        if values["status"] != SUCCESS:
            report.skip(values["status"] or "no_status", _failure_detail(path, row, values))


def _failure_detail(path: Path, row: int, values: dict[str, Any]) -> str:
    return (
        f"{path} row {row}: key {values.get('key')!r} url {values.get('url')!r}: "
        f"{values.get('error_message') or 'no error message'}"
    )


def _image_column(schema: pa.Schema) -> str | None:
    return next((name for name in LAION_IMAGE_FIELDS if name in schema.names), None)


def _sample_pair(sample: dict[str, Any], where: str, report: ConversionReport) -> ImagePair | None:
    """A webdataset-style sample (`__key__`, image field, optional `txt` and `json`) -> pair, or None (counted)."""
    key = sample["__key__"]
    image = next((sample[ext] for ext in LAION_IMAGE_FIELDS if sample.get(ext)), None)
    if image is None:
        names = "/".join(LAION_IMAGE_FIELDS)
        report.skip("missing_image", f"{where}: sample {key!r} has no (or an empty) {names} member")
        return None
    caption = None
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as err:
            report.skip("bad_utf8", f"{where}: sample {key!r} caption: {err}")
            return None
    return ImagePair(key=key, url=_url_of(sample.get("json")), caption=caption, image=image, where=where)


def _url_of(meta: bytes | None) -> str | None:
    """The `url` of img2dataset's KEY.json; None when absent or unreadable (the image and caption are still used)."""
    try:
        url = json.loads(meta)["url"] if meta else None
    except (ValueError, TypeError, KeyError):
        return None
    return url if isinstance(url, str) else None


def _files_pairs(folder: Path, report: ConversionReport) -> Iterator[ImagePair]:
    """The `files` form: each subfolder's KEY.jpg + KEY.txt + KEY.json grouped by key, folders and keys sorted; a
    sample's files are read only when it is given (a folder holds a whole shard)."""
    wanted = set(LAION_IMAGE_FIELDS) | {"txt", "json"}
    for directory, subdirs, names in os.walk(folder):
        subdirs.sort()
        groups: dict[str, dict[str, str]] = {}  # key -> {ext: file name}
        for name in sorted(names):
            stem, ext = tariterators.base_plus_ext(name)
            if stem is not None and ext.lower() in wanted:
                groups.setdefault(stem, {})[ext.lower()] = name
        for key, files in groups.items():
            if "txt" not in files and not any(ext in files for ext in LAION_IMAGE_FIELDS):
                continue  # not a sample, e.g. 00000_stats.json
            sample: dict[str, Any] = {"__key__": key}
            for ext, name in files.items():
                with open(os.path.join(directory, name), "rb") as handle:
                    sample[ext] = handle.read()
            pair = _sample_pair(sample, directory, report)
            if pair is not None:
                yield pair


def _parquet_pairs(path: Path, schema: pa.Schema, report: ConversionReport) -> Iterator[ImagePair]:
    """The `parquet` form: successful rows as pairs, the others counted by status."""
    image_column = _image_column(schema)
    caption_column = next((name for name in CAPTION_COLUMNS if name in schema.names), None)
    wanted = ["key", "url", caption_column, "status", "error_message", image_column]
    columns = [name for name in wanted if name is not None and name in schema.names]
    for row, values in iter_parquet_rows(path, columns, report):
        status = values.get("status", SUCCESS)
        image = values[image_column]
        if status != SUCCESS:
            report.skip(status or "no_status", _failure_detail(path, row, values))
        elif not image:
            report.skip("missing_image", f"{path} row {row}: key {values['key']!r} has no {image_column} bytes")
        else:
            caption = values.get(caption_column) if caption_column else None
            if caption is None and caption_column:
                caption = ""  # img2dataset writes a null caption as an empty KEY.txt in its other forms
            yield ImagePair(
                key=str(values["key"]), url=values.get("url"), caption=caption, image=image, where=f"{path} row {row}"
            )


def convert_img2dataset_to_mds(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    compression: str | None = None,
    size_limit: str | int = "64mb",
    progress: bool = True,
) -> ConversionReport:
    """img2dataset output (any form) -> LAION MDS: downloaded images with their captions, original bytes."""
    report = ConversionReport()
    pairs = iter_img2dataset_pairs(folder, report)
    return write_pairs_mds(
        pairs, out, report, compression=compression, size_limit=size_limit, progress=progress,
        desc="img2dataset -> mds",
    )  # fmt: skip
