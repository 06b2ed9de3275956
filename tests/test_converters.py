"""Shard converters (flamingo_composer/shards/convert.py, tools/convert_*.py) and the data benchmark script.

Round trips compare against the source shards read with `tarfile` directly (not through the converter's reader)
and against the MDS shards the synthetic generator writes itself.
"""

from __future__ import annotations

import base64
import copy
import gzip
import io
import json
import os
import shutil
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from shard_layouts import read_mds

from benchmarks import bench_data
from flamingo_composer.cli import convert_wds
from flamingo_composer.data.items import DROPPED_IMAGES
from flamingo_composer.data.mds import BYTES_RANGE_FIELD, mmc4_doc_from_mds
from flamingo_composer.shards.convert import convert_raw_mmc4, convert_wds_to_mds
from flamingo_composer.shards.img2dataset import convert_img2dataset_to_mds
from flamingo_composer.shards.synthetic import SyntheticConfig, make_mmc4_document, write_synthetic_dataset

CLEAN_DATA = SyntheticConfig(
    num_laion=30, num_laion_val=2, num_mmc4=12, num_mmc4_val=2, image_size=32,
    laion_shard_size=12, mmc4_shard_size=5, mds_size_limit=1 << 14,
)  # fmt: skip


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("converters") / "synthetic"
    write_synthetic_dataset(root, CLEAN_DATA)
    return root


def train_tars(root: Path, dataset: str) -> list[Path]:
    return sorted((root / "wds" / dataset).glob("train-*.tar"))


def read_tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in file order, read with tarfile only."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isreg():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.items())


def strip_images(doc: dict) -> dict:
    """The document without per-image payload fields (image_base64 / byte ranges)."""
    doc = copy.deepcopy(doc)
    for info in doc["image_info"]:
        info.pop("image_base64", None)
        info.pop(BYTES_RANGE_FIELD, None)
    return doc


# ------------------------------------------------------------------------------------------ webdataset -> MDS


def test_laion_wds_to_mds_keeps_keys_bytes_and_captions(synthetic, tmp_path):
    tars = train_tars(synthetic, "laion")
    report = convert_wds_to_mds([str(p) for p in tars], tmp_path / "out", layout="laion", progress=False)

    expected = [
        {"key": key, "jpg": files["jpg"], "txt": files["txt"].decode("utf-8")}
        for tar in tars
        for key, files in read_tar_samples(tar)
    ]
    assert len(expected) == CLEAN_DATA.num_laion
    assert read_mds(tmp_path / "out") == expected  # same order, identical image bytes, same captions
    assert read_mds(synthetic / "mds" / "laion" / "train") == expected  # = the generator's own MDS
    assert report.written == CLEAN_DATA.num_laion and not report.skipped
    assert report.outputs and all(os.path.isfile(p) for p in report.outputs)


def test_mmc4_wds_to_mds_keeps_documents_and_original_image_bytes(synthetic, tmp_path):
    pattern = str(
        synthetic / "wds" / "mmc4" / f"train-{{000000..{len(train_tars(synthetic, 'mmc4')) - 1:06d}}}.tar"
    )
    report = convert_wds_to_mds([pattern], tmp_path / "out", layout="mmc4", progress=False)

    sources = [
        (key, json.loads(files["json"]))
        for tar in train_tars(synthetic, "mmc4")
        for key, files in read_tar_samples(tar)
    ]
    rows = read_mds(tmp_path / "out")
    assert [row["key"] for row in rows] == [key for key, _ in sources]
    for row, (_, source_doc) in zip(rows, sources):
        doc, images = mmc4_doc_from_mds(row)
        assert strip_images(doc) == strip_images(source_doc)  # text_list, similarity_matrix, metadata
        assert images == [base64.b64decode(info["image_base64"]) for info in source_doc["image_info"]]
    assert rows == read_mds(synthetic / "mds" / "mmc4" / "train")  # = the generator's own MDS
    assert report.written == CLEAN_DATA.num_mmc4 and not report.skipped and not report.images_dropped


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_malformed_laion_members_are_counted_and_skipped(synthetic, tmp_path):
    (key, good), *_ = read_tar_samples(train_tars(synthetic, "laion")[0])
    tar = write_tar(
        tmp_path / "bad.tar",
        [
            (f"{key}.jpg", good["jpg"]), (f"{key}.txt", good["txt"]),
            ("nocaption.jpg", good["jpg"]),
            ("noimage.txt", b"a red circle"),
            ("emptyimage.jpg", b""), ("emptyimage.txt", b"a red circle"),
            ("latin1.png", good["jpg"]), ("latin1.txt", "caf\xe9".encode("latin-1")),
        ],
    )  # fmt: skip
    report = convert_wds_to_mds([str(tar)], tmp_path / "out", layout="laion", progress=False)
    assert dict(report.skipped) == {"missing_caption": 1, "missing_image": 2, "bad_utf8": 1}
    assert [row["key"] for row in read_mds(tmp_path / "out")] == [key]


def test_malformed_mmc4_members_are_counted_and_skipped(synthetic, tmp_path):
    (key, good), *_ = read_tar_samples(train_tars(synthetic, "mmc4")[0])
    doc = json.loads(good["json"])
    one_bad = copy.deepcopy(doc)
    one_bad["image_info"][0]["image_base64"] = "not*base64!"
    all_bad = copy.deepcopy(doc)
    for info in all_bad["image_info"]:
        del info["image_base64"]
    tar = write_tar(
        tmp_path / "bad.tar",
        [
            (f"{key}.json", good["json"]),
            ("onebad.json", json.dumps(one_bad).encode()),
            ("allbad.json", json.dumps(all_bad).encode()),
            ("truncatedjson.json", good["json"][:50]),
            ("notjson.txt", b"no document here"),
        ],
    )
    report = convert_wds_to_mds([str(tar)], tmp_path / "out", layout="mmc4", progress=False)
    assert dict(report.skipped) == {"malformed_json": 1, "missing_json": 1, "no_usable_image": 1}
    assert dict(report.images_dropped) == {"bad_base64": 1}
    rows = read_mds(tmp_path / "out")
    assert [row["key"] for row in rows] == [key, "onebad"]
    _, images = mmc4_doc_from_mds(rows[1])
    assert images[0] is None and all(images[1:])  # the bad image is kept as an empty range, the rest intact


def test_truncated_tar_is_reported_and_the_rest_converted(synthetic, tmp_path):
    first, second = train_tars(synthetic, "laion")[:2]
    truncated = tmp_path / "truncated.tar"
    data = first.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.55)])

    report = convert_wds_to_mds(
        [str(truncated), str(second)], tmp_path / "out", layout="laion", progress=False
    )

    assert report.skipped["corrupt_tar"] == 1
    rows = read_mds(tmp_path / "out")
    source_first, source_second = read_tar_samples(first), read_tar_samples(second)
    kept_from_first = len(rows) - len(source_second)
    assert 0 < kept_from_first < len(source_first)
    # The samples before the damage and the whole intact shard, byte for byte.
    expected = [(key, files["jpg"]) for key, files in source_first[:kept_from_first] + source_second]
    assert [(row["key"], row["jpg"]) for row in rows] == expected
    # A sample the truncation cut in half is reported, never written partially.
    assert report.written + sum(n for r, n in report.skipped.items() if r != "corrupt_tar") <= len(
        source_first
    ) + len(source_second)


def test_missing_input_and_non_empty_output_fail_with_the_path_named(synthetic, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope-000.tar"):
        convert_wds_to_mds([str(tmp_path / "nope-{000..001}.tar")], tmp_path / "out", layout="laion")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="full"):
        convert_wds_to_mds([str(train_tars(synthetic, "laion")[0])], tmp_path / "full", layout="laion")


# ---------------------------------------------------------------------------------------------- raw MMC4


def make_raw_mmc4(root: Path, container: str, image_layout: str | None = None) -> tuple[list[str], Path, dict]:
    """Raw MMC4 built from synthetic documents: images as files named by image_name, docs without base64.

    One image missing, one truncated (undecodable), one document with every image missing, two malformed lines
    (bad JSON; image_info entries that are not objects) and a blank line. `image_layout`: 'flat' (IMAGES/name),
    'numbered' (IMAGES/<N>/name, the reference's), 'download_script' (IMAGES/<shard name>_images/name, what mmc4's
    own download script writes); default numbered for a zip, flat otherwise.
    """
    docs = [make_mmc4_document(CLEAN_DATA, "train", i)["doc"] for i in range(8)]
    multi = [i for i, doc in enumerate(docs) if len(doc["image_info"]) >= 2]
    missing_doc, broken_doc, empty_doc = multi[0], multi[1], multi[2]

    shard = 7
    images = root / "images"
    image_layout = image_layout or ("numbered" if container == "zip" else "flat")
    stem = f"docs_shard_{shard}_v2.jsonl" if container == "zip" else "docs"
    image_dir = {"flat": images, "numbered": images / str(shard), "download_script": images / f"{stem}_images"}[
        image_layout
    ]
    image_dir.mkdir(parents=True)
    originals = {}
    for i, doc in enumerate(docs):
        for j, info in enumerate(doc["image_info"]):
            raw = base64.b64decode(info.pop("image_base64"))
            if (i, j) == (missing_doc, 0) or i == empty_doc:
                continue
            if (i, j) == (broken_doc, 1):
                raw = raw[: len(raw) // 2]
            (image_dir / info["image_name"]).write_bytes(raw)
            originals[info["image_name"]] = raw
    lines = [json.dumps(doc) for doc in docs]
    lines.insert(3, '{"text_list": ["broken')
    lines.insert(4, '{"text_list": [], "image_info": ["not an object"]}')
    lines.insert(6, "")
    text = "\n".join(lines) + "\n"
    if container == "zip":
        path = root / f"docs_shard_{shard}_v2.jsonl.zip"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"docs_shard_{shard}_v2.jsonl", text)
    elif container == "gz":
        path = root / "docs.jsonl.gz"
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path = root / "docs.jsonl"
        path.write_text(text)
    expected = {
        "docs": [doc for i, doc in enumerate(docs) if i != empty_doc],
        "originals": originals,
        "broken": docs[broken_doc]["image_info"][1]["image_name"],
        "images_dropped": {"missing_image": 1 + len(docs[empty_doc]["image_info"]), "corrupt_image": 1},
        "skipped": {"malformed_json": 2, "no_usable_image": 1},
    }
    return [str(path)], images, expected


@pytest.mark.parametrize("packing", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_truncated_zip_is_reported_and_its_complete_documents_kept(tmp_path, packing):
    """A cut download of docs_shard_N_v2.jsonl.zip (no central directory) is not read as plain jsonl."""
    inputs, images, expected = make_raw_mmc4(tmp_path / "raw", "zip")
    whole = Path(inputs[0])
    text = zipfile.ZipFile(whole).read(zipfile.ZipFile(whole).namelist()[0])
    with zipfile.ZipFile(whole, "w", compression=packing) as archive:
        archive.writestr("docs_shard_7_v2.jsonl", text)
    convert_raw_mmc4(inputs, images, tmp_path / "complete", output_format="mds", progress=False)
    data = whole.read_bytes()
    whole.write_bytes(data[: int(len(data) * 0.75)])  # cut inside the member: the last documents are lost

    report = convert_raw_mmc4(inputs, images, tmp_path / "out", output_format="mds", progress=False)

    assert report.skipped["corrupt_input"] == 1
    assert "docs_shard_7_v2.jsonl.zip" in report.examples["corrupt_input"][0]
    assert "bad_utf8" not in report.skipped
    kept = [key for key, _, _ in converted_docs(tmp_path / "out", "mds")]
    every = [key for key, _, _ in converted_docs(tmp_path / "complete", "mds")]
    assert 0 < len(kept) < len(every) and kept == every[: len(kept)]  # the documents before the cut, in order
    if packing == zipfile.ZIP_STORED:  # every line that ends before the cut arrived, exactly those
        name = "docs_shard_7_v2.jsonl"
        available = text[: int(len(data) * 0.75) - 30 - len(name)]  # after the 30-byte local header + name
        prefix = tmp_path / "prefix" / name
        prefix.parent.mkdir()
        prefix.write_bytes(available[: available.rfind(b"\n") + 1])
        convert_raw_mmc4([str(prefix)], images, tmp_path / "expected", output_format="mds", progress=False)
        assert kept == [key for key, _, _ in converted_docs(tmp_path / "expected", "mds")]



def test_raw_mmc4_images_in_a_folder_named_after_the_zip_member(tmp_path):
    """`shard_7.zip` holding `docs_no_face_shard_7_v3.jsonl`, its images where mmc4's download script puts them
    for that member: `docs_no_face_shard_7_v3_images/` (the archive's own name gives `shard_7_images/`)."""
    inputs, images, expected = make_raw_mmc4(tmp_path / "raw", "zip", "download_script")
    original = Path(inputs[0])
    text = zipfile.ZipFile(original).read("docs_shard_7_v2.jsonl")
    renamed = original.with_name("shard_7.zip")
    with zipfile.ZipFile(renamed, "w") as archive:
        archive.writestr("docs_no_face_shard_7_v3.jsonl", text)
    original.unlink()
    (images / "docs_shard_7_v2.jsonl_images").rename(images / "docs_no_face_shard_7_v3_images")

    report = convert_raw_mmc4([str(renamed)], images, tmp_path / "out", output_format="mds", progress=False)

    assert dict(report.images_dropped) == expected["images_dropped"]  # only the planted missing / broken ones
    assert report.written == len(expected["docs"])

def test_brace_range_converts_what_exists_and_lists_the_missing(synthetic, tmp_path, capsys):
    tool = convert_wds
    tars = train_tars(synthetic, "laion")
    folder = tmp_path / "release"
    folder.mkdir()
    for number in (0, 2):  # shard 1 and 3 are missing from this "release"
        shutil.copy(tars[number], folder / f"part-{number}.tar")
    pattern = str(folder / "part-{0..3}.tar")
    assert tool.main(["--layout", "laion", "--input", pattern, "--out", str(tmp_path / "ok"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    present = sum(len(read_tar_samples(tars[number])) for number in (0, 2))
    assert f"wrote {present} samples" in out and "inputs that do not exist (left out): 2" in out
    assert str(folder / "part-1.tar") in out and str(folder / "part-3.tar") in out
    # --require-all makes a gap an error; a range with nothing present is one anyway.
    args = ["--layout", "laion", "--no-progress", "--input"]
    assert tool.main([*args, pattern, "--require-all", "--out", str(tmp_path / "strict")]) == 2
    assert "part-1.tar" in capsys.readouterr().err
    assert tool.main([*args, str(folder / "none-{0..3}.tar"), "--out", str(tmp_path / "none")]) == 2
    assert "4 input(s) do not exist" in capsys.readouterr().err


def converted_docs(out: Path, output_format: str) -> list[tuple[str, dict, list[bytes | None]]]:
    """(key, document without image payload, per-image bytes or None) of converted shards."""
    result = []
    if output_format == "wds":
        for tar in sorted(out.glob("*.tar")):
            for key, files in read_tar_samples(tar):
                doc = json.loads(files["json"])
                images = [
                    base64.b64decode(i["image_base64"]) if "image_base64" in i else None
                    for i in doc["image_info"]
                ]
                result.append((key, strip_images(doc), images))
    else:
        for row in read_mds(out):
            doc, images = mmc4_doc_from_mds(row)
            result.append((row["key"], strip_images(doc), images))
    return result


@pytest.mark.parametrize(
    ("container", "image_layout"),
    [("jsonl", None), ("zip", None), ("gz", None), ("zip", "download_script"), ("jsonl", "download_script")],
)
@pytest.mark.parametrize("output_format", ["wds", "mds"])
def test_raw_mmc4_converts_and_reports_missing_and_broken_images(tmp_path, container, image_layout, output_format):
    inputs, images, expected = make_raw_mmc4(tmp_path / "raw", container, image_layout)
    report = convert_raw_mmc4(
        inputs, images, tmp_path / "out", output_format=output_format, docs_per_shard=3, progress=False
    )

    assert dict(report.skipped) == expected["skipped"]
    assert dict(report.images_dropped) == expected["images_dropped"]
    assert report.written == len(expected["docs"])
    converted = converted_docs(tmp_path / "out", output_format)
    assert len({key for key, _, _ in converted}) == len(converted)  # unique keys
    assert [doc for _, doc, _ in converted] == expected["docs"]  # text, matrix, metadata unchanged
    for _, doc, image_bytes in converted:
        for info, data in zip(doc["image_info"], image_bytes):
            name = info["image_name"]
            if name in expected["originals"] and name != expected["broken"]:
                assert data == expected["originals"][name]  # the downloaded file's bytes, not re-encoded
            else:
                assert data is None
    if output_format == "wds":
        assert len(report.outputs) == -(-len(expected["docs"]) // 3)  # docs_per_shard


def test_raw_mmc4_wds_and_mds_outputs_preprocess_identically(tmp_path):
    """Both output formats feed the training preprocessing the same documents and images."""
    import torchvision.transforms as T

    from flamingo_composer.data.mmc4 import MMC4PreprocessConfig, MMC4Processor
    from flamingo_composer.models.embeddings import add_flamingo_tokens
    from flamingo_composer.vocab import build_tiny_tokenizer

    inputs, images, _ = make_raw_mmc4(tmp_path / "raw", "jsonl")
    for fmt in ("wds", "mds"):
        convert_raw_mmc4(inputs, images, tmp_path / fmt, output_format=fmt, progress=False)
    tokenizer = build_tiny_tokenizer()
    add_flamingo_tokens(tokenizer)
    cfg = MMC4PreprocessConfig(max_tokens=64, max_num_images=3, min_image_bytes=0, single_image_drop_prob=0.0)
    process = MMC4Processor(tokenizer, T.Compose([T.Resize((8, 8)), T.ToTensor()]), cfg, seed=0)

    wds_rows = [
        (key, {"json": files["json"]})
        for tar in sorted((tmp_path / "wds").glob("*.tar"))
        for key, files in read_tar_samples(tar)
    ]
    mds_rows = [(row["key"], row) for row in read_mds(tmp_path / "mds")]
    assert [key for key, _ in wds_rows] == [key for key, _ in mds_rows]
    lost = Counter()  # images the kept documents lost, by reason
    for (key, wds_raw), (_, mds_raw) in zip(wds_rows, mds_rows):
        from_wds, from_mds = process(wds_raw, epoch=0, key=key), process(mds_raw, epoch=0, key=key)
        assert from_wds.keys() == from_mds.keys()
        dropped = from_wds.pop(DROPPED_IMAGES, []), from_mds.pop(DROPPED_IMAGES, [])
        assert [reason for reason, _ in dropped[0]] == [reason for reason, _ in dropped[1]], key
        lost.update(reason for reason, _ in dropped[0])
        for name in from_wds:
            assert from_wds[name].equal(from_mds[name]), (key, name)
    assert lost["missing_image"] > 0  # the raw set's failed downloads, reported alike by both formats


# ------------------------------------------------------------------------------------------- img2dataset


def test_img2dataset_tar_and_files_forms_give_the_wds_conversion(synthetic, tmp_path):
    tars = train_tars(synthetic, "laion")
    convert_wds_to_mds([str(p) for p in tars], tmp_path / "reference", layout="laion", progress=False)
    reference = read_mds(tmp_path / "reference")

    tar_form = tmp_path / "tar_form"
    tar_form.mkdir()
    files_form = tmp_path / "files_form"
    for shard, tar in enumerate(tars):
        shutil.copy(tar, tar_form / f"{shard:05d}.tar")
        (tar_form / f"{shard:05d}_stats.json").write_text('{"successes": 1}')
        folder = files_form / f"{shard:05d}"
        folder.mkdir(parents=True)
        (files_form / f"{shard:05d}_stats.json").write_text('{"successes": 1}')
        for key, files in read_tar_samples(tar):
            for ext, data in files.items():
                (folder / f"{key}.{ext}").write_bytes(data)

    for form in (tar_form, files_form):
        report = convert_img2dataset_to_mds(form, tmp_path / f"{form.name}-mds", progress=False)
        assert report.written == len(reference) and not report.skipped, form.name
        assert read_mds(tmp_path / f"{form.name}-mds") == reference, form.name


# ------------------------------------------------------------------------------------------------- CLIs


def test_cli_prints_a_summary_and_exits_non_zero_when_nothing_was_written(synthetic, tmp_path, capsys):
    tool = convert_wds
    tar = str(train_tars(synthetic, "laion")[0])
    assert (
        tool.main(["--layout", "laion", "--input", tar, "--out", str(tmp_path / "ok"), "--no-progress"]) == 0
    )
    assert "wrote 12 samples" in capsys.readouterr().out

    # LAION tars read as MMC4: each KEY.json is img2dataset metadata, not a document -> nothing written, exit 1.
    assert (
        tool.main(["--layout", "mmc4", "--input", tar, "--out", str(tmp_path / "none"), "--no-progress"]) == 1
    )
    out = capsys.readouterr().out
    assert "wrote 0 samples" in out and "malformed_json: 12" in out

    assert (
        tool.main(
            ["--layout", "laion", "--input", str(tmp_path / "absent.tar"), "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "absent.tar" in capsys.readouterr().err


def test_bench_data_prints_one_json_line_per_configuration(synthetic, capsys):
    bench = bench_data
    argv = ["--data", str(synthetic), "--formats", "wds", "mds", "--num-workers", "0", "--batches", "2",
            "--warmup", "0", "--laion-batch-size", "4", "--mmc4-batch-size", "2", "--image-size", "32",
            "--shuffle-buffer", "4"]  # fmt: skip
    assert bench.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["format"], line["num_workers"]) for line in lines] == [("wds", 0), ("mds", 0)]
    for line in lines:
        for part in ("laion", "mmc4", "total"):
            assert line[part]["samples_per_s"] > 0 and line[part]["samples_per_s_per_worker"] > 0
        assert line["feed"]["ratio"] > 0 and line["feed"]["gpu_step"]["batch"] == {"laion": 64, "mmc4": 32}
