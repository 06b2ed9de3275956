"""Convert image-caption parquet files (caption sets as the Hugging Face hub publishes them) to LAION MDS shards,
each image's original bytes.

    flamingo-convert-parquet-pairs --input coco-captions/data/train-*.parquet \\
        --image-col image --caption-col caption --out mds/coco/train

The image column holds raw bytes or the `datasets` Image struct {bytes, path}; the caption column a string or a
list of strings (one pair per caption). Files are read a row group and a batch at a time, never whole. A missing
or mistyped column stops the command before anything is written, naming the columns the file has; rows without
image bytes (or whose Image holds only a path) or without a caption, unreadable files and damaged row groups are
reported and skipped. Exit 0 when something was written, 1 when not, 2 on bad arguments, inputs or columns.
"""

from __future__ import annotations

import argparse

from flamingo_composer.shards.cli import add_output_args, add_require_all_arg, output_kwargs, run_converter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input", required=True, nargs="+", help="parquet files, brace patterns or directories (their *.parquet)"
    )
    parser.add_argument("--image-col", default="image", help="the image column (default: image)")
    parser.add_argument("--caption-col", default="caption", help="the caption column (default: caption)")
    add_require_all_arg(parser)
    add_output_args(parser)
    args = parser.parse_args(argv)
    from flamingo_composer.shards.parquet_pairs import convert_parquet_pairs_to_mds  # after parsing: fast --help

    return run_converter(
        "flamingo-convert-parquet-pairs", convert_parquet_pairs_to_mds, args.input,
        image_column=args.image_col, caption_column=args.caption_col, require_all=args.require_all,
        **output_kwargs(args),
    )  # fmt: skip
