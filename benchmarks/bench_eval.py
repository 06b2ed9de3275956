"""Evaluation speed: queries/s for captioning, VQA and classification (1,000 class names, with and without the
prompt's KV cache) on a recipe's model, random weights, synthetic images and few-shot prompts.

    python -m benchmarks.bench_eval --config yamls/bench-cpu.yaml            # the bench-cpu shapes (CPU, fp32)
    python -m benchmarks.bench_eval --config yamls/bench-3b.yaml --device gpu --dtype bf16

Generation runs the reference's settings (beam search 3, 20 new tokens for captions, 5 for VQA, every token
generated: min_new_tokens = max_new_tokens); classification ranks the reference's 1,000 ImageNet class names
(`--classes` fewer) after an ImageNet prompt of `--shots` demos. The uncached path runs prompt + class name for every
(query, class) row, so it is timed on `--uncached-queries` queries. Prints one JSON object: queries/s per task, the
cache's speed-up, and the classification state memory per query batch at the released 3B shapes (MPT-1B: 24
layers, width 2048, vocabulary 50,280, bf16) for this run's prompt length scaled to 32 shots.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="yamls/bench-cpu.yaml", help="recipe whose model: section is built")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=8, help="queries per batch (default %(default)s)")
    parser.add_argument("--shots", type=int, default=4, help="demonstrations per prompt (default %(default)s)")
    parser.add_argument("--batches", type=int, default=2, help="timed batches per generation task")
    parser.add_argument("--caption-tokens", type=int, default=20, help="new tokens per caption (default %(default)s)")
    parser.add_argument("--vqa-tokens", type=int, default=5, help="new tokens per answer (default %(default)s)")
    parser.add_argument("--classes", type=int, default=1000, help="class names ranked (default %(default)s)")
    parser.add_argument("--rows", type=int, default=64, help="(query, class) rows per LM call (default %(default)s)")
    parser.add_argument("--cached-queries", type=int, default=8, help="queries timed on the cached path")
    parser.add_argument("--uncached-queries", type=int, default=1, help="queries timed on the uncached path")
    return parser.parse_args(argv)


def synthetic_inputs(bundle, texts: list[str], images_per_prompt: int, device, dtype):
    """Model inputs for prompts `texts`, each with `images_per_prompt` random images at the tower's size."""
    import torch

    from flamingo_composer.eval.generation import tokenize_prompts
    from flamingo_composer.models.vision import vision_image_size

    height, width = vision_image_size(bundle.model.vision_encoder)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(len(texts) * images_per_prompt, 3, height, width, generator=generator)  # (N, 3, H, W)
    image_mask = torch.ones(len(texts), images_per_prompt, dtype=torch.bool)  # (B, T)
    inputs = {"images": images.to(device, dtype), "image_mask": image_mask.to(device)}
    inputs.update({k: v.to(device) for k, v in tokenize_prompts(bundle.tokenizer, texts).items()})
    return inputs


def demo_words(i: int, n: int) -> str:
    from flamingo_composer.vocab import WORDS

    return " ".join(WORDS[(7 * i + j) % 46] for j in range(n))  # colours, shapes, positions, numbers


def timed(device, fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds), the device synchronised around it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from flamingo_composer.eval import prompts
    from flamingo_composer.eval.checkpoints import read_recipe
    from flamingo_composer.eval.classification import (
        class_log_likelihoods,
        class_token_ids,
        memory_per_query_batch,
    )
    from flamingo_composer.eval.generation import GenerationSettings, generate_text
    from flamingo_composer.eval.imagenet_classnames import IMAGENET_CLASSNAMES
    from flamingo_composer.models.factory import build_flamingo

    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model_cfg, _ = read_recipe(args.config)
    torch.manual_seed(0)
    bundle = build_flamingo(model_cfg)
    model = bundle.model.to(device, dtype).eval()
    b, k = args.batch_size, args.shots
    result = {"config": args.config, "device": str(device), "dtype": args.dtype, "batch_size": b, "shots": k,
              "threads": torch.get_num_threads()}  # fmt: skip

    def few_shot(demo, query, separator=prompts.DEMO_SEPARATOR):
        return [prompts.few_shot_prompt([demo(q * k + i) for i in range(k)], query(q), k, separator) for q in range(b)]

    tasks = {
        "captioning": (few_shot(lambda i: prompts.caption_prompt(demo_words(i, 8)), lambda q: prompts.caption_prompt()),
                       GenerationSettings(max_new_tokens=args.caption_tokens, min_new_tokens=args.caption_tokens)),
        "vqa": (few_shot(lambda i: prompts.vqa_prompt(demo_words(i, 5) + " ?", demo_words(i + 1, 1)),
                         lambda q: prompts.vqa_prompt(demo_words(q, 5) + " ?")),
                GenerationSettings(max_new_tokens=args.vqa_tokens, min_new_tokens=args.vqa_tokens)),
    }  # fmt: skip
    with torch.no_grad():
        for name, (texts, settings) in tasks.items():
            inputs = synthetic_inputs(bundle, texts, k + 1, device, dtype)
            generate_text(model, bundle.tokenizer, **inputs, settings=settings)  # warm-up
            seconds = sum(timed(device, generate_text, model, bundle.tokenizer, **inputs, settings=settings)[1]
                          for _ in range(args.batches))  # fmt: skip
            result[f"{name}_queries_per_s"] = b * args.batches / seconds

        names = list(IMAGENET_CLASSNAMES[: args.classes])
        class_tokens = class_token_ids(bundle.tokenizer, names)
        texts = few_shot(lambda i: prompts.imagenet_prompt(names[(37 * i) % len(names)]),
                         lambda q: prompts.imagenet_prompt(),
                         separator=prompts.CLASSIFICATION_DEMO_SEPARATOR)  # fmt: skip
        for cached, queries in ((True, args.cached_queries), (False, args.uncached_queries)):
            inputs = synthetic_inputs(bundle, texts[:queries], k + 1, device, dtype)
            scores, seconds = timed(device, class_log_likelihoods, model, **inputs, class_tokens=class_tokens,
                                    use_cache=cached, rows=args.rows)  # fmt: skip
            result[f"classification_{'cached' if cached else 'uncached'}_queries_per_s"] = queries / seconds
            result.setdefault("_scores", []).append(scores[: min(queries, args.uncached_queries)])
        low, high = result.pop("_scores")
        result["cached_equals_uncached_max_abs_diff"] = float((low - high).abs().max())
        result["classification_cache_speedup"] = (
            result["classification_cached_queries_per_s"] / result["classification_uncached_queries_per_s"]
        )
    prompt_tokens = int(inputs["input_ids"].shape[1])
    longest_class = max(len(t) for t in class_tokens)
    scaled = round((prompt_tokens - 3) * 32 / max(k, 1)) + 3  # this prompt's demo length, 32 demos
    result["classification_prompt_tokens"] = prompt_tokens
    result["memory_per_query_batch_3b_bf16_bytes"] = memory_per_query_batch(
        queries=b, prompt_tokens=scaled, class_tokens=longest_class, rows=args.rows, layers=24, kv_width=2048,
        vocab=50280, bytes_per_value=2,
    )  # fmt: skip
    result["memory_per_query_batch_3b_bf16_assumes"] = {"queries": b, "prompt_tokens (32 shots)": scaled,
                                                        "class_tokens": longest_class, "rows": args.rows}  # fmt: skip
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
