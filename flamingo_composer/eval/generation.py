"""Batched few-shot generation: prompts with their images -> model inputs -> `Flamingo.generate` -> new text.

As the reference's eval model: text tokenised with the tokenizer's defaults, left padding to the longest prompt
(truncation at 2,000 tokens), images through the model's eval transform, stacked (N, 3, H, W) with `image_mask`
(B, T_img) marking each query's slots up to the longest image list; beam search (3 beams, length_penalty 0)
or greedy, stopping at `<|endofchunk|>`; only the new tokens are decoded, special tokens skipped.
`Flamingo.generate` encodes each image once per query (the latents are shared by its beams) and the LM runs
with its KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

MAX_PROMPT_TOKENS = 2000
MODEL_INPUTS = ("images", "image_mask", "input_ids", "attention_mask")  # what a few-shot batch feeds the model


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 3
    length_penalty: float = 0.0
    greedy: bool = False  # one beam, argmax

    def generate_kwargs(self) -> dict:
        beams = 1 if self.greedy else self.num_beams
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "num_beams": beams,
        }
        kwargs["do_sample"] = False
        if beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        return kwargs


def load_image(path: str) -> Image.Image:
    """An RGB image from disk; the error names the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot read image {path}: {exc}") from exc


def stack_images(tensors: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query lists of transformed images (3, H, W) -> the model's images (N, 3, H, W), query by query, and
    image_mask (B, T_max) bool (each query's first len(list) slots)."""
    flat = [t for row in tensors for t in row]
    if not flat:
        raise ValueError("stack_images: the queries hold no image")
    image_mask = torch.zeros(len(tensors), max(len(row) for row in tensors), dtype=torch.bool)  # (B, T_max)
    for b, row in enumerate(tensors):
        image_mask[b, : len(row)] = True
    return torch.stack(flat), image_mask  # (N, 3, H, W), (B, T_max)


def tokenize_prompts(tokenizer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded input_ids (B, L) and attention_mask (B, L); the shared tokenizer's own setting is untouched."""
    enc = tokenizer(
        list(texts),
        padding="longest",
        truncation=True,
        max_length=MAX_PROMPT_TOKENS,
        return_tensors="pt",
        padding_side="left",
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    *,
    images: torch.Tensor,
    image_mask: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
) -> list[str]:
    """Run `model.generate` (our Flamingo) on prepared inputs and decode the new tokens of each row."""
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            images=images,  # (N, 3, H, W)
            image_mask=image_mask,  # (B, T_img)
            input_ids=input_ids,  # (B, L)
            attention_mask=attention_mask,  # (B, L)
            use_cache=True,
            **settings.generate_kwargs(),
        )  # (B, L + new)
    finally:
        model.train(was_training)
    new_tokens = out[:, input_ids.shape[1] :]  # (B, new)
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
