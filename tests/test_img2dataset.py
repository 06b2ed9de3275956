"""img2dataset output in its three forms (flamingo_composer/shards/img2dataset.py, tools/convert_img2dataset_to_mds.py):
the same pairs from each, failures counted by img2dataset's status, damaged files named and the rest kept."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_layouts import META_SCHEMA, Img2datasetRow, jpeg_bytes, read_mds, write_img2dataset

from flamingo_composer.cli.convert_img2dataset import main as img2dataset_main
from flamingo_composer.shards.convert import ConversionReport
from flamingo_composer.shards.img2dataset import convert_img2dataset_to_mds, iter_img2dataset_pairs

FORMS = ("webdataset", "files", "parquet")
RED, BLUE = jpeg_bytes((200, 30, 30)), jpeg_bytes((30, 30, 200))


def one_success_one_failure() -> list[list[Img2datasetRow]]:
    return [
        [
            Img2datasetRow("000000000", "http://a.example/red.jpg", "a red square", RED),
            Img2datasetRow(
                "000000001", "http://a.example/gone.jpg", "a lost square", None,
                status="failed_to_download", error_message="HTTP Error 404: Not Found",
            ),
        ]
    ]  # fmt: skip


@pytest.mark.parametrize("form", FORMS)
def test_every_form_gives_the_same_rows_and_counts_failures_by_status(tmp_path, form):
    folder = write_img2dataset(tmp_path / form, one_success_one_failure(), form)

    report = convert_img2dataset_to_mds(folder, tmp_path / "mds", progress=False)

    assert read_mds(tmp_path / "mds") == [{"key": "000000000", "jpg": RED, "txt": "a red square"}]
    assert dict(report.skipped) == {"failed_to_download": 1}
    (example,) = report.examples["failed_to_download"]
    assert "000000001" in example and "gone.jpg" in example and "HTTP Error 404" in example


def test_parquet_and_tar_forms_convert_to_identical_rows(tmp_path):
    """Two shards, each with a success and a failure (one a resize failure), in both forms."""
    shards = one_success_one_failure() + [
        [
            Img2datasetRow(
                "000010000", "http://b.example/huge.png", "too big", None,
                status="failed_to_resize", error_message="image too large",
            ),
            Img2datasetRow("000010001", "http://b.example/blue.jpg", "a blue square", BLUE),
        ]
    ]  # fmt: skip
    rows, reports = {}, {}
    for form in ("webdataset", "parquet"):
        folder = write_img2dataset(tmp_path / form, shards, form)
        reports[form] = convert_img2dataset_to_mds(folder, tmp_path / f"{form}-mds", progress=False)
        rows[form] = read_mds(tmp_path / f"{form}-mds")
    assert rows["parquet"] == rows["webdataset"]
    assert [row["key"] for row in rows["parquet"]] == ["000000000", "000010001"]
    assert rows["parquet"][1]["jpg"] == BLUE
    assert reports["parquet"].skipped == reports["webdataset"].skipped
    assert dict(reports["parquet"].skipped) == {"failed_to_download": 1, "failed_to_resize": 1}


@pytest.mark.parametrize("form", FORMS)
def test_reader_gives_url_and_bytes_of_successes_only(tmp_path, form):
    """What a URL join needs (url -> image bytes), also from a run without captions."""
    rows = one_success_one_failure()
    for row in rows[0]:
        row.caption = None
    folder = write_img2dataset(tmp_path / form, rows, form)
    if form == "parquet":  # img2dataset without --caption_col has no caption column at all
        table = pq.read_table(folder / "00000.parquet").drop_columns(["caption"])
        pq.write_table(table, folder / "00000.parquet")
    report = ConversionReport()

    pairs = list(iter_img2dataset_pairs(folder, report))

    assert [(pair.key, pair.url, pair.image) for pair in pairs] == [("000000000", "http://a.example/red.jpg", RED)]
    assert pairs[0].caption == ("" if form != "parquet" else None)
    assert dict(report.skipped) == {"failed_to_download": 1}


def test_damaged_status_parquet_is_named_and_the_tar_still_converts(tmp_path):
    folder = write_img2dataset(tmp_path / "wds", one_success_one_failure(), "webdataset")
    status = folder / "00000.parquet"
    status.write_bytes(status.read_bytes()[:40])

    report = convert_img2dataset_to_mds(folder, tmp_path / "mds", progress=False)

    assert [row["key"] for row in read_mds(tmp_path / "mds")] == ["000000000"]
    assert dict(report.skipped) == {"unreadable_parquet": 1}
    assert "00000.parquet" in report.examples["unreadable_parquet"][0]


def test_damaged_row_group_is_named_and_the_other_row_groups_kept(tmp_path):
    rows = [Img2datasetRow(f"{i:09d}", f"http://c.example/{i}.jpg", f"square {i}", RED) for i in range(6)]
    folder = tmp_path / "parquet"
    folder.mkdir()
    schema = META_SCHEMA.append(pa.field("jpg", pa.binary()))
    table = pa.Table.from_pylist([{**row.meta(), "jpg": row.image} for row in rows], schema)
    path = folder / "00000.parquet"
    pq.write_table(table, path, row_group_size=2, compression="snappy")
    column = pq.ParquetFile(path).metadata.row_group(1).column(schema.get_field_index("jpg"))
    data = bytearray(path.read_bytes())
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    data[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))

    report = convert_img2dataset_to_mds(folder, tmp_path / "mds", progress=False)

    assert [row["key"] for row in read_mds(tmp_path / "mds")] == [f"{i:09d}" for i in (0, 1, 4, 5)]
    assert dict(report.skipped) == {"corrupt_parquet": 1}
    assert "00000.parquet row group 1 (rows 2-3)" in report.examples["corrupt_parquet"][0]


def test_cli_converts_parquet_output_and_names_the_columns_of_a_foreign_parquet(tmp_path, capsys):
    folder = write_img2dataset(tmp_path / "parquet", one_success_one_failure(), "parquet")
    assert img2dataset_main(["--input", str(folder), "--out", str(tmp_path / "ok"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 samples" in out and "failed_to_download: 1" in out

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"jpg": [RED], "text": ["a red square"]}), foreign / "part-0.parquet")
    assert img2dataset_main(["--input", str(foreign), "--out", str(tmp_path / "no"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "['jpg', 'text']" in err and "'key'" in err
