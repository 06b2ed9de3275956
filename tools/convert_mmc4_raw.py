#!/usr/bin/env python
"""Convert raw MMC4 (as published: `docs_shard_N_v2.jsonl.zip`, or plain / gzipped `.jsonl`, plus a folder of
the downloaded images named by `image_name`) to webdataset or MDS shards.

    python tools/convert_mmc4_raw.py --input 'mmc4/docs_shard_{0..9}_v2.jsonl.zip' --images mmc4/images \\
        --format wds --out mmc4-wds

Images are looked up as IMAGES/<image_name>, then IMAGES/<N>/<image_name> for docs_shard_N, then in the per-shard
folder mmc4's own download script writes, IMAGES/<shard name>_images/<image_name> (e.g.
IMAGES/docs_shard_0_v2.jsonl_images/ for docs_shard_0_v2.jsonl.zip, or docs_shard_0_v2_images/; a zip's member
names it too: shard_151.zip holding docs_no_face_shard_151_v3.jsonl -> docs_no_face_shard_151_v3_images/). A brace range
converts the inputs that exist and lists the missing ones (the public release lacks some shard numbers); exit 2
if none exists, or if any is missing with --require-all. A damaged (cut) zip is reported by name and every
complete document before the damage is kept. `--format wds`
writes KEY.json documents with image_base64 (the reference's MMC4 shard layout); `--format mds` writes the MDS
layout of flamingo_composer.data.mds. Both keep each image's original bytes. Missing and undecodable
images are reported (their image_info entry is kept without bytes, so the similarity matrix still lines up);
documents with no usable image are skipped. Exit status 1 when nothing was written, 2 on bad
arguments or missing inputs.
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
        "--input",
        required=True,
        nargs="+",
        help="jsonl / jsonl.gz / zipped jsonl files, brace patterns, or directories holding them",
    )
    parser.add_argument(
        "--images",
        required=True,
        help="folder of downloaded images named by image_name (see above for the sub-folders searched)",
    )
    parser.add_argument("--format", required=True, choices=["wds", "mds"], help="output shard format")
    parser.add_argument("--docs-per-shard", type=int, default=1000, help="documents per webdataset tar (wds)")
    add_require_all_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing, so --help does not wait for torch and streaming.
    from flamingo_composer.shards.convert import convert_raw_mmc4

    return run_converter(
        "convert_mmc4_raw",
        convert_raw_mmc4,
        args.input,
        args.images,
        out=args.out,
        output_format=args.format,
        compression=args.compression,
        size_limit=args.size_limit,
        docs_per_shard=args.docs_per_shard,
        progress=not args.no_progress,
        require_all=args.require_all,
    )


if __name__ == "__main__":
    sys.exit(main())
