"""Few-shot tasks as Composer `Evaluator`s: one per (task, shot count), run at `eval_interval` beside the
held-out loss, logging metrics/eval/<name>_<k>shot/<Metric> (mean over trials) and .../<Metric>_std.

- `FewShotLoader`: the per-rank batches of one (task, shot) for all trials (re-iterable; the same queries and
  demos at every evaluation, so the numbers are comparable across training).
- `FewShotComposerModel`: the training ComposerModel plus a generation branch: a batch carrying `fewshot`
  goes through `Flamingo.generate` (beam search / greedy, KV cache, images encoded once) instead of the loss
  forward, and its post-processed text feeds the few-shot metrics.
- `FewShotScore`: collects (trial, id, prediction, references) on each rank; `compute` gathers them, rank 0
  scores every trial, and the result is broadcast, so every rank returns the identical number.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from composer.core import DataSpec, Evaluator
from composer.utils import dist
from torchmetrics import Metric

from flamingo_composer.eval.benchmarks import METRIC_NAMES_ALL
from flamingo_composer.eval.config import EvaluatorConfig
from flamingo_composer.eval.generation import generate_text
from flamingo_composer.eval.postprocess import postprocess
from flamingo_composer.eval.tasks import FewShotTask, build_task, score_records
from flamingo_composer.training.composer_model import FlamingoComposerModel

STD_SUFFIX = "_std"


class FewShotScore(Metric):
    """Mean (`stat='mean'`) or std (`stat='std'`) over trials of a task's CIDEr / VQA accuracy.

    Generic: the task's kind, trial count and caption tokenizer arrive with its batches (`batch['fewshot']`), so
    one registered metric serves every evaluator (Composer deep-copies it per evaluator).
    """

    full_state_update = False

    def __init__(self, stat: str = "mean"):
        super().__init__(dist_sync_on_step=False)
        if stat not in ("mean", "std"):
            raise ValueError(f"stat must be 'mean' or 'std', got {stat!r}")
        self.stat = stat
        self.records: list[tuple[int, Any, str, tuple[str, ...]]] = []
        self.task_info: dict[str, Any] | None = None
        self.last_result: dict[str, Any] | None = None

    def update(self, batch: Mapping[str, Any], predictions: Sequence[str]) -> None:
        info = batch["fewshot"]
        self.task_info = {k: info[k] for k in ("task", "kind", "num_trials", "caption_tokenizer")}
        self.task_info["scoring"] = info.get("scoring", {})  # classification: metric and class names
        for qid, pred, refs in zip(batch["ids"], predictions, batch["references"], strict=True):
            self.records.append((int(info["trial"]), qid, pred, tuple(refs)))

    def reset(self) -> None:
        super().reset()
        self.records = []

    def compute(self) -> torch.Tensor:
        world = dist.get_world_size()
        gathered = dist.all_gather_object(self.records) if world > 1 else [self.records]
        records = [r for part in gathered for r in part]
        result = None
        if dist.get_global_rank() == 0:
            info = self.task_info
            if info is None or not records:
                raise RuntimeError("FewShotScore.compute: no few-shot predictions were recorded on rank 0")
            result = score_records(info["kind"], records, info["num_trials"], info["caption_tokenizer"],
                                   **info["scoring"])  # fmt: skip
            result["task"] = info["task"]
        if world > 1:
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        self.last_result = result
        return torch.tensor(result[self.stat], dtype=torch.float64)


def fewshot_metrics() -> dict[str, Metric]:
    """{'CIDEr', 'CIDEr_std', 'VQAAccuracy', ..., 'ROC_AUC_std'}; an evaluator selects its metric's pair."""
    metrics = {}
    for name in METRIC_NAMES_ALL:
        metrics[name] = FewShotScore("mean")
        metrics[name + STD_SUFFIX] = FewShotScore("std")
    return metrics


class FewShotLoader:
    """Re-iterable per-rank batches of one task at one shot count (all trials, in order)."""

    def __init__(self, task: FewShotTask, shot: int):
        self.task, self.shot = task, shot
        self.batch_size = task.cfg.batch_size

    def _positions(self):
        return self.task.rank_positions(dist.get_global_rank(), dist.get_world_size())

    def __len__(self) -> int:
        return len(self._positions())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for trial, positions in self._positions():
            yield self.task.make_batch(self.shot, trial, positions)


def _num_queries(batch: Mapping[str, Any]) -> int:
    return len(batch["ids"])


def fewshot_dataspec(loader: FewShotLoader) -> DataSpec:
    """A DataSpec that never splits a few-shot batch (generation batches are already the eval batch size)."""
    return DataSpec(loader, split_batch=lambda batch, _size: [batch], get_num_samples_in_batch=_num_queries)


def build_fewshot_evaluators(
    configs: Sequence[EvaluatorConfig], tokenizer, image_transform
) -> list[Evaluator]:
    """One Evaluator per (task, shot), labelled eval/<name>_<k>shot, with its kind's metric pair."""
    evaluators = []
    for cfg in configs:
        task = build_task(cfg, tokenizer, image_transform)  # reads and checks the data now, before training
        for shot in cfg.shots:
            evaluators.append(
                Evaluator(
                    label=cfg.label(shot),
                    dataloader=fewshot_dataspec(FewShotLoader(task, shot)),
                    metric_names=[f"^{cfg.metric_name}"],  # regex: the mean and its _std
                    device_eval_microbatch_size=cfg.batch_size,
                )
            )
    return evaluators


class FewShotComposerModel(FlamingoComposerModel):
    """FlamingoComposerModel whose eval also runs few-shot generation batches (see the module docstring)."""

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(model, **kwargs)
        self.tokenizer = tokenizer

    @staticmethod
    def is_fewshot(batch: Any) -> bool:
        return isinstance(batch, Mapping) and "fewshot" in batch

    def eval_forward(self, batch: Mapping[str, Any], outputs: Any | None = None) -> Any:
        if not self.is_fewshot(batch):
            return super().eval_forward(batch, outputs)
        info = batch["fewshot"]
        if info["kind"] == "classification":
            from flamingo_composer.eval.classification_task import classify_batch

            return classify_batch(self.model, batch)[0]
        texts = generate_text(
            self.model, self.tokenizer, images=batch["images"], image_mask=batch["image_mask"],
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], settings=info["settings"],
        )  # fmt: skip
        return [postprocess(info.get("postprocess", info["kind"]), t) for t in texts]

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        metrics = super().get_metrics(is_train)
        if not is_train:
            metrics.update(fewshot_metrics())
        return metrics

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        if isinstance(metric, FewShotScore) or self.is_fewshot(batch):
            if isinstance(metric, FewShotScore) and self.is_fewshot(batch):
                metric.update(batch, outputs)
            return  # a few-shot metric never sees a loss batch, nor a loss metric a generation batch
        super().update_metric(batch, outputs, metric)
