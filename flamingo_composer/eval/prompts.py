"""The reference's few-shot prompt strings (open_flamingo/eval/models/open_flamingo.py and evaluate.py, v2.0.1).

A demo is its image token plus the filled prompt and `<|endofchunk|>`; demos are joined by a `\n` after each one;
the query's open prompt follows. 0-shot (as Flamingo) uses 2 text-only demonstrations: the `<image>` tokens are
removed from the demo text and no demo image is passed, only the query's.
"""

from __future__ import annotations

from collections.abc import Sequence

MEDIA = "<image>"
ENDOFCHUNK = "<|endofchunk|>"
DEMO_SEPARATOR = "\n"
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


def effective_num_shots(num_shots: int) -> int:
    """Demos to draw: `num_shots`, or 2 text-only ones for 0-shot (the reference's compute_effective_num_shots)."""
    if num_shots < 0:
        raise ValueError(f"num_shots must be >= 0, got {num_shots}")
    return num_shots if num_shots > 0 else ZERO_SHOT_TEXT_DEMOS


def few_shot_prompt(demo_prompts: Sequence[str], query_prompt: str, num_shots: int) -> str:
    """Demo prompts (each filled, with `<image>`) + query prompt -> the model's text, as the reference builds it.

    With num_shots == 0 the demos are text-only: their `<image>` tokens are removed (the query keeps its own).
    """
    context = "".join(prompt + DEMO_SEPARATOR for prompt in demo_prompts)
    if num_shots == 0:
        context = context.replace(MEDIA, "")
    return context + query_prompt


def images_for_prompt(demo_images: Sequence, query_image, num_shots: int) -> list:
    """The images in `<image>` order: the demos' (none for 0-shot) then the query's."""
    return ([] if num_shots == 0 else list(demo_images)) + [query_image]
