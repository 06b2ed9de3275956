"""Standalone evaluation of configured tasks (tools/evaluate.py): generation over this rank's batches, gather,
one score per trial on rank 0, prediction files in each benchmark's results format, throughput."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from composer.utils import dist

from flamingo_composer.eval.generation import generate_text
from flamingo_composer.eval.postprocess import postprocess
from flamingo_composer.eval.tasks import FewShotTask, score_records

MODEL_INPUTS = ("vision_x", "image_mask", "input_ids", "attention_mask")


def results_file_rows(kind: str, predictions: list[tuple[Any, str]]) -> list[dict[str, Any]]:
    """COCO caption results [{'image_id', 'caption'}] or VQA results [{'question_id', 'answer'}]."""
    if kind == "captioning":
        return [{"image_id": qid, "caption": text} for qid, text in predictions]
    return [{"question_id": qid, "answer": text} for qid, text in predictions]


def evaluate_task(model, task: FewShotTask, shots: list[int], *, device, out_dir: Path | None, progress=None):
    """{'shots': {k: {'trials', 'mean', 'std'}}, ...} for one task; writes predictions on rank 0."""
    rank, world = dist.get_global_rank(), dist.get_world_size()
    result: dict[str, Any] = {"kind": task.cfg.kind, "metric": task.cfg.metric_name, "shots": {}}
    queries, seconds = 0, 0.0
    for shot in shots:
        records = []
        for batch in task.batches(shot, rank, world):
            start = time.perf_counter()
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS}
            texts = generate_text(model, task.tokenizer, **inputs, settings=task.settings)
            seconds += time.perf_counter() - start
            queries += len(texts)
            trial = batch["fewshot"]["trial"]
            for qid, text, refs in zip(batch["ids"], texts, batch["references"], strict=True):
                records.append((trial, qid, postprocess(task.cfg.kind, text), tuple(refs)))
            if progress is not None:
                progress.update(1)
        gathered = dist.all_gather_object(records) if world > 1 else [records]
        records = [r for part in gathered for r in part]
        if rank == 0:
            scores = score_records(task.cfg.kind, records, task.cfg.num_trials, task.cfg.caption_tokenizer)
            if "tokenizer" in scores:
                result["tokenizer"] = scores.pop("tokenizer")
            scores["predictions"] = _write_predictions(task, shot, records, out_dir)
            result["shots"][str(shot)] = scores
    result["skipped"] = task.skipped
    result["generation"] = {"seconds": seconds, "queries_this_rank": queries}
    return result


def _write_predictions(task: FewShotTask, shot: int, records, out_dir: Path | None) -> list[str]:
    if out_dir is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for trial in range(task.cfg.num_trials):
        rows = [(r[1], r[2]) for r in records if r[0] == trial]
        path = out_dir / f"{task.cfg.name}_{shot}shot_trial{trial}_predictions.json"
        path.write_text(json.dumps(results_file_rows(task.cfg.kind, rows), indent=1))
        files.append(str(path))
    return files
