"""Shard conversion behind tools/convert_*.py: read webdataset tars or raw MMC4 jsonl (plain, .gz or zipped) with
its downloaded images; write MDS (mosaicml-streaming) or webdataset shards; count every
sample, image or shard left out, by reason.

Converters copy bytes: images keep their original encoding (no lossy re-encode) and text is kept as it is, so
one converted dataset serves any recipe; the filters of SPEC 2 (image size, similarity, token limits) stay in the
training-time preprocessing. The one exception is raw MMC4, whose downloaded image files are checked here
(missing or undecodable), because that is where broken downloads show up.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm
from webdataset import tariterators
from webdataset.shardlists import expand_urls

from flamingo_composer.data.config import is_remote_url, local_path
from flamingo_composer.data.images import decode_image
from flamingo_composer.data.items import SkipSample
from flamingo_composer.data.laion import LAION_IMAGE_FIELDS
from flamingo_composer.data.mds import BYTES_RANGE_FIELD, LAION_MDS_COLUMNS, MMC4_MDS_COLUMNS, mmc4_doc_to_mds
from flamingo_composer.data.mmc4 import parse_mmc4_json
from flamingo_composer.shards.zip_salvage import LOCAL_MAGIC, salvaged_members

MAX_EXAMPLES_PER_REASON = 3
MAX_MISSING_LISTED = 50  # missing inputs named in the summary (as_dict() holds them all)


@dataclass
class ConversionReport:
    """What a conversion wrote and what it left out, by reason (with the first few details of each)."""

    written: int = 0
    outputs: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # samples / documents / shards not written
    images_dropped: Counter = field(default_factory=Counter)  # MMC4 images written without bytes
    examples: dict[str, list[str]] = field(default_factory=dict)
    missing_inputs: list[str] = field(default_factory=list)  # local input paths (after brace expansion) absent

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self._remember(reason, detail)

    def drop_image(self, reason: str, detail: str) -> None:
        self.images_dropped[reason] += 1
        self._remember(f"image:{reason}", detail)

    def _remember(self, reason: str, detail: str) -> None:
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append(detail)

    def as_dict(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "outputs": list(self.outputs),
            "skipped": dict(sorted(self.skipped.items())),
            "images_dropped": dict(sorted(self.images_dropped.items())),
            "missing_inputs": list(self.missing_inputs),
        }

    def summary(self, out: str | os.PathLike) -> str:
        """Human-readable final summary: what was written where, and every skip reason with examples."""
        lines = [f"wrote {self.written} samples in {len(self.outputs)} shard file(s) to {out}"]
        if self.missing_inputs:
            lines.append(f"inputs that do not exist (left out): {len(self.missing_inputs)}")
            lines.extend(f"  {path}" for path in self.missing_inputs[:MAX_MISSING_LISTED])
            if len(self.missing_inputs) > MAX_MISSING_LISTED:
                lines.append(f"  ... and {len(self.missing_inputs) - MAX_MISSING_LISTED} more")
        for title, counts, prefix in (
            ("skipped", self.skipped, ""),
            ("images left without bytes", self.images_dropped, "image:"),
        ):
            if not counts:
                continue
            lines.append(f"{title}: {sum(counts.values())}")
            for reason, count in sorted(counts.items()):
                lines.append(f"  {reason}: {count}")
                lines.extend(f"    e.g. {detail}" for detail in self.examples.get(prefix + reason, []))
        if not self.skipped and not self.images_dropped and not self.missing_inputs:
            lines.append("nothing skipped")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def expand_inputs(
    patterns: list[str], *, suffixes: tuple[str, ...], report: ConversionReport, require_all: bool = False
) -> list[str]:
    """Brace-expand each pattern (as the loaders do); a local directory stands for its files ending in
    `suffixes` (sorted, recursive); remote URLs and `pipe:` commands pass through unchecked.

    Local paths that do not exist are left out and listed in `report.missing_inputs` (a brace range over a
    release with gaps, such as MMC4's shard numbers, converts what exists). FileNotFoundError, naming them, when
    none exists, or any is missing with `require_all`.
    """
    paths: list[str] = []
    for pattern in patterns:
        for url in expand_urls(str(pattern)):
            if is_remote_url(url):
                paths.append(url)
                continue
            path = local_path(url)
            if os.path.isdir(path):
                found = sorted(
                    str(p) for p in Path(path).rglob("*") if p.is_file() and p.name.endswith(suffixes)
                )
                if not found:
                    raise FileNotFoundError(
                        f"input directory {path!r} holds no file ending in {', '.join(suffixes)}"
                    )
                paths.extend(found)
            elif os.path.isfile(path):
                paths.append(path)
            else:
                report.missing_inputs.append(path)
    missing = report.missing_inputs
    if missing and (require_all or not paths):
        why = "--require-all is set" if paths else "no input exists"
        raise FileNotFoundError(
            f"{len(missing)} input(s) do not exist ({why}): {_listing(missing, 10)} (patterns: {patterns!r})"
        )
    if not paths:
        raise FileNotFoundError(f"no input files given (patterns: {patterns!r})")
    return paths


def _listing(items: list[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _first_arg(exc: BaseException) -> str:
    """webdataset appends the stream to the message and to the args; keep only the message."""
    message = str(exc.args[0]) if exc.args else str(exc)
    return f"{type(exc).__name__}: {message.split(' @ ')[0]}"


def iter_tar_samples(shard: str, report: ConversionReport) -> Iterator[dict[str, Any]]:
    """webdataset samples (`{'__key__': key, ext: bytes, ...}`) of one tar shard, in order.

    A truncated or corrupt tar is counted once as `corrupt_tar` and the samples read before the damage are kept;
    a repeated member name in one sample is counted as `duplicate_member`.
    """
    tar_errors: list[BaseException] = []
    member_errors: list[BaseException] = []

    def on_tar_error(exc: BaseException) -> bool:
        tar_errors.append(exc)
        return True

    def on_member_error(exc: BaseException) -> bool:
        member_errors.append(exc)
        return True

    streams = tariterators.url_opener([{"url": shard}], handler=on_tar_error)
    files = tariterators.tar_file_expander(streams, handler=on_tar_error)
    yield from tariterators.group_by_keys(files, handler=on_member_error)
    if tar_errors:
        report.skip(
            "corrupt_tar", f"{shard}: {_first_arg(tar_errors[0])} (samples before the damage were kept)"
        )
    for exc in member_errors:
        report.skip("duplicate_member", f"{shard}: {_first_arg(exc)}")


def iter_jsonl_records(path: str, report: ConversionReport) -> Iterator[tuple[str, str, int, bytes]]:
    """(where, member label, 0-based line number, line bytes) of a `.jsonl`, `.jsonl.gz` or zip of `.jsonl`
    files (MMC4 is published in all three: the surviving mmc4-ff / mmc4-core-ff as plain jsonl and as zips of many
    jsonl members). Blank lines are not records; the label keeps keys unique across a zip's members
    (`member_label`).

    An archive inside a zip (zip or gzip) is counted (`nested_archive`) and named, never read as lines. A member
    that breaks part way (bad CRC, damaged data) is counted (`corrupt_member`), its lines before kept, and the next
    member read. A zip that lost its end (a cut download: no central directory) is recognised by its first local
    header and streamed from its local headers (`zip_salvage`, bounded memory whatever its size): every complete
    line up to the cut is yielded, then `zipfile.BadZipFile` names the file.
    """
    if _is_whole_zip(path):
        with zipfile.ZipFile(path) as archive:
            members = sorted(name for name in archive.namelist() if not name.endswith("/"))
            if not members:
                raise ValueError(f"zip archive {path!r} holds no file")
            for member in members:
                where = f"{path}:{member}"
                try:
                    with archive.open(member) as handle:
                        if _is_archive(member, handle.peek(4)[:4]):
                            _skip_nested_archive(where, report)
                            continue
                        yield from _numbered_lines(where, member_label(path, member), handle)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
                    report.skip("corrupt_member", f"{where}: {type(err).__name__}: {err} (lines before it kept)")
    elif _starts_like_zip(path):
        read = 0
        for member in salvaged_members(path):
            if member.name.endswith("/"):
                continue
            where = f"{path}:{member.name}"
            if _is_archive(member.name, member.head(4)):
                _skip_nested_archive(where, report)
                continue
            read += 1
            yield from _numbered_lines(where, member_label(path, member.name), member.lines())
        raise zipfile.BadZipFile(
            f"damaged zip archive (no central directory: cut or incomplete); read {read} member(s) up to the damage"
        )
    elif path.endswith(".gz"):
        with gzip.open(path, "rb") as handle:
            yield from _numbered_lines(path, "", handle)
    else:
        with open(path, "rb") as handle:
            yield from _numbered_lines(path, "", handle)


def _is_whole_zip(path: str) -> bool:
    """A zip whose central directory describes this file from its first byte. `zipfile.is_zipfile` alone also
    accepts a cut zip whose last 64 KB hold the end record of a stored zip inside it (then that inner zip would be
    read in its place)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            offsets = [info.header_offset for info in archive.infolist()]
    except (zipfile.BadZipFile, OSError):
        return False
    return not offsets or min(offsets) == 0


def member_label(path: str, member: str) -> str:
    """The zip member's stem, part of its documents' keys; "" when it is the archive's own stem
    (`docs_shard_7_v2.jsonl` in `docs_shard_7_v2.jsonl.zip`). The same whether or not the zip is cut."""
    stem = os.path.basename(member).split(".")[0]
    return "" if stem == os.path.basename(path).split(".")[0] else stem


_GZIP_MAGIC = b"\x1f\x8b"


def _is_archive(member: str, head: bytes) -> bool:
    """A zip or gzip inside the zip, by name or by its first bytes."""
    return member.lower().endswith((".zip", ".gz")) or head.startswith((LOCAL_MAGIC, _GZIP_MAGIC))


def _skip_nested_archive(where: str, report: ConversionReport) -> None:
    report.skip("nested_archive", f"{where}: an archive inside the zip is not read (extract it and convert its files)")


def _starts_like_zip(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == LOCAL_MAGIC


def _numbered_lines(where: str, label: str, lines: Iterable[bytes]) -> Iterator[tuple[str, str, int, bytes]]:
    for number, line in enumerate(lines):
        if line.strip():
            yield where, label, number, line


# ---------------------------------------------------------------------------------------------------------------
# Records


def laion_record(sample: dict[str, Any], report: ConversionReport, where: str) -> dict[str, Any] | None:
    """A webdataset LAION sample -> `LAION_MDS_COLUMNS` record with the original image bytes, or None (counted)."""
    key = sample["__key__"]
    image = next((sample[ext] for ext in LAION_IMAGE_FIELDS if ext in sample), None)
    if not image:
        names = "/".join(LAION_IMAGE_FIELDS)
        report.skip("missing_image", f"{where}: sample {key!r} has no (or an empty) {names} member")
        return None
    if "txt" not in sample:
        report.skip("missing_caption", f"{where}: sample {key!r} has no .txt member")
        return None
    try:
        caption = sample["txt"].decode("utf-8")
    except UnicodeDecodeError as err:
        report.skip("bad_utf8", f"{where}: sample {key!r} caption: {err}")
        return None
    return {"key": key, "jpg": image, "txt": caption}


def mmc4_record(sample: dict[str, Any], report: ConversionReport, where: str) -> dict[str, Any] | None:
    """A webdataset MMC4 sample (`KEY.json` with image_base64) -> `MMC4_MDS_COLUMNS` record, or None (counted).

    Images whose base64 is missing or invalid keep their `image_info` entry with an empty byte range (counted
    under images left without bytes), exactly as the training-time preprocessing expects; a document left with
    no image bytes at all can never train and is skipped (`no_usable_image`).
    """
    key = sample["__key__"]
    if "json" not in sample:
        report.skip("missing_json", f"{where}: sample {key!r} has no .json member")
        return None
    try:
        doc = parse_mmc4_json(sample["json"], key=key)
        record = mmc4_doc_to_mds(doc, key)
    except SkipSample as skip:
        report.skip(skip.reason, f"{where}: {skip.detail}")
        return None
    # [start, end) of each image in record["image_bytes"]; empty when the base64 was missing or invalid
    spans = [stored[BYTES_RANGE_FIELD] for stored in record["doc"]["image_info"]]
    empty = [i for i, (start, end) in enumerate(spans) if start == end]
    if len(empty) == len(doc["image_info"]):
        report.skip("no_usable_image", f"{where}: document {key!r} has no image with valid base64 bytes")
        return None
    for i in empty:
        reason = "missing_image" if not doc["image_info"][i].get("image_base64") else "bad_base64"
        report.drop_image(reason, f"{where}: document {key!r} image_info[{i}]")
    return record


def mmc4_image_dirs(images_dir: Path, jsonl_path: str, member: str | None = None) -> list[Path]:
    """Where the images of one jsonl file (or of one `member` of a zip) may lie, in search order:
    - `images_dir` itself;
    - `images_dir/<N>` for `docs_shard_<N>_v2.jsonl.zip` (the layout of the reference's download script);
    - `images_dir/<name>_images`, the per-shard folder mmc4's own `scripts/download_images.py` writes by default
      (`./{shard_name}_images/`, shard_name = the input's stem: `docs_shard_0_v2.jsonl` for the zipped file,
      `docs_shard_0_v2` for a plain jsonl); both spellings are tried, for the archive's name and then for the
      zip member's (`shard_151.zip` holding `docs_no_face_shard_151_v3.jsonl`: `docs_no_face_shard_151_v3_images/`).
    """
    name = os.path.basename(jsonl_path)
    dirs = [images_dir]
    shard = re.search(r"shard_(\d+)", name)
    if shard:
        dirs.append(images_dir / shard.group(1))
    names = [name] + ([os.path.basename(member)] if member else [])
    for stem in dict.fromkeys(s for n in names for s in (Path(n).stem, n.split(".")[0])):  # ordered, unique
        dirs.append(images_dir / f"{stem}_images")
    return dirs


def embed_raw_mmc4_images(doc: dict, image_dirs: list[Path], report: ConversionReport, where: str) -> int:
    """Set `image_base64` on each `image_info` entry from its downloaded file; returns how many were embedded.

    A missing or undecodable file leaves its entry without `image_base64` (counted), so the rows of the
    similarity matrix still line up with `image_info`.
    """
    embedded = 0
    for i, info in enumerate(doc["image_info"]):
        name = info.get("image_name")
        if not isinstance(name, str) or not name:
            report.drop_image("missing_image", f"{where} image_info[{i}] has no 'image_name'")
            continue
        path = next((d / name for d in image_dirs if (d / name).is_file()), None)
        if path is None:
            searched = " or ".join(str(d) for d in image_dirs)
            report.drop_image("missing_image", f"{where} image_info[{i}]: {name!r} not found in {searched}")
            continue
        try:
            raw = path.read_bytes()
        except OSError as err:
            report.drop_image("unreadable_image", f"{path}: {err}")
            continue
        try:
            decode_image(raw, where=str(path))
        except SkipSample as skip:
            report.drop_image(skip.reason, skip.detail)
            continue
        info["image_base64"] = base64.b64encode(raw).decode("ascii")
        embedded += 1
    return embedded


def raw_mmc4_documents(
    inputs: list[str], images_dir: Path, report: ConversionReport
) -> Iterator[tuple[str, dict]]:
    """(key, document with image_base64) for every usable raw MMC4 document.

    key = `<file stem>[-<zip member stem>]-<line>`, dot-free (webdataset splits names at the first dot).
    """
    for path in inputs:
        stem = os.path.basename(path).split(".")[0]
        image_dirs_of: dict[str, list[Path]] = {}  # per source: the file, or `path:member` of a zip
        try:
            for source, label, number, line in iter_jsonl_records(path, report):
                where = f"{source} line {number + 1}"
                if source not in image_dirs_of:
                    member = source[len(path) + 1 :] if source.startswith(f"{path}:") else None
                    image_dirs_of[source] = mmc4_image_dirs(images_dir, path, member)
                image_dirs = image_dirs_of[source]
                key = "-".join(part for part in (stem, label, f"{number:07d}") if part)
                try:
                    doc = parse_mmc4_json(line, key=key)
                except SkipSample as skip:
                    report.skip(skip.reason, f"{where}: {skip.detail}")
                    continue
                infos = doc.get("image_info")
                if not isinstance(infos, list) or not all(isinstance(info, dict) for info in infos):
                    report.skip("malformed_json", f"{where}: field 'image_info' must be a list of objects")
                    continue
                if embed_raw_mmc4_images(doc, image_dirs, report, where) == 0:
                    report.skip(
                        "no_usable_image", f"{where}: none of its {len(doc['image_info'])} images is usable"
                    )
                    continue
                yield key, doc
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
            report.skip(
                "corrupt_input", f"{path}: {type(err).__name__}: {err} (documents before it were kept)"
            )


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def _require_empty_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output directory {str(out)!r} exists and is not empty; choose a new --out")


class MdsSink:
    """Thin wrapper of streaming's MDSWriter that records the shard files it wrote."""

    def __init__(self, out: Path, columns: dict[str, str], *, compression: str | None, size_limit: str | int):
        from streaming import MDSWriter

        _require_empty_dir(out)
        self.out = out
        self.writer = MDSWriter(out=str(out), columns=columns, compression=compression, size_limit=size_limit)

    def write(self, record: dict[str, Any]) -> None:
        self.writer.write(record)

    def close(self) -> list[str]:
        self.writer.finish()
        return sorted(str(p) for p in self.out.iterdir() if p.name != "index.json")


class WdsSink:
    """webdataset ShardWriter of samples (`{"__key__": ..., extension: bytes}`) into `out/shard-NNNNNN.tar`."""

    def __init__(self, out: Path, *, maxcount: int):
        import webdataset

        _require_empty_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.writer = webdataset.ShardWriter(str(out / "shard-%06d.tar"), maxcount=maxcount, verbose=0)
        self.count = 0

    def write_sample(self, sample: dict[str, Any]) -> None:
        self.writer.write(sample)
        self.count += 1

    def close(self) -> list[str]:
        self.writer.close()
        shards = sorted(self.out.glob("shard-*.tar"))
        if self.count == 0:  # ShardWriter opens its first shard eagerly
            for shard in shards:
                shard.unlink()
            return []
        return [str(p) for p in shards]


def _progress(enabled: bool, desc: str) -> tqdm:
    return tqdm(desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------------------
# Conversions


def _write_webdataset_samples(
    samples: Iterable[tuple[str, Iterable[dict[str, Any]]]],
    to_record: Callable[[dict[str, Any], ConversionReport, str], dict[str, Any] | None],
    sink: MdsSink,
    report: ConversionReport,
    progress: bool,
    desc: str,
) -> ConversionReport:
    with _progress(progress, desc) as bar:
        for where, source_samples in samples:
            bar.set_postfix_str(os.path.basename(where), refresh=False)
            for sample in source_samples:
                record = to_record(sample, report, where)
                if record is not None:
                    sink.write(record)
                    report.written += 1
                bar.update(1)
    report.outputs = sink.close()
    return report


def convert_wds_to_mds(
    inputs: list[str],
    out: str | os.PathLike,
    *,
    layout: str,
    compression: str | None = None,
    size_limit: str | int = "64mb",
    progress: bool = True,
    require_all: bool = False,
) -> ConversionReport:
    """webdataset shards of either layout (`laion`: KEY.jpg|jpeg|png + KEY.txt; `mmc4`: KEY.json with
    image_base64) -> MDS in `data.mds`'s columns. `inputs` are brace patterns, tar files or directories."""
    if layout not in ("laion", "mmc4"):
        raise ValueError(f"layout must be 'laion' or 'mmc4', got {layout!r}")
    report = ConversionReport()
    shards = expand_inputs(inputs, suffixes=(".tar", ".tar.gz", ".tgz"), report=report, require_all=require_all)
    columns = LAION_MDS_COLUMNS if layout == "laion" else MMC4_MDS_COLUMNS
    sink = MdsSink(Path(out), columns, compression=compression, size_limit=size_limit)
    samples = ((shard, iter_tar_samples(shard, report)) for shard in shards)
    to_record = laion_record if layout == "laion" else mmc4_record
    return _write_webdataset_samples(samples, to_record, sink, report, progress, f"{layout} wds -> mds")


def convert_raw_mmc4(
    inputs: list[str],
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    output_format: str,
    compression: str | None = None,
    size_limit: str | int = "64mb",
    docs_per_shard: int = 1000,
    progress: bool = True,
    require_all: bool = False,
) -> ConversionReport:
    """Raw MMC4 (`.jsonl`, `.jsonl.gz` or zipped jsonl, plus the folder of downloaded images named by
    `image_name`) -> webdataset shards (`KEY.json` with image_base64, like the reference's MMC4 shards) or MDS
    (`data.mds`'s MMC4 columns, original image bytes). Missing and undecodable images are counted."""
    if output_format not in ("wds", "mds"):
        raise ValueError(f"output format must be 'wds' or 'mds', got {output_format!r}")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images directory {str(images_dir)!r} does not exist")
    report = ConversionReport()
    files = expand_inputs(inputs, suffixes=(".jsonl", ".jsonl.gz", ".zip"), report=report, require_all=require_all)
    if output_format == "wds":
        wds_sink = WdsSink(Path(out), maxcount=docs_per_shard)

        def write(key: str, doc: dict) -> None:  # KEY.json with image_base64: the reference's MMC4 shard layout
            wds_sink.write_sample({"__key__": key, "json": json.dumps(doc).encode("utf-8")})

        close = wds_sink.close
    else:
        mds_sink = MdsSink(Path(out), MMC4_MDS_COLUMNS, compression=compression, size_limit=size_limit)

        def write(key: str, doc: dict) -> None:
            mds_sink.write(mmc4_doc_to_mds(doc, key))

        close = mds_sink.close
    with _progress(progress, f"raw mmc4 -> {output_format}") as bar:
        for key, doc in raw_mmc4_documents(files, images_dir, report):
            write(key, doc)
            report.written += 1
            bar.update(1)
    report.outputs = close()
    return report
