"""A configured few-shot task: its examples, the prompts and batches of each trial, and the scoring.

Shared by the Composer evaluators (composer_eval.py) and flamingo-evaluate, so both run the same protocol.
A batch is a dict: model inputs (`images`, `image_mask`, `input_ids`, `attention_mask`) plus `fewshot`
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
from flamingo_composer.eval.config import EvalSplitConfig, EvaluatorConfig
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
    load_image,
    stack_images,
    tokenize_prompts,
)
from flamingo_composer.eval.protocol import TrialPlan, plan_trial, rank_batches
from flamingo_composer.eval.vqa_accuracy import vqa_accuracy

log = logging.getLogger(__name__)


def load_split(cfg: EvalSplitConfig, role: str, num_class_names: int = 0) -> tuple[list, SkipLog]:
    """Examples of one split; `role` ('train' | 'test') picks the default Karpathy / easy-vqa split name;
    `num_class_names` bounds an ImageFolder tree's class count."""
    if cfg.format in ("vizwiz", "textvqa"):
        from flamingo_composer.eval.native_vqa import load_textvqa, load_vizwiz

        return (load_vizwiz if cfg.format == "vizwiz" else load_textvqa)(cfg.annotations, cfg.images)
    if cfg.format == "hateful_memes":
        from flamingo_composer.eval.class_datasets import load_hateful_memes

        return load_hateful_memes(cfg.annotations, cfg.images)
    if cfg.format == "imagefolder":
        from flamingo_composer.eval.class_datasets import load_image_folder

        return load_image_folder(cfg.images, num_class_names)
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
    """Examples + protocol of one `EvaluatorConfig`; builds the per-rank batches of a shot count.

    `vision_encoder` (the model's frozen tower) serves RICES with `rices.tower: model`; `device` is where RICES
    computes features.
    """

    def __init__(self, cfg: EvaluatorConfig, tokenizer, image_transform, *, vision_encoder=None, device="cpu"):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.vision_encoder, self.device = vision_encoder, device
        self._rices = None
        if cfg.rices is not None and cfg.rices.tower == "model" and vision_encoder is None:
            raise ValueError(f"evaluator {cfg.name}: rices.tower 'model' needs the model's tower (flamingo-evaluate); "
                             "a training evaluator takes tower: open_clip")  # fmt: skip
        self.train, train_skips = load_split(cfg.train, "train", self.num_class_names())
        self.test, test_skips = load_split(cfg.test, "test", self.num_class_names())
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
            max_new_tokens=cfg.generation_length,
            min_new_tokens=cfg.min_new_tokens,
            num_beams=cfg.num_beams,
            length_penalty=cfg.length_penalty,
            greedy=cfg.greedy,
        )
        self._image = functools.lru_cache(maxsize=cfg.image_cache_size)(self._load_transformed)
        self._plans: dict[tuple[int, int], TrialPlan] = {}

    def num_class_names(self) -> int:
        return 0

    @property
    def postprocess_name(self) -> str:
        """How generations are cut before scoring: the kind's, or 'ok_vqa' (stemmed answers)."""
        spec = self.cfg.spec
        return "ok_vqa" if spec is not None and spec.stem_answers else self.cfg.kind

    # ----------------------------------------------------------------------------------------------- plans

    def permutations(self, shot: int) -> int:
        """Prompt orders per query (prompt ensembling; 0 = the demos as drawn)."""
        return 0

    def rices(self):
        """The task's RICES retriever over the train split, built on first use (features cached per its config)."""
        if self._rices is None:
            from flamingo_composer.eval.rices import build_rices

            self._rices = build_rices(self.cfg.rices, [e.image_path for e in self.train], device=self.device,
                                      vision_encoder=self.vision_encoder,
                                      image_transform=self.image_transform)  # fmt: skip
        return self._rices

    def _retrieve(self, queries: list[int], k: int) -> list[list[int]]:
        return self.rices().retrieve([self.test[q].image_path for q in queries], k)

    def plan(self, shot: int, trial: int) -> TrialPlan:
        key = (shot, trial)
        if key not in self._plans:
            self._plans[key] = plan_trial(
                len(self.test), len(self.train), num_shots=shot, seed=self.cfg.trial_seeds[trial],
                num_samples=self.cfg.num_samples, query_set_size=self.cfg.query_set_size,
                permutations=self.permutations(shot), batch_size=self.cfg.batch_size,
                retrieve=self._retrieve if self.cfg.rices is not None else None,
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
        stacked, image_mask = stack_images(images)  # (N, 3, H, W), (B, T)
        return {
            "fewshot": {"task": self.cfg.name, "kind": self.cfg.kind, "shot": shot, "trial": trial,
                        "num_trials": self.cfg.num_trials, "caption_tokenizer": self.cfg.caption_tokenizer,
                        "settings": self.settings, "postprocess": self.postprocess_name},
            "ids": ids,
            "references": refs,
            "images": stacked,
            "image_mask": image_mask,
            **tokenize_prompts(self.tokenizer, texts),
        }  # fmt: skip

    def rank_positions(
        self, rank: int, world_size: int, trials: Sequence[int] | None = None
    ) -> list[tuple[int, range]]:
        """(trial, positions) of every batch this rank runs for one shot count, all trials (or `trials`) in order."""
        per_trial = rank_batches(self.num_queries(), self.cfg.batch_size, rank, world_size)
        trials = range(self.cfg.num_trials) if trials is None else trials
        return [(trial, positions) for trial in trials for positions in per_trial]

    def batches(self, shot: int, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        for trial, positions in self.rank_positions(rank, world_size):
            yield self.make_batch(shot, trial, positions)

    # ------------------------------------------------------------------------------------------------ score

    @property
    def scoring(self) -> dict[str, Any]:
        """What `score_records` needs beyond the kind (classification: the metric and class names)."""
        return {}

    def score_trials(self, records: Sequence[tuple[int, Any, Any, Sequence]]) -> dict[str, Any]:
        """records: (trial, id, prediction, references) from all ranks -> {'trials', 'mean', 'std', ...}."""
        return score_records(self.cfg.kind, records, self.cfg.num_trials, self.cfg.caption_tokenizer,
                             **self.scoring)  # fmt: skip


def build_task(cfg: EvaluatorConfig, tokenizer, image_transform, **kwargs) -> FewShotTask:
    """The task of an evaluator: a `ClassificationTask` for classification benchmarks, else a `FewShotTask`."""
    if cfg.kind == "classification":
        from flamingo_composer.eval.classification_task import ClassificationTask

        return ClassificationTask(cfg, tokenizer, image_transform, **kwargs)
    return FewShotTask(cfg, tokenizer, image_transform, **kwargs)


def score_records(kind: str, records, num_trials: int, caption_tokenizer: str = "auto", *,
                  metric: str | None = None, class_names: Sequence[str] = (),
                  trials: Sequence[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Per-trial scores of gathered (trial, id, prediction, references) records, their mean and std.

    Classification records carry (top-k indices, greater-class probability) as the prediction and (label,) as the
    references, scored by `metric` over `class_names` (class_metrics.py). `trials`: which trial numbers to score
    (default: 0 .. num_trials - 1).
    """
    trial_ids = range(num_trials) if trials is None else trials
    scores, details, per_trial_details = [], {}, []
    for trial in trial_ids:
        rows = sorted((r for r in records if r[0] == trial), key=lambda r: str(r[1]))
        if kind == "classification":
            from flamingo_composer.eval.class_metrics import classification_score

            score, details = classification_score(metric, [r[1:] for r in rows], class_names)
        else:
            predictions = {r[1]: r[2] for r in rows}
            references = {r[1]: r[3] for r in rows}
            score, details = score_predictions(kind, predictions, references, caption_tokenizer)
        scores.append(score)
        per_trial_details.append(details)
    mean, std = mean_std(scores)
    if kind == "classification":  # per-trial extras (top-5) averaged like the score
        details = {key: mean_std([d[key] for d in per_trial_details])[0] for key in details}
    return {
        "trials": scores,
        "mean": mean,
        "std": std,
        "num_queries": len(records) // max(len(trial_ids), 1),
        **details,
    }
