"""Standalone evaluation of configured tasks (flamingo-evaluate, the suite): this rank's batches through the model
(generation, or class-name ranking), gather, one score per trial on rank 0, prediction files in each benchmark's
results format, throughput."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from composer.utils import dist

from flamingo_composer.eval.generation import MODEL_INPUTS, generate_text
from flamingo_composer.eval.postprocess import postprocess
from flamingo_composer.eval.tasks import FewShotTask, score_records


def results_file_rows(kind: str, predictions: list[tuple[Any, Any, Any]], class_names=()) -> list[dict[str, Any]]:
    """(id, prediction, references) -> COCO caption results [{'image_id', 'caption'}], VQA results
    [{'question_id', 'answer'}], or the reference's classification rows [{'id', 'gt_label', 'pred_label',
    'pred_score'}] (pred_score: the greater class's probability)."""
    if kind == "captioning":
        return [{"image_id": qid, "caption": text} for qid, text, _ in predictions]
    if kind == "classification":
        return [{"id": qid, "gt_label": class_names[refs[0]], "pred_label": class_names[pred[0][0]],
                 "pred_score": pred[1]} for qid, pred, refs in predictions]  # fmt: skip
    return [{"question_id": qid, "answer": text} for qid, text, _ in predictions]


def predict(model, task: FewShotTask, shot: int, *, device, trials: Sequence[int] | None = None, progress=None):
    """(records from all ranks, queries run on this rank, seconds in the model) for one shot count.

    records: (trial, id, prediction, references); the prediction is post-processed text, or for classification
    (top-k class indices, greater-class probability).
    """
    from flamingo_composer.eval.classification_task import classify_batch

    rank, world = dist.get_global_rank(), dist.get_world_size()
    records, queries, seconds = [], 0, 0.0
    for trial, positions in task.rank_positions(rank, world, trials):
        batch = task.make_batch(shot, trial, positions)
        start = time.perf_counter()
        if task.cfg.kind == "classification":
            outputs, _ = classify_batch(model, batch, device)
        else:
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS}
            texts = generate_text(model, task.tokenizer, **inputs, settings=task.settings)
            outputs = [postprocess(task.postprocess_name, t) for t in texts]
        seconds += time.perf_counter() - start
        queries += len(outputs)
        for qid, output, refs in zip(batch["ids"], outputs, batch["references"], strict=True):
            records.append((trial, qid, output, tuple(refs)))
        if progress is not None:
            progress.update(1)
    gathered = dist.all_gather_object(records) if world > 1 else [records]
    return [r for part in gathered for r in part], queries, seconds


def evaluate_task(model, task: FewShotTask, shots: list[int], *, device, out_dir: Path | None, progress=None):
    """{'shots': {k: {'trials', 'mean', 'std'}}, ...} for one task; writes predictions on rank 0."""
    result: dict[str, Any] = {"kind": task.cfg.kind, "metric": task.cfg.metric_name, "shots": {}}
    queries, seconds = 0, 0.0
    for shot in shots:
        records, ran, took = predict(model, task, shot, device=device, progress=progress)
        queries, seconds = queries + ran, seconds + took
        if dist.get_global_rank() == 0:
            scores = score_records(task.cfg.kind, records, task.cfg.num_trials, task.cfg.caption_tokenizer,
                                   **task.scoring)  # fmt: skip
            if "tokenizer" in scores:
                result["tokenizer"] = scores.pop("tokenizer")
            scores["predictions"] = write_predictions(task, shot, records, out_dir)
            result["shots"][str(shot)] = scores
    result["skipped"] = task.skipped
    result["generation"] = {"seconds": seconds, "queries_this_rank": queries}
    return result


def write_predictions(task: FewShotTask, shot: int, records, out_dir: Path | None,
                      trials: Sequence[int] | None = None) -> list[str]:  # fmt: skip
    """One results file per trial under out_dir (none when out_dir is None); returns their paths."""
    if out_dir is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    class_names = task.scoring.get("class_names", ())
    for trial in range(task.cfg.num_trials) if trials is None else trials:
        rows = [r[1:] for r in records if r[0] == trial]
        path = out_dir / f"{task.cfg.name}_{shot}shot_trial{trial}_predictions.json"
        path.write_text(json.dumps(results_file_rows(task.cfg.kind, rows, class_names), indent=1))
        files.append(str(path))
    return files
