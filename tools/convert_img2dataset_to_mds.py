#!/usr/bin/env python
"""Convert LAION-style img2dataset output to LAION MDS shards (columns key / jpg / txt, original image bytes).

    python tools/convert_img2dataset_to_mds.py --input laion-img2dataset/ --out laion-mds

Reads the `webdataset` output form (tars of KEY.jpg + KEY.txt + KEY.json) when the folder holds tars, else the
`files` form (subfolders of KEY.jpg + KEY.txt + KEY.json); parquet and stats files are ignored. Samples without
an image or caption, non-UTF-8 captions and truncated tars are reported and skipped. Exit status 1 when nothing
was written, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from flamingo_composer.shards.cli import add_output_args, run_converter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="img2dataset output folder")
    add_output_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing, so --help does not wait for torch and streaming.
    from flamingo_composer.shards.convert import convert_img2dataset_to_mds

    return run_converter(
        "convert_img2dataset_to_mds",
        convert_img2dataset_to_mds,
        args.input,
        out=args.out,
        compression=args.compression,
        size_limit=args.size_limit,
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    sys.exit(main())
