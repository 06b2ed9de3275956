"""The commands of natural-order interleaved parquet (tools/export_image_urls.py and
tools/convert_interleaved_parquet.py are their shims): export the image URLs for img2dataset, then convert the
documents with the downloaded images. Exit 0 when something was written, 1 when not, 2 on bad arguments, inputs or
columns. The work is imported after parsing, so --help does not wait for torch and streaming."""

from __future__ import annotations

import argparse
import sys

from flamingo_composer.shards.cli import add_output_args, add_require_all_arg, run_converter
from flamingo_composer.shards.interleaved_presets import PRESETS

EXPORT_DOC = """Export the image URLs of natural-order interleaved parquet (OBELICS, MINT-1T-HTML, OmniCorpus-CC) for
img2dataset: one `url` column, each URL once, in document order; prints the img2dataset command to run.

    python tools/export_image_urls.py --preset obelics --input 'obelics/train-0000{0..9}-of-01335.parquet' \\
        --out obelics-urls.parquet --images-out obelics-images
"""

CONVERT_DOC = """Convert natural-order interleaved parquet (OBELICS, MINT-1T-HTML, OmniCorpus-CC) to whole documents in
MDS or webdataset shards, for `layout: natural` recipes. Nothing is downloaded: image bytes come from the rows
themselves (HF Image structs), from img2dataset output joined by URL, or from a folder of files named by
sha256(url); an image none of them holds is counted as not downloaded and left out, its text kept.

    python tools/convert_interleaved_parquet.py --preset obelics --input 'obelics/train-0000{0..9}-of-01335.parquet' \\
        --images-from-img2dataset obelics-images --out mds/obelics/train

Prints how many documents and images survived, by reason, and the documents/s.
"""


def _parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the corpus' parquet layout")
    parser.add_argument(
        "--input", required=True, nargs="+", help="parquet files, brace patterns or directories (their *.parquet)"
    )
    return parser


def export_urls_main(argv: list[str] | None = None) -> int:
    parser = _parser(EXPORT_DOC)
    parser.add_argument("--out", required=True, help="the URL parquet to write (must not exist)")
    parser.add_argument(
        "--images-out", default="images", help="img2dataset's output folder in the printed command (default: images)"
    )
    add_require_all_arg(parser)
    args = parser.parse_args(argv)
    from flamingo_composer.shards.image_urls import export_image_urls, img2dataset_command

    try:
        written, report = export_image_urls(args.input, args.out, preset=args.preset, require_all=args.require_all)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"export_image_urls: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written} unique image URLs to {args.out}")
    for reason, count in sorted(report.skipped.items()):
        print(f"  skipped {reason}: {count}" + "".join(f"\n    e.g. {d}" for d in report.examples.get(reason, [])))
    print("download them with:")
    print(f"  {img2dataset_command(args.out, args.images_out)}")
    print(f"then convert with --images-from-img2dataset {args.images_out}")
    return 0 if written else 1


def convert_main(argv: list[str] | None = None) -> int:
    parser = _parser(CONVERT_DOC)
    parser.add_argument("--format", choices=["mds", "wds"], default="mds", help="output shards (default: mds)")
    parser.add_argument("--images-from-img2dataset", help="img2dataset output folder (tars or parquet) to join by URL")
    parser.add_argument("--image-dir", help="a folder of downloaded images named by sha256(url)")
    parser.add_argument("--docs-per-shard", type=int, default=1000, help="documents per webdataset tar")
    add_output_args(parser)
    add_require_all_arg(parser)
    args = parser.parse_args(argv)
    if args.docs_per_shard < 1:
        parser.error("--docs-per-shard must be >= 1")
    from flamingo_composer.shards.interleaved_parquet import convert_interleaved_parquet

    return run_converter(
        "convert_interleaved_parquet", convert_interleaved_parquet, args.input, out=args.out, preset=args.preset,
        output_format=args.format, img2dataset_dir=args.images_from_img2dataset, image_dir=args.image_dir,
        compression=args.compression, size_limit=args.size_limit, docs_per_shard=args.docs_per_shard,
        progress=not args.no_progress, require_all=args.require_all,
    )  # fmt: skip
