"""The commands that turn image-caption pair sources into LAION MDS shards (tools/convert_img2dataset_to_mds.py,
tools/convert_parquet_pairs_to_mds.py, tools/convert_image_folder_to_mds.py are their shims). Each prints the
conversion summary and exits 0 when it wrote something, 1 when not, 2 on bad arguments, inputs or columns.
Converters are imported after parsing, so --help does not wait for torch and streaming."""

from __future__ import annotations

import argparse

from flamingo_composer.shards.cli import add_output_args, add_require_all_arg, run_converter


def _parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def _output_kwargs(args: argparse.Namespace) -> dict:
    return {
        "out": args.out, "compression": args.compression, "size_limit": args.size_limit,
        "progress": not args.no_progress,
    }  # fmt: skip


IMG2DATASET_DOC = """Convert img2dataset output (LAION-style pairs) to LAION MDS shards (original image bytes).

    python tools/convert_img2dataset_to_mds.py --input laion-img2dataset/ --out mds/laion

Reads any of img2dataset's output forms: `webdataset` (NNNNN.tar of KEY.jpg + KEY.txt + KEY.json), `files`
(NNNNN/ folders of the same) or `parquet` (NNNNN.parquet with url, caption, status, error_message and the image
bytes in `jpg`). Only downloaded images are written; the URLs img2dataset failed on are counted by its status
(failed_to_download, failed_to_resize) from the status parquet each form writes. Samples without an image or
caption, non-UTF-8 captions, truncated tars and damaged parquet files are reported and skipped.
"""


def img2dataset_main(argv: list[str] | None = None) -> int:
    parser = _parser(IMG2DATASET_DOC)
    parser.add_argument("--input", required=True, help="img2dataset output folder")
    add_output_args(parser)
    args = parser.parse_args(argv)
    from flamingo_composer.shards.img2dataset import convert_img2dataset_to_mds

    return run_converter("convert_img2dataset_to_mds", convert_img2dataset_to_mds, args.input, **_output_kwargs(args))


PARQUET_PAIRS_DOC = """Convert image-caption parquet files (caption sets as the Hugging Face hub publishes them) to
LAION MDS shards (original image bytes).

    python tools/convert_parquet_pairs_to_mds.py --input coco-captions/data/train-*.parquet \\
        --image-col image --caption-col caption --out mds/coco

The image column holds raw bytes or the `datasets` Image struct {bytes, path}; the caption column a string or a
list of strings (one pair per caption). Files are read a row group and a batch at a time, never whole. A missing
or mistyped column stops the command before anything is written, naming the columns the file has; rows without
image bytes (or whose Image holds only a path) or without a caption, unreadable files and damaged row groups are
reported and skipped.
"""


def parquet_pairs_main(argv: list[str] | None = None) -> int:
    parser = _parser(PARQUET_PAIRS_DOC)
    parser.add_argument(
        "--input", required=True, nargs="+", help="parquet files, brace patterns or directories (their *.parquet)"
    )
    parser.add_argument("--image-col", default="image", help="the image column (default: image)")
    parser.add_argument("--caption-col", default="caption", help="the caption column (default: caption)")
    add_require_all_arg(parser)
    add_output_args(parser)
    args = parser.parse_args(argv)
    from flamingo_composer.shards.parquet_pairs import convert_parquet_pairs_to_mds

    return run_converter(
        "convert_parquet_pairs_to_mds", convert_parquet_pairs_to_mds, args.input,
        image_column=args.image_col, caption_column=args.caption_col, require_all=args.require_all,
        **_output_kwargs(args),
    )  # fmt: skip


IMAGE_FOLDER_DOC = """Convert a folder of image files with a captions table (CSV, TSV or JSONL) to LAION MDS shards
(original image bytes).

    python tools/convert_image_folder_to_mds.py --images photos/ --captions photos/metadata.csv \\
        --file-col file_name --caption-col caption --out mds/photos

Each row of the table names an image file (relative to --images) and its caption (in JSONL also a list of
captions: one pair each). Every image is decoded once here: a missing or undecodable file is reported by row and
path and its row skipped, as are rows without a file name or caption and malformed lines. A table without the
named columns stops the command, naming the columns it has.
"""


def image_folder_main(argv: list[str] | None = None) -> int:
    parser = _parser(IMAGE_FOLDER_DOC)
    parser.add_argument("--images", required=True, help="folder of image files")
    parser.add_argument("--captions", required=True, help="captions table: .csv, .tsv or .jsonl")
    parser.add_argument("--file-col", default="file_name", help="column of image paths (default: file_name)")
    parser.add_argument("--caption-col", default="caption", help="column of captions (default: caption)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    from flamingo_composer.shards.image_folder import convert_image_folder_to_mds

    return run_converter(
        "convert_image_folder_to_mds", convert_image_folder_to_mds, args.images, args.captions,
        file_column=args.file_col, caption_column=args.caption_col, **_output_kwargs(args),
    )  # fmt: skip
