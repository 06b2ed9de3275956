"""A configured classification benchmark (ImageNet, HatefulMemes): the few-shot protocol of `FewShotTask` with
class-name ranking instead of generation.

Prompts as the reference's evaluate_classification: demos `<image>Output:{class name}<|endofchunk|>` (ImageNet) or
the HatefulMemes question with the meme's text, joined with no separator, then the query's open prompt; 0-shot uses
two text-only demos. One deliberate difference: at 0-shot only the query's image is passed (the reference also
passes the two text-only demos' images, so its single `<image>` token attends to the first demo's image).
With `prompt_ensembling` each query is scored under P = min(6, k!) demo orders drawn as the reference draws them
(protocol.py) and the class log-likelihoods are averaged.

A batch: `fewshot` (task, kind 'classification', shot, trial, `scoring`), `ids`, `references` [(label,)] and
`prompts`: one dict of model inputs per demo order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flamingo_composer.eval import prompts
from flamingo_composer.eval.class_datasets import ClassExample, read_class_names
from flamingo_composer.eval.class_metrics import summarize
from flamingo_composer.eval.classification import class_log_likelihoods, class_token_ids
from flamingo_composer.eval.generation import MODEL_INPUTS, stack_images, tokenize_prompts
from flamingo_composer.eval.protocol import ensemble_size
from flamingo_composer.eval.tasks import FewShotTask


class ClassificationTask(FewShotTask):
    def __init__(self, cfg, tokenizer, image_transform, **kwargs):
        spec = cfg.spec
        self.class_names = read_class_names(cfg.class_names) if cfg.class_names else tuple(spec.class_names)
        self.top_k = spec.top_k
        super().__init__(cfg, tokenizer, image_transform, **kwargs)
        self.class_tokens = class_token_ids(tokenizer, self.class_names)

    def num_class_names(self) -> int:
        return len(self.class_names)

    def permutations(self, shot: int) -> int:
        return ensemble_size(shot) if self.cfg.prompt_ensembling else 0

    @property
    def scoring(self) -> dict[str, Any]:
        return {"metric": self.cfg.metric_name, "class_names": self.class_names}

    # --------------------------------------------------------------------------------------------- prompts

    def _prompt(self, example: ClassExample, label: int | None) -> str:
        name = None if label is None else self.class_names[label]
        if self.cfg.benchmark == "hateful_memes":
            return prompts.hateful_memes_prompt(example.text, name)
        return prompts.imagenet_prompt(name)

    def prompt(self, query: int, demos: Sequence[int], shot: int) -> tuple[str, list[str]]:
        demo_examples = [self.train[i] for i in demos]
        query_example = self.test[query]
        text = prompts.few_shot_prompt(
            [self._prompt(d, d.label) for d in demo_examples], self._prompt(query_example, None), shot,
            separator=prompts.CLASSIFICATION_DEMO_SEPARATOR,
        )  # fmt: skip
        paths = prompts.images_for_prompt([d.image_path for d in demo_examples], query_example.image_path, shot)
        return text, paths

    def references(self, example) -> tuple[int, ...]:
        return (example.label,)

    # --------------------------------------------------------------------------------------------- batches

    def make_batch(self, shot: int, trial: int, positions: Sequence[int]) -> dict[str, Any]:
        plan = self.plan(shot, trial)
        orders = [plan.orders[pos] for pos in positions] if plan.orders else [[plan.demos[pos]] for pos in positions]
        inputs = []
        for p in range(len(orders[0])):
            texts, images = [], []
            for pos, query_orders in zip(positions, orders):
                text, paths = self.prompt(plan.queries[pos], query_orders[p], shot)
                texts.append(text)
                images.append([self._image(path) for path in paths])
            stacked, image_mask = stack_images(images)  # (N, 3, H, W), (B, T)
            inputs.append({"images": stacked, "image_mask": image_mask, **tokenize_prompts(self.tokenizer, texts)})
        examples = [self.test[plan.queries[pos]] for pos in positions]
        return {
            "fewshot": {"task": self.cfg.name, "kind": "classification", "shot": shot, "trial": trial,
                        "num_trials": self.cfg.num_trials, "caption_tokenizer": self.cfg.caption_tokenizer,
                        "scoring": self.scoring, "top_k": self.top_k, "kv_cache": self.cfg.kv_cache,
                        "rows": self.cfg.class_batch_rows, "class_tokens": self.class_tokens},
            "ids": [e.id for e in examples],
            "references": [self.references(e) for e in examples],
            "prompts": inputs,
        }  # fmt: skip


def classify_batch(model, batch: dict[str, Any], device=None) -> tuple[list, torch.Tensor]:
    """(per query (top-k indices, greater-class probability), the (B, C) log-likelihoods averaged over the
    prompt orders) for one classification batch; `model` is our Flamingo."""
    info = batch["fewshot"]
    per_order = []
    for inputs in batch["prompts"]:
        if device is not None:
            inputs = {k: inputs[k].to(device) for k in MODEL_INPUTS}
        per_order.append(class_log_likelihoods(
            model, **{k: inputs[k] for k in MODEL_INPUTS}, class_tokens=info["class_tokens"],
            use_cache=info["kv_cache"], rows=info["rows"],
        ))  # fmt: skip
    logprobs = torch.stack(per_order, dim=-1).mean(dim=-1)  # (B, C): the reference's ensemble mean
    return summarize(logprobs, info["scoring"]["class_names"], info["top_k"]), logprobs
