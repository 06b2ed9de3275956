"""Read a run's logged metrics back: Composer's FileLogger text log or a W&B offline run folder.

Both give `{metric name: [(step, value), ...]}` in logging order (step = optimizer steps, Composer's batch count),
for flamingo-plot and the tests. A file log written over several processes of one run (restarts) holds one
segment per process (`file_logger.AppendingFileLogger`); read back, it is the one run's history.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

__all__ = ["find_run_log", "read_file_log", "read_run_metrics", "read_wandb_offline", "segment_prefix"]

Metrics = dict[str, list[tuple[int, float]]]

# FileLogger.log_metrics writes `[metric][batch={step}]: {name}: {value} `
_METRIC_LINE = re.compile(r"^\[metric\]\[batch=(?P<step>\d+)\]: (?P<name>.+?): (?P<value>\S+)\s*$")
# AppendingFileLogger writes this once the checkpoint is loaded: the batch the process continues from.
_SEGMENT_LINE = re.compile(r"^\[segment\]\[batch=(?P<step>\d+)\]: ")


def segment_prefix(batch: int) -> str:
    """The start of the line that opens a process's segment of the file log (the batch it continues from)."""
    return f"[segment][batch={batch}]: "


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_file_log(path: str | Path) -> Metrics:
    """Every `[metric]` line of a Composer FileLogger log; lines that are not numeric metrics are ignored.

    A segment that continues the run from batch N supersedes what earlier segments logged after N (a killed
    process logged past its last checkpoint) and, metric by metric, at N itself: losses of batch N are logged
    at step N by the process that runs it, while end-of-batch metrics at step N (learning rate, throughput,
    evaluations) were logged before checkpoint N was saved and stay.
    """
    metrics: dict[str, list[tuple[int, float, int]]] = defaultdict(list)  # (step, value, segment)
    segment, start = 0, 0
    with Path(path).open(errors="replace") as lines:
        for line in lines:
            if opened := _SEGMENT_LINE.match(line):
                segment, start = segment + 1, int(opened.group("step"))
                for points in metrics.values():
                    points[:] = [p for p in points if p[0] <= start]
                continue
            match = _METRIC_LINE.match(line)
            if match and (value := _number(match.group("value"))) is not None:
                step, points = int(match.group("step")), metrics[match.group("name")]
                if step == start and segment:
                    points[:] = [p for p in points if p[0] != start or p[2] == segment]
                points.append((step, value, segment))
    return {name: [(step, value) for step, value, _ in points] for name, points in metrics.items() if points}


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
