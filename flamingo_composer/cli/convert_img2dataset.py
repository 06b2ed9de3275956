"""Convert img2dataset output (LAION-style pairs) to LAION MDS shards, each image's original bytes.

    flamingo-convert-img2dataset --input laion-img2dataset/ --out mds/laion/train

Reads any of img2dataset's output forms: `webdataset` (NNNNN.tar of KEY.jpg + KEY.txt + KEY.json), `files`
(NNNNN/ folders of the same) or `parquet` (NNNNN.parquet with url, caption, status, error_message and the image
bytes in `jpg`). Only downloaded images are written; the URLs img2dataset failed on are counted by its status
(failed_to_download, failed_to_resize) from the status parquet each form writes. Samples without an image or
caption, non-UTF-8 captions, truncated tars and damaged parquet files are reported and skipped. Exit 0 when
something was written, 1 when not, 2 on bad arguments, inputs or columns.
"""

from __future__ import annotations

import argparse

from flamingo_composer.shards.cli import add_output_args, output_kwargs, run_converter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="img2dataset output folder")
    add_output_args(parser)
    args = parser.parse_args(argv)
    from flamingo_composer.shards.img2dataset import convert_img2dataset_to_mds  # after parsing: --help stays fast

    return run_converter("flamingo-convert-img2dataset", convert_img2dataset_to_mds, args.input, **output_kwargs(args))
