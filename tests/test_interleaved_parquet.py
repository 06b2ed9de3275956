"""Natural-order interleaved parquet -> document shards (shards/interleaved_parquet.py) and the URL export for
img2dataset (shards/image_urls.py): each corpus' columns and metadata alignment, the three image sources, wrong
columns, the two commands (their --help: tests/test_commands.py) and the benchmark. Parquet, images and img2dataset
output are written here by hand."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shard_layouts import Img2datasetRow, read_mds, write_img2dataset

from flamingo_composer.cli.convert_interleaved import main as convert_main
from flamingo_composer.cli.export_image_urls import main as export_urls_main
from flamingo_composer.data.documents import unpack_document
from flamingo_composer.shards.image_urls import export_image_urls
from flamingo_composer.shards.interleaved_parquet import convert_interleaved_parquet


def jpeg(rgb: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 24), rgb).save(out, format="JPEG")
    return out.getvalue()


RED, GREEN, BLUE = jpeg((220, 30, 30)), jpeg((30, 160, 50)), jpeg((30, 70, 220))


def url(name: str) -> str:
    return f"https://example.com/{name}.jpg"


def url_folder(folder: Path, images: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (folder / hashlib.sha256(url(name).encode()).hexdigest()).write_bytes(data)
    return folder


def converted_documents(out: Path) -> dict[str, tuple[list, list, list]]:
    """key -> (texts, image entries, image bytes per position) of an MDS output."""
    return {row["key"]: unpack_document(row, row["key"]) for row in read_mds(out)}


def test_mint_html_metadata_in_image_order_lines_up_with_the_images(tmp_path):
    rows = [
        {"texts": ["red .", None, "green .", None], "images": [None, url("red"), None, url("green")],
         "image_hashes": ["h-red", "h-green"], "images_metadata": [json.dumps({"w": 1}), json.dumps({"w": 2})],
         "url": "https://example.com/a.html"},
        {"texts": [None, "text .", None, "more ."], "images": [url("red"), None, url("green"), None],
         "image_hashes": ["h-red", "h-green"], "images_metadata": [json.dumps({"w": 3}), json.dumps({"w": 4})],
         "url": "https://example.com/b.html"},
        {"texts": ["red .", None], "images": [None, url("red")],  # three entries for one image
         "image_hashes": ["a", "b", "c"], "images_metadata": ["{}", "{}", "{}"], "url": "https://example.com/c.html"},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mint.parquet")
    report = convert_interleaved_parquet(
        [str(tmp_path / "mint.parquet")], tmp_path / "mds", preset="mint-html",
        image_dir=url_folder(tmp_path / "images", {"red": RED, "green": GREEN}), progress=False,
    )  # fmt: skip
    assert report.written == 2 and report.skipped == {"misaligned_metadata": 1}
    docs = converted_documents(tmp_path / "mds")
    texts, entries, images = docs["mint-0000000"]
    assert texts == ["red .", None, "green .", None] and images == [None, RED, None, GREEN]
    assert [e and e["metadata"] for e in entries] == [
        None, {"image_hashes": "h-red", "images_metadata": {"w": 1}}, None,
        {"image_hashes": "h-green", "images_metadata": {"w": 2}},
    ]  # fmt: skip
    _, entries, images = docs["mint-0000001"]
    assert images[0] == RED and entries[2]["metadata"]["images_metadata"] == {"w": 4}
    assert read_mds(tmp_path / "mds")[0]["document"]["metadata"] == {"url": "https://example.com/a.html"}


def test_omnicorpus_struct_metadata_aligned_by_position(tmp_path):
    meta = pa.struct([("width", pa.int64()), ("img_url_sha", pa.string())])
    general = pa.struct([("url", pa.string()), ("fluency_prob", pa.float64())])
    schema = pa.schema([
        ("general_metadata", general), ("images", pa.list_(pa.string())), ("texts", pa.list_(pa.string())),
        ("metadata", pa.list_(meta)),
    ])  # fmt: skip
    rows = [{
        "general_metadata": {"url": "https://example.com/page", "fluency_prob": 0.9},
        "images": [None, url("blue"), None, url("gone")], "texts": ["blue .", None, "text .", None],
        "metadata": [None, {"width": 24, "img_url_sha": "s1"}, None, {"width": 8, "img_url_sha": "s2"}],
    }]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema), tmp_path / "omni.parquet")
    report = convert_interleaved_parquet(
        [str(tmp_path / "omni.parquet")], tmp_path / "mds", preset="omnicorpus",
        image_dir=url_folder(tmp_path / "images", {"blue": BLUE}), progress=False,
    )  # fmt: skip
    assert report.written == 1 and report.images_dropped == {"not_downloaded": 1}
    texts, entries, images = converted_documents(tmp_path / "mds")["omni-0000000"]
    assert texts == ["blue .", None, "text ."] and images == [None, BLUE, None]  # the missing image left out
    assert entries[1]["metadata"] == {"metadata": {"width": 24, "img_url_sha": "s1"}}
    assert read_mds(tmp_path / "mds")[0]["document"]["metadata"]["general_metadata"]["fluency_prob"] == 0.9


def test_image_sources_in_order_inline_then_img2dataset_then_folder(tmp_path):
    """Inline HF Image structs (fields in either order) first, then img2dataset joined by URL (successes only),
    then the sha256(url) folder; nothing else is fetched."""
    image = pa.struct([("path", pa.string()), ("bytes", pa.binary())])  # path first: read by name
    schema = pa.schema([("texts", pa.list_(pa.string())), ("images", pa.list_(image)), ("metadata", pa.string())])
    rows = [{
        "texts": ["a .", None, "b .", None, "c .", None, "d .", None],
        "images": [None, {"path": url("inline"), "bytes": RED}, None, {"path": url("downloaded"), "bytes": None},
                   None, {"path": url("in-folder"), "bytes": None}, None, {"path": url("failed"), "bytes": None}],
        "metadata": json.dumps([None] * 8),
    }]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema), tmp_path / "hf.parquet")
    img2dataset = write_img2dataset(tmp_path / "img2dataset", [[
        Img2datasetRow("000000000", url("downloaded"), None, GREEN),
        Img2datasetRow("000000001", url("failed"), None, None, "failed_to_download", "404"),
        Img2datasetRow("000000002", url("inline"), None, BLUE),  # an inline image wins over a download
    ]], "webdataset")  # fmt: skip
    folder = url_folder(tmp_path / "images", {"in-folder": BLUE, "downloaded": RED})  # img2dataset comes first
    report = convert_interleaved_parquet(
        [str(tmp_path / "hf.parquet")], tmp_path / "mds", preset="obelics", img2dataset_dir=img2dataset,
        image_dir=folder, progress=False,
    )  # fmt: skip
    _, _, images = converted_documents(tmp_path / "mds")["hf-0000000"]
    assert [data for data in images if data] == [RED, GREEN, BLUE]
    assert report.images_written == {"inline": 1, "img2dataset": 1, "image_folder": 1}
    assert report.images_dropped == {"not_downloaded": 1}
    assert report.index.written == 2 and report.index.skipped == {"failed_to_download": 1}
    summary = report.summary(tmp_path / "mds")
    assert "images: 3 written (image_folder 1, img2dataset 1, inline 1), 1 left out" in summary
    assert "not downloaded: failed_to_download 1" in summary


def test_wrong_columns_stop_the_converter_naming_both_lists(tmp_path, capsys):
    pq.write_table(pa.Table.from_pylist([{"text": "a", "image_urls": ["x"]}]), tmp_path / "other.parquet")
    with pytest.raises(ValueError) as err:
        convert_interleaved_parquet([str(tmp_path / "other.parquet")], tmp_path / "mds", preset="obelics")
    message = str(err.value)
    assert "other.parquet" in message and "['text', 'image_urls']" in message
    assert "['texts', 'images', 'metadata']" in message and not (tmp_path / "mds").exists()
    argv = ["--preset", "mint-html", "--input", str(tmp_path / "other.parquet"), "--out", str(tmp_path / "o")]
    assert convert_main(argv) == 2
    assert "wanted ['texts', 'images', 'image_hashes', 'images_metadata']" in capsys.readouterr().err


def test_export_urls_deduplicated_in_document_order_with_the_img2dataset_command(tmp_path, capsys):
    for part, images in enumerate([[None, url("a"), url("b")], [url("b"), None, url("c")]]):
        texts = ["t" if image is None else None for image in images]
        row = {"texts": texts, "images": images, "metadata": json.dumps([None] * 3)}
        pq.write_table(pa.Table.from_pylist([row, row]), tmp_path / f"part-{part}.parquet")
    written, _ = export_image_urls([str(tmp_path)], tmp_path / "urls.parquet", preset="obelics")
    assert written == 3 and pq.read_table(tmp_path / "urls.parquet").column("url").to_pylist() == [
        url("a"), url("b"), url("c")
    ]  # fmt: skip
    argv = ["--preset", "obelics", "--input", str(tmp_path / "part-0.parquet"), "--out", str(tmp_path / "u.parquet"),
            "--images-out", "dl"]  # fmt: skip
    assert export_urls_main(argv) == 0
    out = capsys.readouterr().out
    assert f"img2dataset --url_list {tmp_path / 'u.parquet'} --input_format parquet --url_col url" in out
    assert "--output_format webdataset --output_folder dl" in out and "--images-from-img2dataset dl" in out


def test_convert_command_writes_and_prints_the_summary(tmp_path, capsys):
    row = {"texts": ["a .", None], "images": [None, url("red")], "metadata": json.dumps([None, None])}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "docs.parquet")
    folder = url_folder(tmp_path / "images", {"red": RED})
    argv = ["--preset", "obelics", "--input", str(tmp_path / "docs.parquet"), "--no-progress"]
    assert convert_main([*argv, "--image-dir", str(folder), "--out", str(tmp_path / "mds")]) == 0
    out = capsys.readouterr().out
    assert "documents: 1 written, 0 skipped" in out and "documents/s" in out
    assert convert_main([*argv, "--image-dir", str(tmp_path), "--out", str(tmp_path / "none")]) == 1  # nothing found
    assert "not_downloaded: 1" in capsys.readouterr().out


def test_bench_documents_reports_converter_and_loader_rates(capsys):
    from benchmarks import bench_documents

    argv = ["--num-documents", "6", "--num-workers", "0", "--batches", "1", "--warmup", "0", "--batch-size", "2",
            "--max-tokens", "256", "--image-size", "32", "--source-image-size", "48"]  # fmt: skip
    assert bench_documents.main(argv) == 0
    (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert line["layout"] == "natural" and line["converter"]["documents"] == 6 and line["skipped"] == {}
    assert line["converter"]["documents_per_s"] > 0 and line["documents_per_s_per_worker"] > 0
    assert line["feed"]["documents_per_step"] == 32 and line["feed"]["ratio"] > 0
