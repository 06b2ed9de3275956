"""Convert natural-order interleaved parquet (OBELICS, MINT-1T-HTML, OmniCorpus-CC) to whole documents in MDS or
webdataset shards, for `layout: natural` recipes.

    flamingo-convert-interleaved --preset obelics --input 'obelics/train-0000{0..9}-of-01335.parquet' \\
        --images-from-img2dataset obelics-images --out mds/obelics/train

Nothing is downloaded: image bytes come from the rows themselves (HF Image structs), from img2dataset output joined
by URL (flamingo-export-image-urls writes its URL list), or from a folder of files named by sha256(url); an image
none of them holds is counted as not downloaded and left out, its text kept. Prints how many documents and images
survived, by reason, and the documents/s. Exit 0 when something was written, 1 when not, 2 on bad arguments,
inputs or columns (named, beside the columns the file has).
"""

from __future__ import annotations

import argparse

from flamingo_composer.shards.cli import add_output_args, add_require_all_arg, output_kwargs, run_converter
from flamingo_composer.shards.interleaved_presets import PRESETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the corpus' parquet layout")
    parser.add_argument(
        "--input", required=True, nargs="+", help="parquet files, brace patterns or directories (their *.parquet)"
    )
    parser.add_argument("--format", choices=["mds", "wds"], default="mds", help="output shards (default: mds)")
    parser.add_argument("--images-from-img2dataset", help="img2dataset output folder (tars or parquet) to join by URL")
    parser.add_argument("--image-dir", help="a folder of downloaded images named by sha256(url)")
    parser.add_argument("--docs-per-shard", type=int, default=1000, help="documents per webdataset tar")
    add_output_args(parser)
    add_require_all_arg(parser)
    args = parser.parse_args(argv)
    if args.docs_per_shard < 1:
        parser.error("--docs-per-shard must be >= 1")
    from flamingo_composer.shards.interleaved_parquet import convert_interleaved_parquet  # after parsing: fast --help

    return run_converter(
        "flamingo-convert-interleaved", convert_interleaved_parquet, args.input, preset=args.preset,
        output_format=args.format, img2dataset_dir=args.images_from_img2dataset, image_dir=args.image_dir,
        docs_per_shard=args.docs_per_shard, require_all=args.require_all, **output_kwargs(args),
    )  # fmt: skip
