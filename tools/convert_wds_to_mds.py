#!/usr/bin/env python
"""Convert webdataset shards (LAION or MMC4 layout) to MDS shards for mosaicml-streaming.

    python tools/convert_wds_to_mds.py --layout laion --input 'laion/{000000..000099}.tar' --out laion-mds
    python tools/convert_wds_to_mds.py --layout mmc4 --input mmc4/ --out mmc4-mds

Images keep their original bytes (MMC4 base64 is decoded once, never re-encoded). Truncated tars and malformed
members are reported and skipped; the summary lists every skip reason. Exit status 1 when nothing was
written, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from flamingo_composer.shards.cli import add_output_args, add_require_all_arg, run_converter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layout", required=True, choices=["laion", "mmc4"], help="sample layout of the tars"
    )
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="tar files, brace patterns ('dir/{000..009}.tar'), directories of tars, or pipe:/http URLs",
    )
    add_require_all_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing, so --help does not wait for torch and streaming.
    from flamingo_composer.shards.convert import convert_wds_to_mds

    return run_converter(
        "convert_wds_to_mds",
        convert_wds_to_mds,
        args.input,
        out=args.out,
        layout=args.layout,
        compression=args.compression,
        size_limit=args.size_limit,
        progress=not args.no_progress,
        require_all=args.require_all,
    )


if __name__ == "__main__":
    sys.exit(main())
