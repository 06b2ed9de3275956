"""Convert a folder of image files with a captions table (CSV, TSV or JSONL) to LAION MDS shards, each image's
original bytes.

    flamingo-convert-image-folder --images photos/ --captions photos/metadata.csv \\
        --file-col file_name --caption-col caption --out mds/photos/train

Each row of the table names an image file (relative to --images) and its caption (in JSONL also a list of
captions: one pair each). Every image is decoded once here: a missing or undecodable file is reported by table
line and path and its row skipped, as are rows without a file name or caption and malformed lines. A table
without the named columns stops the command, naming the columns it has. Exit 0 when something was written, 1 when
not, 2 on bad arguments, inputs or columns.
"""

from __future__ import annotations

import argparse

from flamingo_composer.shards.cli import add_output_args, output_kwargs, run_converter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of image files")
    parser.add_argument("--captions", required=True, help="captions table: .csv, .tsv or .jsonl")
    parser.add_argument("--file-col", default="file_name", help="column of image paths (default: file_name)")
    parser.add_argument("--caption-col", default="caption", help="column of captions (default: caption)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    from flamingo_composer.shards.image_folder import convert_image_folder_to_mds  # after parsing: fast --help

    return run_converter(
        "flamingo-convert-image-folder", convert_image_folder_to_mds, args.images, args.captions,
        file_column=args.file_col, caption_column=args.caption_col, **output_kwargs(args),
    )  # fmt: skip
