"""Generate the built-in synthetic LAION-style and MMC4-style data (webdataset tars and/or MDS).

Example: flamingo-make-synthetic-data --out data/synthetic --format both --seed 0
See flamingo_composer/shards/synthetic.py for the layout; recipes on this data set mmc4.min_image_bytes to the
manifest's recommended value (the 64 px images are far below MMC4's 11 kB default).
"""

from __future__ import annotations

import argparse
import sys
import time

# Defaults mirror flamingo_composer.shards.synthetic.SyntheticConfig; imported lazily so --help stays instant.
DEFAULTS = dict(
    seed=0, num_laion=4000, num_laion_val=256, num_mmc4=1000, num_mmc4_val=128, image_size=64,
    laion_shard_size=500, mmc4_shard_size=125, bad_every=0,
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    defaults = argparse.Namespace(**DEFAULTS)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument(
        "--format", choices=["wds", "mds", "both"], default="both", help="shard formats to write"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num-laion", type=int, default=defaults.num_laion, help="LAION training pairs")
    parser.add_argument(
        "--num-laion-val", type=int, default=defaults.num_laion_val, help="LAION held-out pairs"
    )
    parser.add_argument("--num-mmc4", type=int, default=defaults.num_mmc4, help="MMC4 training documents")
    parser.add_argument(
        "--num-mmc4-val", type=int, default=defaults.num_mmc4_val, help="MMC4 held-out documents"
    )
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="image side in pixels")
    parser.add_argument(
        "--laion-shard-size", type=int, default=defaults.laion_shard_size, help="pairs per tar"
    )
    parser.add_argument(
        "--mmc4-shard-size", type=int, default=defaults.mmc4_shard_size, help="documents per tar"
    )
    parser.add_argument(
        "--bad-every", type=int, default=defaults.bad_every,
        help="break every k-th sample (corrupt/missing image, empty caption, bad base64, bad similarity, "
        "malformed document) to exercise the skip paths; 0 = none",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from flamingo_composer.shards.synthetic import SyntheticConfig, write_synthetic_dataset

    cfg = SyntheticConfig(
        seed=args.seed,
        num_laion=args.num_laion,
        num_laion_val=args.num_laion_val,
        num_mmc4=args.num_mmc4,
        num_mmc4_val=args.num_mmc4_val,
        image_size=args.image_size,
        laion_shard_size=args.laion_shard_size,
        mmc4_shard_size=args.mmc4_shard_size,
        bad_every=args.bad_every,
    )
    formats = ("wds", "mds") if args.format == "both" else (args.format,)
    start = time.perf_counter()
    try:
        manifest = write_synthetic_dataset(args.out, cfg, formats)
    except (FileExistsError, ValueError) as err:
        print(f"make_synthetic_data: {err}", file=sys.stderr)
        return 2
    counts = manifest["counts"]
    print(
        f"wrote {args.out} ({', '.join(formats)}) in {time.perf_counter() - start:.1f}s: "
        f"LAION {counts['laion']['train']} train / {counts['laion']['val']} val pairs, "
        f"MMC4 {counts['mmc4']['train']} train / {counts['mmc4']['val']} val documents"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
