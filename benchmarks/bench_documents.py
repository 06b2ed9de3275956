"""Natural-order interleaved documents (`layout: natural`): the converter's documents/s (OBELICS-layout parquet +
downloads named by sha256(url) -> MDS) and the loader's documents/s per worker from that MDS (read, decode, cut a
--max-tokens window, resize to --image-size, collate), against what one training step of the 3B recipe consumes.

    python -m benchmarks.bench_documents                          # 200 synthetic documents, 0 and 1 workers
    python -m benchmarks.bench_documents --num-documents 400 --num-workers 1 2 --batches 20

Prints one JSON line per number of workers. `feed.ratio` = what --workers-per-gpu workers produce in one step time
/ the step's 32 documents (bench_data's step estimate, made for 256-token MMC4 documents: a step on 1024-token
documents takes longer, so this asks more of the loader). The pairs of the same step need workers too (bench_data
measures them): the ratio is the documents' own, goal >= 3. Synthetic documents have the open corpora's shape
(~800 words, 2-4 images of --source-image-size px); the built-in tokenizer is word-level, cheaper than a real BPE
tokenizer (--tokenizer NAME loads a local one). A benchmark, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_data import FEED_GOAL, STEP_BATCH, build_tokenizer_and_transform, gpu_step_estimate, log, measure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-documents", type=int, default=200, help="synthetic documents to generate")
    parser.add_argument("--num-workers", nargs="+", type=int, default=[0, 1], help="DataLoader workers")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (worker start-up)")
    parser.add_argument("--batch-size", type=int, default=8, help="documents per batch")
    parser.add_argument("--max-tokens", type=int, default=1024, help="window length (the natural layout's default)")
    parser.add_argument("--image-size", type=int, default=224, help="image transform size")
    parser.add_argument("--source-image-size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--workers-per-gpu", type=int, default=8, help="DataLoader workers one GPU has (feed)")
    parser.add_argument("--tokenizer", default="tiny", help="'tiny' (built-in) or a tokenizer name / local path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("num_documents", "batches", "batch_size", "max_tokens", "image_size", "source_image_size",
                 "workers_per_gpu"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or min(args.num_workers) < 0:
        parser.error("--warmup and --num-workers must be >= 0")
    return args


def documents_feed(documents_per_s_per_worker: float, workers_per_gpu: int) -> dict:
    """What `workers_per_gpu` workers make in the estimated 3B step time, over the step's documents."""
    step = gpu_step_estimate()
    worker_seconds = STEP_BATCH["mmc4"] / documents_per_s_per_worker  # one step's documents, one worker
    ratio = workers_per_gpu * step["seconds"] / worker_seconds
    return {
        "gpu_step": step, "documents_per_step": STEP_BATCH["mmc4"], "workers_per_gpu": workers_per_gpu,
        "worker_seconds_per_step": round(worker_seconds, 3), "ratio": round(ratio, 2), "goal": FEED_GOAL,
        "meets_goal": ratio >= FEED_GOAL,
    }  # fmt: skip


def run(args, root: Path) -> int:
    from flamingo_composer.data.config import DataConfig
    from flamingo_composer.data.dual_loader import build_dual_loader
    from flamingo_composer.shards.interleaved_parquet import convert_interleaved_parquet
    from flamingo_composer.shards.synthetic_documents import write_synthetic_documents

    log(f"[bench_documents] generating {args.num_documents} documents in {root}")
    images = write_synthetic_documents(
        root / "docs.parquet", root / "images", num_documents=args.num_documents,
        image_size=args.source_image_size, seed=args.seed,
    )  # fmt: skip
    report = convert_interleaved_parquet(
        [str(root / "docs.parquet")], root / "mds", preset="obelics", image_dir=root / "images", progress=False
    )
    converter = {
        "documents": report.written, "images": images, "seconds": round(report.seconds, 2),
        "documents_per_s": round(report.written / report.seconds, 1),
    }  # fmt: skip
    tokenizer, transform = build_tokenizer_and_transform(args)
    for num_workers in args.num_workers:
        log(f"[bench_documents] loader, num_workers={num_workers}")
        data = DataConfig.from_plain({"documents": {
            "kind": "interleaved", "format": "mds", "local": str(root / "mds"), "batch_size": args.batch_size,
            "num_workers": num_workers, "seed": args.seed,
            "preprocess": {"layout": "natural", "max_tokens": args.max_tokens, "min_image_bytes": 0},
        }})  # fmt: skip
        loader = build_dual_loader(data, tokenizer, transform, rank=0, world_size=1, pin_memory=False)
        measured = measure(loader, args.warmup, args.batches)
        rate = measured["samples"]["documents"] / measured["seconds"]
        per_worker = rate / max(num_workers, 1)
        print(json.dumps({
            "layout": "natural", "format": "mds", "max_tokens": args.max_tokens, "image_size": args.image_size,
            "num_workers": num_workers, "batch_size": args.batch_size, "converter": converter,
            "documents_per_s": round(rate, 2), "documents_per_s_per_worker": round(per_worker, 2),
            "skipped": dict(sorted(measured["skipped"]["documents"].items())),
            "feed": documents_feed(per_worker, args.workers_per_gpu),
        }), flush=True)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-documents-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
