"""Few-shot evaluation of a checkpoint on the recipe's `evaluators:` tasks (COCO CIDEr, VQAv2 accuracy, ...).

    flamingo-evaluate --config yamls/eval-easyvqa.yaml --checkpoint runs/x/checkpoints/latest-rank0.pt
    flamingo-evaluate --suite yamls/eval/openflamingo.yaml --checkpoint OpenFlamingo-3B-vitl-mpt1b/checkpoint.pt
    composer -n 8 tools/evaluate.py --config RECIPE --checkpoint OpenFlamingo-3B-vitl-mpt1b/checkpoint.pt --task coco

The recipe's `model:` section builds the model (frozen CLIP/LM from the recipe), `--checkpoint` is one of our
Composer checkpoints (train.py; `--weights` picks its EMA average or its trained weights) or a released
OpenFlamingo `checkpoint.pt`. Protocol: the reference's (prompts,
demos per trial seed, beam search 3 / length_penalty 0, post-processing). Under `composer -n N` the queries
are split across the ranks and gathered; the score is computed once. Prints one JSON summary on stdout (per task
and shot: trials, mean, std; the caption tokenizer used; skipped records; eval samples/s), also saved as
OUT/summary.json; writes the predictions in each benchmark's results format under --out; shows a progress bar
with an ETA on stderr. Exit status 2 on a bad config or arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="recipe YAML with model: and evaluators: sections")
    parser.add_argument(
        "--suite", help="suite YAML (a recipe with a suite: section): every benchmark, shot and trial, resumable "
        "from its results file, one JSON and a Markdown table (flamingo_composer/eval/suite.py)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint", required=True, help="our Composer checkpoint or a released checkpoint.pt"
    )
    parser.add_argument(
        "--weights", choices=["auto", "ema", "raw"], default="auto",
        help="our checkpoints: the EMA average (ema) or the trained weights (raw); default %(default)s = the EMA "
        "average when the checkpoint holds one (a run with the `ema` algorithm), else raw",
    )  # fmt: skip
    parser.add_argument("--task", action="append", help="evaluator name to run (repeatable; default: all)")
    parser.add_argument("--shots", type=int, nargs="+", help="override every task's shots")
    parser.add_argument(
        "--num-samples", type=int, help="override every task's num_samples (queries per trial)"
    )
    parser.add_argument("--batch-size", type=int, help="override every task's batch_size")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam search")
    parser.add_argument(
        "--out", default="eval-results", help="folder for the prediction files (default %(default)s)"
    )
    parser.add_argument("--device", choices=["cpu", "gpu"], help="default: gpu when CUDA is available")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the recipe")
    args = parser.parse_args(argv)
    if (args.config is None) == (args.suite is None):
        parser.error("give one of --config and --suite")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.suite is not None:
        return run_suite(args)
    import torch
    from composer.utils import dist, get_device, reproducibility
    from tqdm import tqdm

    from flamingo_composer.eval.checkpoints import load_checkpoint, read_recipe
    from flamingo_composer.eval.runner import evaluate_task
    from flamingo_composer.eval.tasks import build_task
    from flamingo_composer.models.factory import build_flamingo
    from flamingo_composer.training.config import ConfigError

    try:
        model_cfg, evaluators = read_recipe(args.config, args.overrides)
        evaluators = _select(evaluators, args)
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    device = get_device(args.device)
    dist.initialize_dist(device)
    reproducibility.seed_all(0)
    bundle = build_flamingo(model_cfg)
    try:
        checkpoint = load_checkpoint(bundle.model, args.checkpoint, weights=args.weights)
    except ValueError as exc:  # e.g. --weights ema on a checkpoint without an average
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = bundle.model.to(device._device).eval()
    tasks = [build_task(cfg, bundle.tokenizer, bundle.image_transform, vision_encoder=model.vision_encoder,
                        device=device._device) for cfg in evaluators]  # fmt: skip
    total = sum(
        len(t.rank_positions(dist.get_global_rank(), dist.get_world_size())) * len(t.cfg.shots) for t in tasks
    )
    progress = None
    if not args.no_progress and dist.get_global_rank() == 0:
        progress = tqdm(total=total, desc="few-shot eval", unit="batch", file=sys.stderr)

    start = time.perf_counter()
    results = {}
    with torch.no_grad():
        for task in tasks:
            results[task.cfg.name] = evaluate_task(
                model, task, task.cfg.shots, device=device._device, out_dir=Path(args.out), progress=progress
            )
    if progress is not None:
        progress.close()
    seconds = [r["generation"]["seconds"] for r in results.values()]
    queries = [r["generation"]["queries_this_rank"] for r in results.values()]
    summary = {
        "checkpoint": checkpoint,
        "world_size": dist.get_world_size(),
        "tasks": results,
        "wall_seconds": time.perf_counter() - start,
        "eval_samples_per_s_per_rank": sum(queries) / max(sum(seconds), 1e-9),
    }
    if dist.get_global_rank() == 0:
        text = json.dumps(summary, indent=1, default=str)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "summary.json").write_text(text)
        print(text)
    return 0


def run_suite(args) -> int:
    """--suite: read and check the suite (exit 2 before any model is built), then run what its results lack."""
    from composer.utils import dist, get_device, reproducibility

    from flamingo_composer.eval.checkpoints import load_checkpoint
    from flamingo_composer.eval.suite import read_suite
    from flamingo_composer.eval.suite import run_suite as run
    from flamingo_composer.models.factory import build_flamingo
    from flamingo_composer.training.config import ConfigError

    try:
        model_cfg, evaluators, suite = read_suite(args.suite, args.overrides)
        args.config = args.suite  # named in _select's messages
        evaluators = _select(evaluators, args)
        if not Path(args.checkpoint).is_file():
            raise ValueError(f"--checkpoint: file not found: {args.checkpoint}")
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    device = get_device(args.device)
    dist.initialize_dist(device)
    reproducibility.seed_all(0)

    def build_model():
        bundle = build_flamingo(model_cfg)
        loaded = load_checkpoint(bundle.model, args.checkpoint)
        return bundle.model.to(device._device).eval(), bundle.tokenizer, bundle.image_transform, loaded

    try:
        results = run(evaluators, suite, checkpoint=str(args.checkpoint), build_model=build_model,
                      device=device._device, progress=not args.no_progress)  # fmt: skip
    except ValueError as exc:  # a results file of another checkpoint
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if dist.get_global_rank() == 0:
        print(json.dumps({"results": suite.results, "table": suite.table, "summary": results["summary"]}, indent=1))
        print(Path(suite.table).read_text(), file=sys.stderr)
    return 0


def _select(evaluators, args):
    """The tasks asked for (all by default), with the command-line overrides applied (validated again)."""
    if not evaluators:
        raise ValueError(f"{args.config} has no evaluators: section")
    names = [e.name for e in evaluators]
    if args.task:
        unknown = [t for t in args.task if t not in names]
        if unknown:
            raise ValueError(f"--task {unknown[0]!r} is not an evaluator of {args.config}; have {names}")
        evaluators = [e for e in evaluators if e.name in args.task]
    changes = {}
    if args.shots is not None:
        changes["shots"] = list(args.shots)
    if args.num_samples is not None:
        changes["num_samples"] = args.num_samples
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    if args.greedy:
        changes["greedy"] = True
    return [dataclasses.replace(e, **changes) for e in evaluators]


if __name__ == "__main__":
    sys.exit(main())
