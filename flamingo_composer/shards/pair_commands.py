"""The commands that turn image-caption pair sources into LAION MDS shards (tools/convert_img2dataset_to_mds.py,
tools/convert_parquet_pairs_to_mds.py, tools/convert_image_folder_to_mds.py are their shims). Each prints the
conversion summary and exits 0 when it wrote something, 1 when not, 2 on bad arguments, inputs or columns.
Converters are imported after parsing, so --help does not wait for torch and streaming."""

from __future__ import annotations

import argparse

from flamingo_composer.shards.cli import add_output_args, run_converter


def _parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def _output_kwargs(args: argparse.Namespace) -> dict:
    return {
        "out": args.out, "compression": args.compression, "size_limit": args.size_limit,
        "progress": not args.no_progress,
    }  # fmt: skip


IMG2DATASET_DOC = """Convert img2dataset output (LAION-style pairs) to LAION MDS shards (original image bytes).

    python tools/convert_img2dataset_to_mds.py --input laion-img2dataset/ --out mds/laion

Reads any of img2dataset's output forms: `webdataset` (NNNNN.tar of KEY.jpg + KEY.txt + KEY.json), `files`
(NNNNN/ folders of the same) or `parquet` (NNNNN.parquet with url, caption, status, error_message and the image
bytes in `jpg`). Only downloaded images are written; the URLs img2dataset failed on are counted by its status
(failed_to_download, failed_to_resize) from the status parquet each form writes. Samples without an image or
caption, non-UTF-8 captions, truncated tars and damaged parquet files are reported and skipped.
"""


def img2dataset_main(argv: list[str] | None = None) -> int:
    parser = _parser(IMG2DATASET_DOC)
    parser.add_argument("--input", required=True, help="img2dataset output folder")
    add_output_args(parser)
    args = parser.parse_args(argv)
    from flamingo_composer.shards.img2dataset import convert_img2dataset_to_mds

    return run_converter("convert_img2dataset_to_mds", convert_img2dataset_to_mds, args.input, **_output_kwargs(args))
