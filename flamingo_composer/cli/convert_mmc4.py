"""Convert raw MMC4 documents (jsonl, plain, gzipped or zipped, plus the folder of their downloaded images) to MDS
or webdataset shards.

    flamingo-convert-mmc4 --input mmc4-core-ff/ --images mmc4-core-ff-images --format mds --out mds/mmc4/train

What survives of MMC4 is its fewer-faces splits, mmc4-ff and mmc4-core-ff (the full set was withdrawn in Feb
2025), published as plain `.jsonl` shards and as zips holding many jsonl members; both convert, as do the older
`docs_shard_N_v2.jsonl.zip`. Images are looked up as IMAGES/<image_name>, then IMAGES/<N>/<image_name> for
docs_shard_N, then in the per-file folder mmc4's own download script writes, IMAGES/<stem>_images/ (the stem of
the input or of the zip member: shard_151.zip holding docs_no_face_shard_151_v3.jsonl ->
docs_no_face_shard_151_v3_images/). A brace range converts the inputs that exist and lists the missing ones (exit
2 if none exists, or if any is missing with --require-all). An archive inside a zip is named and not read; a
damaged member is named and the next one read; a cut zip is streamed from its local headers (bounded memory,
whatever its size) and every complete document before the cut is kept. `--format mds` writes the MDS layout of
flamingo_composer.data.mds, `--format wds` KEY.json documents with image_base64 (the reference's MMC4 shards); both
keep each image's original bytes. Missing and undecodable images are reported (their image_info entry is kept
without bytes, so the similarity matrix still lines up); documents with no usable image are skipped. Exit 0 when
something was written, 1 when not, 2 on bad arguments or missing inputs.
"""

from __future__ import annotations

import argparse

from flamingo_composer.shards.cli import add_output_args, add_require_all_arg, output_kwargs, run_converter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="jsonl / jsonl.gz / zipped jsonl files, brace patterns, or directories holding them",
    )
    parser.add_argument(
        "--images", required=True, help="folder of the downloaded images (see above for the sub-folders searched)"
    )
    parser.add_argument("--format", required=True, choices=["wds", "mds"], help="output shard format")
    parser.add_argument("--docs-per-shard", type=int, default=1000, help="documents per webdataset tar (wds)")
    add_require_all_arg(parser)
    add_output_args(parser)
    args = parser.parse_args(argv)
    from flamingo_composer.shards.convert import convert_raw_mmc4  # after parsing: --help stays fast

    return run_converter(
        "flamingo-convert-mmc4", convert_raw_mmc4, args.input, args.images, output_format=args.format,
        docs_per_shard=args.docs_per_shard, require_all=args.require_all, **output_kwargs(args),
    )  # fmt: skip
