"""The reference's few-shot prompt strings (open_flamingo/eval/models/open_flamingo.py and evaluate.py, v2.0.1).

A demo is its image token plus the filled prompt and `<|endofchunk|>`; captioning and VQA demos are each followed
by a `\n`, classification demos by nothing (the reference joins them with ""); the query's open prompt follows.
0-shot (as Flamingo) uses 2 text-only demonstrations: the `<image>` tokens are removed from the demo text and no
demo image is passed, only the query's.
"""

from __future__ import annotations

from collections.abc import Sequence

MEDIA = "<image>"
ENDOFCHUNK = "<|endofchunk|>"
DEMO_SEPARATOR = "\n"
CLASSIFICATION_DEMO_SEPARATOR = ""
ZERO_SHOT_TEXT_DEMOS = 2


def caption_prompt(caption: str | None = None) -> str:
    """`<image>Output:{caption}<|endofchunk|>`, or the open `<image>Output:` for the query."""
    if caption is None:
        return f"{MEDIA}Output:"
    return f"{MEDIA}Output:{caption}{ENDOFCHUNK}"


def vqa_prompt(question: str, answer: str | None = None) -> str:
    """`<image>Question:{question} Short answer:{answer}<|endofchunk|>`, or open (no answer) for the query."""
    if answer is None:
        return f"{MEDIA}Question:{question} Short answer:"
    return f"{MEDIA}Question:{question} Short answer:{answer}{ENDOFCHUNK}"


def imagenet_prompt(label: str | None = None) -> str:
    """`<image>Output:{label}<|endofchunk|>`, or the open `<image>Output:` for the query (ImageNet)."""
    return caption_prompt(label)


def hateful_memes_prompt(text: str, label: str | None = None) -> str:
    """The meme's OCR text, then `Is it hateful? Answer:{label}<|endofchunk|>`, or open for the query."""
    prompt = f"{MEDIA}is an image with: '{text}' written on it. Is it hateful? Answer:"
    return prompt if label is None else f"{prompt}{label}{ENDOFCHUNK}"


def effective_num_shots(num_shots: int) -> int:
    """Demos to draw: `num_shots`, or 2 text-only ones for 0-shot (the reference's compute_effective_num_shots)."""
    if num_shots < 0:
        raise ValueError(f"num_shots must be >= 0, got {num_shots}")
    return num_shots if num_shots > 0 else ZERO_SHOT_TEXT_DEMOS


def few_shot_prompt(
    demo_prompts: Sequence[str], query_prompt: str, num_shots: int, separator: str = DEMO_SEPARATOR
) -> str:
    """Demo prompts (each filled, with `<image>`) + query prompt -> the model's text, as the reference builds it.

    With num_shots == 0 the demos are text-only: their `<image>` tokens are removed (the query keeps its own).
    """
    context = "".join(prompt + separator for prompt in demo_prompts)
    if num_shots == 0:
        context = context.replace(MEDIA, "")
    return context + query_prompt


def images_for_prompt(demo_images: Sequence, query_image, num_shots: int) -> list:
    """The images in `<image>` order: the demos' (none for 0-shot) then the query's."""
    return ([] if num_shots == 0 else list(demo_images)) + [query_image]
