"""Generate text for images and a prompt with a trained model.

    flamingo-generate --config yamls/eval-easyvqa.yaml --checkpoint CKPT --image a.jpg \\
        --prompt "<image>Question:what color is the shape? Short answer:"
    flamingo-generate --config RECIPE --checkpoint checkpoint.pt --image a.jpg --image b.jpg \\
        --prompt "<image>Output:a cat.<|endofchunk|>\\n<image>Output:"

One `<image>` in the prompt per --image, in order. Beam search with 3 beams and length_penalty 0, stopping at
`<|endofchunk|>` (the evaluation's settings); --greedy for one beam. Prints the generated text.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="recipe YAML (its model: section is used)")
    parser.add_argument(
        "--checkpoint", required=True, help="our Composer checkpoint or a released checkpoint.pt"
    )
    parser.add_argument(
        "--image", action="append", required=True, help="image file (repeatable, prompt order)"
    )
    parser.add_argument("--prompt", required=True, help='text with one "<image>" per image')
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--device", choices=["cpu", "gpu"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompt = args.prompt.replace("\\n", "\n")
    if prompt.count("<image>") != len(args.image):
        print(f"error: the prompt has {prompt.count('<image>')} <image> tokens for {len(args.image)} --image",
              file=sys.stderr)  # fmt: skip
        return 2
    from composer.utils import get_device

    from flamingo_composer.eval.checkpoints import load_checkpoint, read_recipe
    from flamingo_composer.eval.generation import (
        GenerationSettings,
        generate_text,
        load_image,
        stack_images,
        tokenize_prompts,
    )
    from flamingo_composer.models.factory import build_flamingo

    model_cfg, _ = read_recipe(args.config)
    bundle = build_flamingo(model_cfg)
    load_checkpoint(bundle.model, args.checkpoint)
    device = get_device(args.device)._device
    model = bundle.model.to(device).eval()
    try:
        images = [bundle.image_transform(load_image(path)) for path in args.image]
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stacked, image_mask = stack_images([images])  # (T, 3, H, W), (1, T)
    tokens = tokenize_prompts(bundle.tokenizer, [prompt])
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, greedy=args.greedy
    )
    text = generate_text(
        model, bundle.tokenizer, images=stacked.to(device), image_mask=image_mask.to(device),
        input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device), settings=settings,
    )[0]  # fmt: skip
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
