"""Pair sources besides img2dataset (flamingo_composer/shards/parquet_pairs.py, image_folder.py and their commands):
caption parquet with raw bytes or `datasets` Image structs, a folder of images with a captions CSV / JSONL. Each
gives LAION MDS rows with the original bytes; bad rows are counted and named, wrong columns stop the command."""

from __future__ import annotations

import gc
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_layouts import jpeg_bytes, read_mds

from flamingo_composer.cli.convert_image_folder import main as image_folder_main
from flamingo_composer.cli.convert_parquet_pairs import main as parquet_pairs_main
from flamingo_composer.shards.convert import ConversionReport
from flamingo_composer.shards.image_folder import convert_image_folder_to_mds
from flamingo_composer.shards.parquet_pairs import convert_parquet_pairs_to_mds, iter_parquet_pairs

RED, GREEN, BLUE = jpeg_bytes((200, 30, 30)), jpeg_bytes((30, 200, 30)), jpeg_bytes((30, 30, 200))
IMAGES = [RED, GREEN, BLUE]
CAPTIONS = ["a red square", "a green square", "a blue square"]

# `datasets.Image`'s storage: a struct of the encoded bytes and the source path, in either field order
IMAGE_STRUCTS = {
    "bytes_first": pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    "path_first": pa.struct([("path", pa.string()), ("bytes", pa.binary())]),
}


def image_values(kind: str, images: list[bytes | None], paths: list[str | None] | None = None) -> pa.Array:
    if kind == "raw":
        return pa.array(images, pa.binary())
    paths = paths or [f"{i}.jpg" for i in range(len(images))]
    return pa.array([{"bytes": b, "path": p} for b, p in zip(images, paths)], IMAGE_STRUCTS[kind])


def expected_rows(stem: str) -> list[dict]:
    pairs = enumerate(zip(IMAGES, CAPTIONS))
    return [{"key": f"{stem}-{i:07d}", "jpg": image, "txt": text} for i, (image, text) in pairs]


# --------------------------------------------------------------------------------------------- caption parquet


@pytest.mark.parametrize("kind", ["raw", "bytes_first", "path_first"])
def test_parquet_images_as_bytes_or_image_structs_give_the_same_rows(tmp_path, kind):
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": image_values(kind, IMAGES), "caption": CAPTIONS}), path, row_group_size=2)

    report = convert_parquet_pairs_to_mds([str(path)], tmp_path / "mds", progress=False)

    assert read_mds(tmp_path / "mds") == expected_rows("train-00000-of-00001")
    assert report.written == 3 and not report.skipped


def test_parquet_caption_lists_give_one_pair_per_caption(tmp_path):
    path = tmp_path / "coco.parquet"
    captions = [["a red square", "red, square"], ["a green square"], ["", "a blue square"]]
    pq.write_table(pa.table({"image": image_values("bytes_first", IMAGES), "sentences": captions}), path)

    convert_parquet_pairs_to_mds([str(path)], tmp_path / "mds", caption_column="sentences", progress=False)

    rows = read_mds(tmp_path / "mds")
    assert [(row["key"], row["txt"]) for row in rows] == [
        ("coco-0000000-0", "a red square"), ("coco-0000000-1", "red, square"),
        ("coco-0000001-0", "a green square"), ("coco-0000002-1", "a blue square"),
    ]  # fmt: skip
    assert [row["jpg"] for row in rows] == [RED, RED, GREEN, BLUE]


def test_parquet_rows_without_bytes_or_caption_are_counted_and_named(tmp_path):
    path = tmp_path / "part.parquet"
    paths = ["a.jpg", "/data/b.jpg", None, "d.jpg", "e.jpg"]
    images = image_values("path_first", [RED, None, None, GREEN, BLUE], paths)
    pq.write_table(pa.table({"image": images, "caption": ["red", "b", "c", None, " "]}), path)

    report = convert_parquet_pairs_to_mds([str(path)], tmp_path / "mds", progress=False)

    assert [row["key"] for row in read_mds(tmp_path / "mds")] == ["part-0000000"]
    assert dict(report.skipped) == {"image_not_embedded": 1, "missing_image": 1, "missing_caption": 2}
    (not_embedded,) = report.examples["image_not_embedded"]
    assert f"{path} row 1" in not_embedded and "/data/b.jpg" in not_embedded
    assert f"{path} row 2" in report.examples["missing_image"][0]
    assert [example.split(": ")[0] for example in report.examples["missing_caption"]] == [
        f"{path} row 3", f"{path} row 4"
    ]


def test_parquet_wrong_columns_stop_the_command_naming_the_columns_it_has(tmp_path, capsys):
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"jpg": image_values("raw", IMAGES), "text": CAPTIONS, "width": [16, 16, 16]}), path)
    out = tmp_path / "mds"

    assert parquet_pairs_main(["--input", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no column 'image'" in err and "jpg (binary), text (string), width (int64)" in err
    assert not out.exists()  # checked before the output is created
    assert parquet_pairs_main(["--input", str(path), "--image-col", "width", "--caption-col", "text",
                               "--out", str(out), "--no-progress"]) == 2  # fmt: skip
    assert "column 'width' is int64" in capsys.readouterr().err
    argv = ["--input", str(path), "--image-col", "jpg", "--caption-col", "text", "--out", str(out), "--no-progress"]
    assert parquet_pairs_main(argv) == 0
    assert "wrote 3 samples" in capsys.readouterr().out


_POOLS = []  # proxy pools outlive any buffer they handed out


def test_parquet_is_read_in_bounded_memory(tmp_path):
    """A 48 MB file of 4 MB row groups is read with Arrow holding at most 4 row groups' worth (16 MB) at once, and
    the Python heap about one batch of images: a reader that loaded the whole file would need over 48 MB."""
    path = tmp_path / "big.parquet"
    group_rows, image_bytes, groups = 8, 500_000, 12
    images = [os.urandom(image_bytes) for _ in range(group_rows * groups)]
    table = pa.table({"image": image_values("bytes_first", images), "caption": [f"c{i}" for i in range(len(images))]})
    pq.write_table(table, path, row_group_size=group_rows, compression="none")
    del table, images
    gc.collect()
    assert path.stat().st_size > 45_000_000
    bound = 4 * group_rows * image_bytes

    import tracemalloc

    default = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(default)
    _POOLS.append(pool)
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_parquet_pairs([str(path)], "image", "caption", ConversionReport()))
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(default)
    assert count == group_rows * groups
    print(f"arrow peak {pool.max_memory() / 1e6:.1f} MB, python peak {python_peak / 1e6:.1f} MB")
    assert pool.max_memory() < bound
    assert python_peak < bound


# ------------------------------------------------------------------------------------------------ image folder


def write_folder(tmp_path):
    """photos/ with three images (one in a subfolder), one file listed but absent, one cut in half."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "red.jpg").write_bytes(RED)
    (folder / "sub" / "green.jpg").write_bytes(GREEN)
    (folder / "blue.jpg").write_bytes(BLUE)
    (folder / "cut.jpg").write_bytes(BLUE[: len(BLUE) // 3])
    rows = [
        {"file_name": "red.jpg", "caption": "a red square"},
        {"file_name": "absent.jpg", "caption": "nothing here"},
        {"file_name": "sub/green.jpg", "caption": "a green square"},
        {"file_name": "cut.jpg", "caption": "half a square"},
        {"file_name": "blue.jpg", "caption": "a blue square"},
    ]
    return folder, rows


def write_table(path, rows):
    if path.suffix == ".csv":
        lines = ["file_name,caption"] + [f'{row["file_name"]},"{row["caption"]}"' for row in rows]
    else:
        lines = [json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("table", ["metadata.csv", "metadata.jsonl"])
def test_image_folder_converts_and_names_missing_and_broken_files(tmp_path, table):
    folder, rows = write_folder(tmp_path)
    captions = write_table(folder / table, rows)

    report = convert_image_folder_to_mds(folder, captions, tmp_path / "mds", progress=False)

    rows = read_mds(tmp_path / "mds")
    assert [(row["jpg"], row["txt"]) for row in rows] == list(zip(IMAGES, CAPTIONS))  # original bytes, table order
    assert len({row["key"] for row in rows}) == 3
    assert dict(report.skipped) == {"missing_image": 1, "corrupt_image": 1}
    line = 3 if table.endswith(".csv") else 2  # the CSV's header is line 1
    assert f"metadata line {line}" not in report.examples["missing_image"][0]  # the file is named in full
    assert f"{captions} line {line}" in report.examples["missing_image"][0]
    assert "absent.jpg" in report.examples["missing_image"][0]
    assert "cut.jpg" in report.examples["corrupt_image"][0]


def test_image_folder_jsonl_bad_lines_and_caption_lists(tmp_path):
    folder, _ = write_folder(tmp_path)
    captions = folder / "captions.jsonl"
    captions.write_text(
        '{"image": "red.jpg", "text": ["a red square", "red"]}\n'
        "not json\n"
        '["a list"]\n'
        '{"image": "blue.jpg"}\n'
        '{"text": "no file"}\n'
        "\n"
        '{"image": "sub/green.jpg", "text": "a green square"}\n'
    )
    report = convert_image_folder_to_mds(
        folder, captions, tmp_path / "mds", file_column="image", caption_column="text", progress=False
    )
    rows = read_mds(tmp_path / "mds")
    assert [(row["key"], row["txt"]) for row in rows] == [
        ("captions-0000001-0", "a red square"), ("captions-0000001-1", "red"), ("captions-0000007", "a green square"),
    ]  # fmt: skip
    assert dict(report.skipped) == {"malformed_json": 2, "missing_caption": 1, "missing_file_name": 1}


def test_image_folder_wrong_columns_stop_the_command_naming_the_columns_it_has(tmp_path, capsys):
    folder, rows = write_folder(tmp_path)
    captions = write_table(folder / "metadata.csv", rows)
    out = tmp_path / "mds"
    argv = ["--images", str(folder), "--captions", str(captions), "--out", str(out), "--no-progress"]

    assert image_folder_main([*argv, "--caption-col", "text"]) == 2
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "['file_name', 'caption']" in err
    assert not out.exists()
    assert image_folder_main(argv) == 0
    assert "wrote 3 samples" in capsys.readouterr().out
