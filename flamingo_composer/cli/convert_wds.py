"""Convert webdataset shards (LAION or MMC4 layout, as the reference's shards are) to MDS shards.

    flamingo-convert-wds --layout laion --input 'laion/{000000..000099}.tar' --out mds/laion/train
    flamingo-convert-wds --layout mmc4 --input mmc4-wds/ --out mds/mmc4/train

Images keep their original bytes (MMC4 base64 is decoded once, never re-encoded). Truncated tars and malformed
members are reported and skipped; the summary lists every skip reason. A brace range converts the shards that
exist and lists the missing ones. Exit 0 when something was written, 1 when not, 2 on bad arguments or inputs.
"""

from __future__ import annotations

import argparse

from flamingo_composer.shards.cli import add_output_args, add_require_all_arg, output_kwargs, run_converter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", required=True, choices=["laion", "mmc4"], help="sample layout of the tars")
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="tar files, brace patterns ('dir/{000..009}.tar'), directories of tars, or pipe:/http URLs",
    )
    add_require_all_arg(parser)
    add_output_args(parser)
    args = parser.parse_args(argv)
    from flamingo_composer.shards.convert import convert_wds_to_mds  # after parsing: --help stays fast

    return run_converter(
        "flamingo-convert-wds", convert_wds_to_mds, args.input, layout=args.layout, require_all=args.require_all,
        **output_kwargs(args),
    )  # fmt: skip
