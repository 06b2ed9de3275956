"""MMC4 as it is published since 2025 (only mmc4-ff and mmc4-core-ff survive, as plain jsonl and as zips of many
jsonl members): those convert with each member's images found by its stem, an archive inside a zip is named and not
read, and a cut zip is streamed from its local headers in bounded memory (flamingo_composer/shards/zip_salvage.py).
"""

from __future__ import annotations

import io
import json
import random
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from shard_layouts import jpeg_bytes, read_mds

from flamingo_composer.data.mds import mmc4_doc_from_mds
from flamingo_composer.shards.convert import ConversionReport, convert_raw_mmc4, iter_jsonl_records
from flamingo_composer.shards.zip_salvage import CHUNK_BYTES

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def mmc4_ff_document(shard: int, index: int) -> tuple[dict, dict[str, bytes]]:
    """A document as mmc4-ff publishes it (no faces, images by name) and its downloaded image files."""
    names = [f"{shard:05d}{index:03d}{slot}.jpg" for slot in range(2)]
    images = {name: jpeg_bytes(COLORS[(shard + index + slot) % 4]) for slot, name in enumerate(names)}
    doc = {
        "text_list": [f"shard {shard} document {index} first .", "a square .", "another square ."],
        "image_info": [
            {"image_name": name, "face_detections": None, "matched_text_index": slot + 1, "matched_sim": 0.3,
             "raw_url": f"http://example.com/{name}"}
            for slot, name in enumerate(names)
        ],
        "similarity_matrix": [[0.1, 0.3, 0.2], [0.1, 0.2, 0.3]],
        "url": f"http://example.com/{shard}/{index}.html",
        "could_have_url_duplicate": 0,
    }  # fmt: skip
    return doc, images


def write_member_images(images_dir: Path, member: str, docs: list[tuple[dict, dict]]) -> None:
    """Where mmc4's download script puts a jsonl's images: `<its stem>_images/` (none at the top of images_dir)."""
    folder = images_dir / f"{member.split('.')[0]}_images"
    folder.mkdir(parents=True, exist_ok=True)
    for _, images in docs:
        for name, data in images.items():
            (folder / name).write_bytes(data)


def jsonl(docs: list[tuple[dict, dict]]) -> str:
    return "".join(json.dumps(doc) + "\n" for doc, _ in docs)


def converted(out: Path) -> list[tuple[str, str, list[bytes | None]]]:
    """(key, document url, image bytes) of MDS output."""
    result = []
    for row in read_mds(out):
        doc, images = mmc4_doc_from_mds(row)
        result.append((row["key"], doc["url"], images))
    return result


def test_plain_jsonl_and_zips_of_many_members_convert_with_images_found_by_member_stem(tmp_path):
    release, images_dir = tmp_path / "mmc4-core-ff", tmp_path / "images"
    release.mkdir()
    shards = {shard: [mmc4_ff_document(shard, i) for i in range(3)] for shard in range(4)}
    with zipfile.ZipFile(release / "part_0.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for shard in (0, 1, 2):
            member = f"docs_no_face_shard_{shard}_v3.jsonl"
            archive.writestr(member, jsonl(shards[shard]))
            write_member_images(images_dir, member, shards[shard])
    (release / "docs_no_face_shard_3_v3.jsonl").write_text(jsonl(shards[3]))
    write_member_images(images_dir, "docs_no_face_shard_3_v3.jsonl", shards[3])

    report = convert_raw_mmc4([str(release)], images_dir, tmp_path / "mds", output_format="mds", progress=False)

    assert report.written == 12 and not report.skipped and not report.images_dropped
    rows = converted(tmp_path / "mds")
    assert len({key for key, _, _ in rows}) == 12
    assert [key for key, _, _ in rows][:4] == [
        "docs_no_face_shard_3_v3-0000000", "docs_no_face_shard_3_v3-0000001", "docs_no_face_shard_3_v3-0000002",
        "part_0-docs_no_face_shard_0_v3-0000000",
    ]  # fmt: skip
    expected = {doc["url"]: list(images.values()) for docs in shards.values() for doc, images in docs}
    assert {url: images for _, url, images in rows} == expected  # every image, the downloaded file's bytes


def nested_release(tmp_path: Path) -> tuple[Path, Path, list[tuple[dict, dict]]]:
    """shard_0.zip: an inner zip and a gzip first, then the jsonl member; its images where mmc4's script puts them."""
    docs = [mmc4_ff_document(0, i) for i in range(40)]
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("docs_no_face_shard_9_v3.jsonl", jsonl([mmc4_ff_document(9, 0)]))
    path = tmp_path / "shard_0.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a/shard_9.zip", inner.getvalue())
        archive.writestr("b/docs_no_face_shard_8_v3.jsonl.gz", b"\x1f\x8b\x08\x00 not read")
        archive.writestr("docs_no_face_shard_0_v3.jsonl", jsonl(docs))
    write_member_images(tmp_path / "images", "docs_no_face_shard_0_v3.jsonl", docs)
    return path, tmp_path / "images", docs


@pytest.mark.parametrize("cut", [False, True])
def test_archive_inside_a_zip_is_named_not_read_as_lines(tmp_path, cut):
    path, images_dir, docs = nested_release(tmp_path)
    if cut:  # then the members are streamed from their local headers
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.8)])

    report = convert_raw_mmc4([str(path)], images_dir, tmp_path / "mds", output_format="mds", progress=False)

    assert report.skipped["nested_archive"] == 2
    assert [example.split(": ")[0] for example in report.examples["nested_archive"]] == [
        f"{path}:a/shard_9.zip", f"{path}:b/docs_no_face_shard_8_v3.jsonl.gz"
    ]
    assert "malformed_json" not in report.skipped and "bad_utf8" not in report.skipped
    kept = [url for _, url, _ in converted(tmp_path / "mds")]
    assert kept == [doc["url"] for doc, _ in docs][: len(kept)] and kept
    assert dict(report.skipped) == ({"nested_archive": 2, "corrupt_input": 1} if cut else {"nested_archive": 2})
    assert len(kept) < len(docs) if cut else len(kept) == len(docs)


def test_cut_zip_of_many_members_keeps_the_keys_the_whole_zip_gives(tmp_path):
    docs = {shard: [mmc4_ff_document(shard, i) for i in range(20)] for shard in range(3)}
    path, images_dir = tmp_path / "shard_0.zip", tmp_path / "images"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for shard, shard_docs in docs.items():
            archive.writestr(f"docs_no_face_shard_{shard}_v3.jsonl", jsonl(shard_docs))
            write_member_images(images_dir, f"docs_no_face_shard_{shard}_v3.jsonl", shard_docs)
    convert_raw_mmc4([str(path)], images_dir, tmp_path / "whole", output_format="mds", progress=False)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.8)])

    report = convert_raw_mmc4([str(path)], images_dir, tmp_path / "cut", output_format="mds", progress=False)

    whole, cut = converted(tmp_path / "whole"), converted(tmp_path / "cut")
    assert 40 < len(cut) < 60 and cut == whole[: len(cut)]  # the same keys, documents and images, up to the cut
    assert dict(report.skipped) == {"corrupt_input": 1} and not report.images_dropped


def test_member_with_a_bad_crc_is_named_and_the_next_member_read(tmp_path):
    docs = {shard: [mmc4_ff_document(shard, i) for i in range(3)] for shard in range(2)}
    path, images_dir = tmp_path / "shard_0.zip", tmp_path / "images"
    with zipfile.ZipFile(path, "w") as archive:  # stored: the text is in the file as it is
        for shard, shard_docs in docs.items():
            archive.writestr(f"docs_no_face_shard_{shard}_v3.jsonl", jsonl(shard_docs))
            write_member_images(images_dir, f"docs_no_face_shard_{shard}_v3.jsonl", shard_docs)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"shard 0 document 1 first", b"shard 0 document 1 FIRST", 1))

    report = convert_raw_mmc4([str(path)], images_dir, tmp_path / "mds", output_format="mds", progress=False)

    assert dict(report.skipped) == {"corrupt_member": 1}
    assert f"{path}:docs_no_face_shard_0_v3.jsonl: BadZipFile" in report.examples["corrupt_member"][0]
    # zipfile checks the CRC on reaching the member's end, here in its first read: of member 0 nothing is given
    assert [url for _, url, _ in converted(tmp_path / "mds")] == [doc["url"] for doc, _ in docs[1]]


# ------------------------------------------------------------------------------ a cut zip in bounded memory

LINE_BYTES = 1024
MEMBER_LINES = 12_000  # two members of ~12 MB each: the archive is ~23 MB stored, ~13 MB deflated
MEMORY_BOUND = 8 * CHUNK_BYTES  # see test_cut_zip_is_salvaged_in_bounded_memory


def line(number: int) -> bytes:
    """Line `number`, rebuilt the same each time (so the test need not keep what it wrote): ~1 KB of random hex,
    which deflate halves at best."""
    pad = random.Random(number).randbytes((LINE_BYTES - 32) // 2).hex()
    return b'{"n": %d, "pad": "%s"}\n' % (number, pad.encode())


class Unseekable(io.RawIOBase):
    """A write-only stream: zipfile then writes each size after its data (bit 3, data descriptors)."""

    def __init__(self, handle):
        self.handle = handle

    def writable(self):
        return True

    def write(self, data):
        return self.handle.write(data)


def write_big_zip(path: Path, packing: str) -> None:
    compression = zipfile.ZIP_STORED if packing == "stored" else zipfile.ZIP_DEFLATED
    with open(path, "wb") as handle:
        target = Unseekable(handle) if packing == "deflated_streamed" else handle
        with zipfile.ZipFile(target, "w", compression, compresslevel=1) as archive:
            for member in range(2):
                name = f"docs_no_face_shard_{member}_v3.jsonl"
                with archive.open(name, "w", force_zip64=packing == "deflated_zip64") as out:
                    for number in range(member * MEMBER_LINES, (member + 1) * MEMBER_LINES):
                        out.write(line(number))


@pytest.mark.parametrize("packing", ["stored", "deflated", "deflated_streamed", "deflated_zip64"])
def test_cut_zip_is_salvaged_in_bounded_memory(tmp_path, packing):
    """The bound, 8 chunks (2 MiB): the salvage holds one chunk read from the file, one inflated piece (at most a
    chunk), the unfinished line joined to the next piece and that piece split into lines (about a chunk each, plus
    ~250 bytes objects of ~1 KB lines): about 4-5 chunks whatever the archive's size. The cut archive is 5-9 times
    the bound; a salvage that read the file whole would peak above the archive's own size."""
    path = tmp_path / "docs.zip"
    write_big_zip(path, packing)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(int(size * 0.8))  # inside the second member
    assert path.stat().st_size > 5 * MEMORY_BOUND

    report = ConversionReport()
    tracemalloc.start()
    expected, members = 0, set()
    try:
        with pytest.raises(zipfile.BadZipFile, match="read 2 member"):
            for where, label, number, text in iter_jsonl_records(str(path), report):
                assert text == line(expected), (where, number)  # every line, in order, nothing cut short
                expected += 1
                members.add(label)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    print(f"{packing}: salvaged {expected} lines of a {path.stat().st_size / 2**20:.1f} MiB cut zip, "
          f"traced peak {peak / 2**20:.2f} MiB")  # fmt: skip
    assert MEMBER_LINES < expected < 2 * MEMBER_LINES  # the first member whole, the second up to the cut
    assert members == {"docs_no_face_shard_0_v3", "docs_no_face_shard_1_v3"}
    assert peak < MEMORY_BOUND
    assert not report.skipped
