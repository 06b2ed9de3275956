"""An evaluation suite: every configured benchmark at every shot count and trial, resumable, one results table.

A suite file is a recipe (its `model:` and `evaluators:` sections, `base:` files merged) with a `suite:` section:

    base: ../openflamingo-3b.yaml
    suite: {results: eval-results/suite.json, table: eval-results/suite.md, predictions: eval-results/predictions}
    evaluators: [{name: coco, benchmark: coco, train: ..., test: ..., shots: [0, 4, 8, 16, 32], num_trials: 3, ...}]

The unit of work is one (evaluator, shot, trial); each finished unit is written to the results JSON at once
(write, then rename), so a suite stopped at any point and started again with the same results file runs only the
units it lacks. A results file made for another checkpoint is refused. At the end (and after each unit) the JSON
holds per (evaluator, shot) the trials, mean and population std (numpy's nanstd, as the reference), and the
Markdown table has one row per benchmark, one column per shot count, cells `mean ± std`, as the reference's model
cards lay it out.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flamingo_composer.eval.benchmarks import BENCHMARKS

RESULTS_VERSION = 1


@dataclass
class SuiteConfig:
    """The `suite:` section: where the results JSON, the Markdown table and the prediction files go."""

    results: str = "eval-results/suite.json"
    table: str | None = None  # default: the results path with .md
    predictions: str | None = None  # folder for per-unit prediction files; None: not written

    def __post_init__(self) -> None:
        if self.table is None:
            self.table = str(Path(self.results).with_suffix(".md"))


def read_suite(path: str | os.PathLike, overrides: list[str] | None = None):
    """(FlamingoModelConfig, [EvaluatorConfig], SuiteConfig) from a suite file; every data path is checked here,
    before any model is built."""
    from omegaconf import OmegaConf as om

    from flamingo_composer.config_schema import from_dict
    from flamingo_composer.eval.checkpoints import read_recipe
    from flamingo_composer.training.recipe import load_recipe_yaml

    model_cfg, evaluators = read_recipe(path, overrides)
    if not evaluators:
        raise ValueError(f"{path}: the suite has no evaluators")
    names = [e.name for e in evaluators]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: evaluator names must be unique, got {names}")
    raw = load_recipe_yaml(path)
    if overrides:
        raw = om.merge(raw, om.from_dotlist(list(overrides)))
    section = om.to_container(raw, resolve=True).get("suite") or {}
    return model_cfg, evaluators, from_dict(SuiteConfig, section, "suite")


def unit_key(name: str, shot: int, trial: int) -> str:
    return f"{name}/{shot}shot/trial{trial}"


def load_results(path: str | os.PathLike, checkpoint: str) -> dict[str, Any]:
    """The results file so far (empty when absent); refuses one written for another checkpoint."""
    path = Path(path)
    if not path.is_file():
        return {"version": RESULTS_VERSION, "checkpoint": checkpoint, "units": {}, "summary": {}}
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"results file {path} is not valid JSON ({exc}): move it away to start again") from exc
    if not isinstance(results, dict) or not isinstance(results.get("units"), dict):
        raise ValueError(f"results file {path}: not a suite results file (no 'units' object)")
    if results.get("checkpoint") != checkpoint:
        raise ValueError(
            f"results file {path} holds results of checkpoint {results.get('checkpoint')!r}, not {checkpoint!r}: "
            "give another suite.results path"
        )
    return results


def save_json(path: str | os.PathLike, data: Any) -> None:
    """Write then rename, so a kill leaves the previous complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def summarize(evaluators: Sequence, units: dict[str, Any]) -> dict[str, Any]:
    """{evaluator: {shot: {trials, mean, std, complete}}} over the finished units (population std over trials)."""
    summary = {}
    for cfg in evaluators:
        per_shot = {}
        for shot in cfg.shots:
            scores = [units[k]["score"] for t in range(cfg.num_trials) if (k := unit_key(cfg.name, shot, t)) in units]
            finite = [s for s in scores if not math.isnan(s)]
            if not finite:
                continue
            mean = sum(finite) / len(finite)
            std = math.sqrt(sum((s - mean) ** 2 for s in finite) / len(finite))
            per_shot[str(shot)] = {"trials": scores, "mean": mean, "std": std,
                                   "complete": len(scores) == cfg.num_trials}  # fmt: skip
        summary[cfg.name] = {"benchmark": cfg.benchmark, "metric": cfg.metric_name, "shots": per_shot}
    return summary


def row_title(cfg) -> str:
    """The table's row label: the benchmark's title (with the evaluator's name when they differ)."""
    if cfg.benchmark is None:
        return f"{cfg.name} ({cfg.metric_name})"
    title = BENCHMARKS[cfg.benchmark].title
    return title if cfg.name == cfg.benchmark else f"{title} [{cfg.name}]"


def markdown_table(evaluators: Sequence, summary: dict[str, Any]) -> str:
    """Rows in the reference's benchmark order, one column per shot count, `mean ± std` (a trailing * marks a
    cell with trials still missing)."""
    order = {name: i for i, name in enumerate(BENCHMARKS)}
    rows = sorted(evaluators, key=lambda c: (order.get(c.benchmark, len(order)), c.name))
    shots = sorted({shot for cfg in evaluators for shot in cfg.shots})
    lines = ["| Benchmark | " + " | ".join(f"{s}-shot" for s in shots) + " |",
             "|---" * (len(shots) + 1) + "|"]  # fmt: skip
    for cfg in rows:
        cells = []
        for shot in shots:
            entry = summary.get(cfg.name, {}).get("shots", {}).get(str(shot))
            if entry is None:
                cells.append("-")
            else:
                cells.append(f"{entry['mean']:.1f} ± {entry['std']:.1f}" + ("" if entry["complete"] else "*"))
        lines.append(f"| {row_title(cfg)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_suite(evaluators: Sequence, suite: SuiteConfig, *, checkpoint: str, build_model: Callable[[], Any],
              device, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run every unit the results file lacks and return the results (also written, with the table).

    build_model() -> (Flamingo in eval mode on `device`, tokenizer, image transform, checkpoint summary); called
    only when some unit is left to run. Under several ranks every rank runs it; rank 0 writes.
    """
    import torch
    from composer.utils import dist
    from tqdm import tqdm

    from flamingo_composer.eval.runner import predict, write_predictions
    from flamingo_composer.eval.tasks import build_task, score_records

    results = load_results(suite.results, checkpoint)
    units = results["units"]
    todo = [(cfg, shot, trial) for cfg in evaluators for shot in cfg.shots for trial in range(cfg.num_trials)
            if unit_key(cfg.name, shot, trial) not in units]  # fmt: skip
    rank0 = dist.get_global_rank() == 0
    if todo:
        model, tokenizer, transform, loaded = build_model()
        results["loaded"] = loaded
        tasks = {}
        for cfg in evaluators:  # the data of evaluators with work left only
            if any(c is cfg for c, _, _ in todo):
                tasks[cfg.name] = build_task(cfg, tokenizer, transform, vision_encoder=model.vision_encoder,
                                             device=device)  # fmt: skip
                results.setdefault("skipped", {})[cfg.name] = tasks[cfg.name].skipped
        rank, world = dist.get_global_rank(), dist.get_world_size()
        total = sum(len(tasks[c.name].rank_positions(rank, world, [t])) for c, _, t in todo)
        bar = tqdm(total=total, desc=f"suite ({len(units)} units done before)", unit="batch", file=sys.stderr,
                   disable=not (progress and rank0))  # fmt: skip
        with torch.no_grad():
            for cfg, shot, trial in todo:
                task = tasks[cfg.name]
                records, queries, seconds = predict(model, task, shot, device=device, trials=[trial], progress=bar)
                scores = score_records(cfg.kind, records, cfg.num_trials, cfg.caption_tokenizer, trials=[trial],
                                       **task.scoring)  # fmt: skip
                out = Path(suite.predictions) if suite.predictions and rank0 else None
                units[unit_key(cfg.name, shot, trial)] = {
                    "evaluator": cfg.name, "benchmark": cfg.benchmark, "metric": cfg.metric_name, "shot": shot,
                    "trial": trial, "seed": cfg.trial_seeds[trial], "score": scores.pop("trials")[0],
                    "num_queries": scores.pop("num_queries"),
                    "details": {k: v for k, v in scores.items() if k not in ("mean", "std")},
                    "queries_per_s_this_rank": queries / max(seconds, 1e-9),
                    "predictions": write_predictions(task, shot, records, out, trials=[trial]),
                }  # fmt: skip
                if rank0:
                    _write(results, evaluators, suite)
        bar.close()
    if rank0:
        _write(results, evaluators, suite)
    return results


def _write(results: dict[str, Any], evaluators: Sequence, suite: SuiteConfig) -> None:
    results["summary"] = summarize(evaluators, results["units"])
    save_json(suite.results, results)
    Path(suite.table).parent.mkdir(parents=True, exist_ok=True)
    Path(suite.table).write_text(markdown_table(evaluators, results["summary"]))
