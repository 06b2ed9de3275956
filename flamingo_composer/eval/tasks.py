"""A configured few-shot task: its examples, the prompts and batches of each trial, and the scoring.

Shared by the Composer evaluators (composer_eval.py) and tools/evaluate.py, so both run the same protocol.
A batch is a dict: model inputs (`vision_x`, `image_mask`, `input_ids`, `attention_mask`) plus `fewshot`
(task name, kind, trial, generation settings), `ids` and `references` (what the metric scores against).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from flamingo_composer.eval import prompts
from flamingo_composer.eval.cider import cider_score
from flamingo_composer.eval.config import DEFAULT_MAX_NEW_TOKENS, EvalSplitConfig, EvaluatorConfig
from flamingo_composer.eval.datasets import (
    CaptionExample,
    SkipLog,
    load_coco_captions,
    load_karpathy,
    load_vqav2,
    parse_vqav2,
)
from flamingo_composer.eval.generation import (
    GenerationSettings,
    images_to_vision_x,
    load_image,
    tokenize_prompts,
)
from flamingo_composer.eval.protocol import TrialPlan, plan_trial, rank_batches
from flamingo_composer.eval.vqa_accuracy import vqa_accuracy

log = logging.getLogger(__name__)


def load_split(cfg: EvalSplitConfig, role: str) -> tuple[list, SkipLog]:
    """Examples of one split; `role` ('train' | 'test') picks the default Karpathy / easy-vqa split name."""
    if cfg.format == "karpathy":
        return load_karpathy(cfg.annotations, cfg.images, cfg.split or role)
    if cfg.format == "coco":
        return load_coco_captions(cfg.annotations, cfg.images)
    if cfg.format == "vqav2":
        return load_vqav2(cfg.questions, cfg.annotations, cfg.images, cfg.image_filename)
    from flamingo_composer.eval.easy_vqa import IMAGE_FILENAME, easy_vqa_layout

    split = cfg.split or role
    questions, annotations, images = easy_vqa_layout(split)
    return parse_vqav2(
        questions, annotations, images, image_filename=IMAGE_FILENAME,
        questions_name=f"easy-vqa {split} questions", annotations_name=f"easy-vqa {split} annotations",
    )  # fmt: skip


def score_predictions(
    kind: str, predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]], caption_tokenizer=None
) -> tuple[float, dict]:
    """(score, details): CIDEr x 100 for captioning (details name the tokenizer), VQA accuracy in % for vqa."""
    if kind == "captioning":
        score, tokenizer = cider_score(
            predictions, references, None if caption_tokenizer == "auto" else caption_tokenizer
        )
        return score, {"tokenizer": tokenizer}
    return vqa_accuracy(predictions, references), {}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std over trials (numpy's nanmean / nanstd, as the reference reports)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


class FewShotTask:
    """Examples + protocol of one `EvaluatorConfig`; builds the per-rank batches of a shot count."""

    def __init__(self, cfg: EvaluatorConfig, tokenizer, image_transform):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.train, train_skips = load_split(cfg.train, "train")
        self.test, test_skips = load_split(cfg.test, "test")
        self.skipped = {"train": train_skips.as_dict(), "test": test_skips.as_dict()}
        for role, skips in (("train", train_skips), ("test", test_skips)):
            if skips.total:
                log.warning(
                    "evaluator %s: skipped %d %s records: %s", cfg.name, skips.total, role, skips.counts
                )
        if not self.train or not self.test:
            raise ValueError(
                f"evaluator {cfg.name}: no usable examples ({len(self.train)} train, {len(self.test)} test); "
                f"skipped: {self.skipped}"
            )
        self.settings = GenerationSettings(
            max_new_tokens=cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[cfg.kind],
            min_new_tokens=cfg.min_new_tokens,
            num_beams=cfg.num_beams,
            length_penalty=cfg.length_penalty,
            greedy=cfg.greedy,
        )
        self._image = functools.lru_cache(maxsize=cfg.image_cache_size)(self._load_transformed)
        self._plans: dict[tuple[int, int], TrialPlan] = {}

    # ----------------------------------------------------------------------------------------------- plans

    def plan(self, shot: int, trial: int) -> TrialPlan:
        key = (shot, trial)
        if key not in self._plans:
            self._plans[key] = plan_trial(
                len(self.test), len(self.train), num_shots=shot, seed=self.cfg.trial_seeds[trial],
                num_samples=self.cfg.num_samples, query_set_size=self.cfg.query_set_size,
            )  # fmt: skip
        return self._plans[key]

    def num_queries(self) -> int:
        return self.cfg.num_samples if self.cfg.num_samples > 0 else len(self.test)

    # --------------------------------------------------------------------------------------------- prompts

    def filled_prompt(self, example) -> str:
        if isinstance(example, CaptionExample):
            return prompts.caption_prompt(example.caption.strip())
        return prompts.vqa_prompt(example.question, example.answers[0])

    def open_prompt(self, example) -> str:
        if isinstance(example, CaptionExample):
            return prompts.caption_prompt()
        return prompts.vqa_prompt(example.question)

    def prompt(self, query: int, demos: Sequence[int], shot: int) -> tuple[str, list[str]]:
        """(text, image paths in <image> order) of one query with its demos."""
        demo_examples = [self.train[i] for i in demos]
        query_example = self.test[query]
        text = prompts.few_shot_prompt(
            [self.filled_prompt(d) for d in demo_examples], self.open_prompt(query_example), shot
        )
        paths = prompts.images_for_prompt(
            [d.image_path for d in demo_examples], query_example.image_path, shot
        )
        return text, paths

    def references(self, example) -> tuple[str, ...]:
        return example.references if isinstance(example, CaptionExample) else example.answers

    # --------------------------------------------------------------------------------------------- batches

    def _load_transformed(self, path: str) -> torch.Tensor:
        return self.image_transform(load_image(path))  # (3, H, W)

    def make_batch(self, shot: int, trial: int, positions: Sequence[int]) -> dict[str, Any]:
        """The batch of the plan's queries at `positions` (indices into the trial's query order)."""
        plan = self.plan(shot, trial)
        texts, images, ids, refs = [], [], [], []
        for pos in positions:
            text, paths = self.prompt(plan.queries[pos], plan.demos[pos], shot)
            example = self.test[plan.queries[pos]]
            texts.append(text)
            images.append([self._image(p) for p in paths])
            ids.append(example.id)
            refs.append(self.references(example))
        vision_x, image_mask = images_to_vision_x(images)  # (B, T, 1, 3, H, W), (B, T)
        return {
            "fewshot": {"task": self.cfg.name, "kind": self.cfg.kind, "shot": shot, "trial": trial,
                        "num_trials": self.cfg.num_trials, "caption_tokenizer": self.cfg.caption_tokenizer,
                        "settings": self.settings},
            "ids": ids,
            "references": refs,
            "vision_x": vision_x,
            "image_mask": image_mask,
            **tokenize_prompts(self.tokenizer, texts),
        }  # fmt: skip

    def rank_positions(self, rank: int, world_size: int) -> list[tuple[int, range]]:
        """(trial, positions) of every batch this rank runs for one shot count, all trials in order."""
        per_trial = rank_batches(self.num_queries(), self.cfg.batch_size, rank, world_size)
        return [(trial, positions) for trial in range(self.cfg.num_trials) for positions in per_trial]

    def batches(self, shot: int, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        for trial, positions in self.rank_positions(rank, world_size):
            yield self.make_batch(shot, trial, positions)

    # ------------------------------------------------------------------------------------------------ score

    def score_trials(self, records: Sequence[tuple[int, Any, str, Sequence[str]]]) -> dict[str, Any]:
        """records: (trial, id, prediction, references) from all ranks -> {'trials', 'mean', 'std', ...}."""
        return score_records(self.cfg.kind, records, self.cfg.num_trials, self.cfg.caption_tokenizer)


def score_records(kind: str, records, num_trials: int, caption_tokenizer: str = "auto") -> dict[str, Any]:
    """Per-trial scores of gathered (trial, id, prediction, references) records, their mean and std."""
    trials, details = [], {}
    for trial in range(num_trials):
        rows = sorted((r for r in records if r[0] == trial), key=lambda r: str(r[1]))
        predictions = {r[1]: r[2] for r in rows}
        references = {r[1]: r[3] for r in rows}
        score, details = score_predictions(kind, predictions, references, caption_tokenizer)
        trials.append(score)
    mean, std = mean_std(trials)
    return {
        "trials": trials,
        "mean": mean,
        "std": std,
        "num_queries": len(records) // max(num_trials, 1),
        **details,
    }
