"""Read a run's logged metrics back: Composer's FileLogger text log or a W&B offline run folder.

Both give `{metric name: [(step, value), ...]}` in logging order (step = optimizer steps, Composer's batch count),
for tools/plot_run.py and the tests.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

__all__ = ["find_run_log", "read_file_log", "read_run_metrics", "read_wandb_offline"]

Metrics = dict[str, list[tuple[int, float]]]

# FileLogger.log_metrics writes `[metric][batch={step}]: {name}: {value} `
_METRIC_LINE = re.compile(r"^\[metric\]\[batch=(?P<step>\d+)\]: (?P<name>.+?): (?P<value>\S+)\s*$")


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_file_log(path: str | Path) -> Metrics:
    """Every `[metric]` line of a Composer FileLogger log; lines that are not numeric metrics are ignored."""
    metrics: Metrics = defaultdict(list)
    with Path(path).open(errors="replace") as lines:
        for line in lines:
            match = _METRIC_LINE.match(line)
            if match and (value := _number(match.group("value"))) is not None:
                metrics[match.group("name")].append((int(match.group("step")), value))
    return dict(metrics)


def read_wandb_offline(run_folder: str | Path) -> Metrics:
    """The history of a W&B offline run folder (`offline-run-*/run-*.wandb`), keyed by metric, stepped by `_step`."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    files = sorted(Path(run_folder).glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{run_folder}: expected one run-*.wandb file, found {len(files)}")
    if files[0].stat().st_size == 0:
        raise ValueError(
            f"{files[0]}: the run file is empty: W&B is still writing it (read it after the run's process exits, "
            "or after wandb.teardown())"
        )
    store = datastore.DataStore()
    store.open_for_scan(str(files[0]))
    metrics: Metrics = defaultdict(list)
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = row.get("_step")
        for name, raw in row.items():
            if not name.startswith("_") and step is not None and (value := _number(raw)) is not None:
                metrics[name].append((int(step), value))
    return dict(metrics)


def find_run_log(run_dir: str | Path, prefer: str = "file") -> tuple[str, Path]:
    """('file' | 'wandb', path) of the metrics of the run in `run_dir`.

    `run_dir` may be a W&B offline run folder itself, or a run folder holding a FileLogger log (rank 0's, e.g.
    `logs-rank0.txt`) and/or a `wandb/offline-run-*` folder (the newest is used). `prefer` picks when both exist.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if any(run_dir.glob("run-*.wandb")):
        return "wandb", run_dir
    file_logs = [p for p in sorted(run_dir.rglob("*.txt")) if "wandb" not in p.parts and _is_file_log(p)]
    file_logs.sort(key=lambda p: (not re.search(r"rank0\b", p.name), len(p.parts)))
    wandb_runs = sorted(run_dir.glob("**/offline-run-*"), key=lambda p: p.name)
    found = {"file": file_logs[0] if file_logs else None, "wandb": wandb_runs[-1] if wandb_runs else None}
    for kind in (prefer, "wandb" if prefer == "file" else "file"):
        if found[kind] is not None:
            return kind, found[kind]
    raise FileNotFoundError(
        f"{run_dir}: no Composer file log (a .txt with [metric] lines, e.g. logs-rank0.txt) and no W&B offline "
        "run folder (wandb/offline-run-*) found"
    )


def _is_file_log(path: Path) -> bool:
    with path.open(errors="replace") as lines:
        return any(_METRIC_LINE.match(line) for _, line in zip(range(10_000), lines))


def read_run_metrics(run_dir: str | Path, prefer: str = "file") -> tuple[Metrics, str]:
    """(metrics, description of the source) of the run in `run_dir` (see `find_run_log`)."""
    kind, path = find_run_log(run_dir, prefer)
    metrics = read_file_log(path) if kind == "file" else read_wandb_offline(path)
    return metrics, f"{kind} log {path}"
