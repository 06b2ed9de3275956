"""Export the image URLs of natural-order interleaved parquet (OBELICS, MINT-1T-HTML, OmniCorpus-CC) for img2dataset:
one `url` column, each URL once, in document order; prints the img2dataset command to run, whose output
flamingo-convert-interleaved joins by URL.

    flamingo-export-image-urls --preset obelics --input 'obelics/train-0000{0..9}-of-01335.parquet' \\
        --out obelics-urls.parquet --images-out obelics-images

Exit 0 when URLs were written, 1 when none, 2 on bad arguments, inputs or columns.
"""

from __future__ import annotations

import argparse
import sys

from flamingo_composer.shards.cli import add_require_all_arg
from flamingo_composer.shards.interleaved_presets import PRESETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the corpus' parquet layout")
    parser.add_argument(
        "--input", required=True, nargs="+", help="parquet files, brace patterns or directories (their *.parquet)"
    )
    parser.add_argument("--out", required=True, help="the URL parquet to write (must not exist)")
    parser.add_argument(
        "--images-out", default="images", help="img2dataset's output folder in the printed command (default: images)"
    )
    add_require_all_arg(parser)
    args = parser.parse_args(argv)
    from flamingo_composer.shards.image_urls import export_image_urls, img2dataset_command  # after parsing

    try:
        written, report = export_image_urls(args.input, args.out, preset=args.preset, require_all=args.require_all)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"flamingo-export-image-urls: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written} unique image URLs to {args.out}")
    for reason, count in sorted(report.skipped.items()):
        print(f"  skipped {reason}: {count}" + "".join(f"\n    e.g. {d}" for d in report.examples.get(reason, [])))
    print("download them with:")
    print(f"  {img2dataset_command(args.out, args.images_out)}")
    print(f"then convert with: flamingo-convert-interleaved --preset {args.preset} --input ... "
          f"--images-from-img2dataset {args.images_out} --out ...")  # fmt: skip
    return 0 if written else 1
