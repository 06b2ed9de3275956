"""Hyper-parameter sweeps: a base recipe plus a grid -> one validated, concrete YAML per point, then run them.

    flamingo-sweep yamls/sweeps/NAME.yaml [--run | --print | --slurm FILE] [--only 0,3] [--nproc N]

The sweep file:

    recipe: ../run.yaml                  # the base recipe (relative to this file; its own `base:` files work too)
    name: lr-xattn                       # optional; default: the file's stem
    out: runs/sweeps/lr-xattn            # optional; default: runs/sweeps/<name> (relative to the working directory)
    overrides: [max_duration=200ba]      # optional dotted.key=value settings for every point
    grid:                                # dotted keys of the recipe -> the values to try (the product is swept)
      optimizer.lr: [1.0e-3, 5.0e-3]
      data.laion.loss_multiplier: [0.2, 1.0]
      model.cross_attn_every_n_layers: [1, 2]

Every point gets the run name `<name>-<index>` and keeps everything it writes under `<out>/<run name>/`
(checkpoints, file log, console output; its W&B run is named after it, grouped by the sweep), with autoresume on.
Every point is validated (the training config's own checks) before anything runs: one invalid point stops the
sweep with its error. The concrete YAMLs go to `<out>/points/`, an index to `<out>/sweep.json`.

Modes (default --run):
  --run    run the points one after another here (`composer [-n N] train.py POINT.yaml`), going on past a failed
           point, and print a table at the end (exit 1 if any failed). A point that finished is marked
           (`<out>/<run name>/.finished`) and skipped when the sweep is started again; an interrupted one resumes
           from its latest checkpoint (autoresume).
  --print  print the `composer` commands instead.
  --slurm  write a Slurm array script (one array task per point, same skip / resume behaviour) instead.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout whose train.py the points run (an editable install)
FINISHED_MARKER = ".finished"


@dataclass
class SweepConfig:
    """The sweep file (validated by the training config's validator: unknown keys and wrong types are named)."""

    recipe: str
    grid: dict[str, list[Any]]
    name: str | None = None
    out: str | None = None
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.grid:
            raise ValueError("grid: needs at least one key with a list of values")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid: {key!r} has no values")
        bad = [o for o in self.overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides: {bad[0]!r} is not of the form dotted.key=value")


@dataclass
class Point:
    index: int
    run_name: str
    params: dict[str, Any]  # grid key -> value
    yaml: Path  # the concrete YAML
    run_dir: Path  # everything the point writes

    @property
    def finished(self) -> bool:
        return (self.run_dir / FINISHED_MARKER).exists()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML (yamls/sweeps/NAME.yaml)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run the points here, one after another (default)")
    mode.add_argument("--print", dest="print_only", action="store_true", help="print the composer commands")
    mode.add_argument("--slurm", metavar="FILE", help="write a Slurm array script to FILE")
    parser.add_argument("--only", help="comma-separated point indices to run / print / submit (default: all)")
    parser.add_argument("--nproc", type=int, help="processes per point (composer -n); default: composer's own")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------- expand


def read_sweep(path: str | Path) -> SweepConfig:
    from omegaconf import OmegaConf

    from flamingo_composer.config_schema import from_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    sweep = from_dict(SweepConfig, raw, "sweep")
    sweep.recipe = str((path.parent / sweep.recipe).resolve())
    sweep.name = sweep.name or path.stem
    sweep.out = sweep.out or f"runs/sweeps/{sweep.name}"
    return sweep


def _point_settings(sweep: SweepConfig, base: dict, run_name: str, run_dir: Path) -> dict[str, Any]:
    """What makes a point's run its own: name, folders, logger names, autoresume."""
    settings: dict[str, Any] = {
        "run_name": run_name,
        "save_folder": str(run_dir / "checkpoints"),
        "autoresume": True,
    }
    loggers = base.get("loggers") or {}
    if "file" in loggers:
        settings["loggers.file.filename"] = str(run_dir / "logs-rank{rank}.txt")
    if "wandb" in loggers:
        settings["loggers.wandb.name"] = run_name
        settings["loggers.wandb.group"] = sweep.name
    return settings


def expand(sweep: SweepConfig) -> list[tuple[Point, dict]]:
    """Every grid point as (Point, its concrete resolved config); ConfigError naming the point if one is invalid."""
    from omegaconf import OmegaConf

    from flamingo_composer.config_schema import ConfigError
    from flamingo_composer.training.config import config_from_dict
    from flamingo_composer.training.recipe import load_recipe_yaml

    base = load_recipe_yaml(sweep.recipe)
    if sweep.overrides:
        base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(sweep.overrides)))
    keys = list(sweep.grid)
    out = Path(sweep.out)
    points = []
    for index, values in enumerate(itertools.product(*(sweep.grid[k] for k in keys))):
        params = dict(zip(keys, values))
        run_name = f"{sweep.name}-{index:02d}"
        run_dir = (out / run_name).resolve()
        cfg = base.copy()
        plain_base = OmegaConf.to_container(base, resolve=False)
        for key, value in {**params, **_point_settings(sweep, plain_base, run_name, run_dir)}.items():
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        where = f"sweep point {index} ({', '.join(f'{k}={v!r}' for k, v in params.items())})"
        try:
            resolved = OmegaConf.to_container(cfg, resolve=True)
            config_from_dict(resolved)  # every check the training entry point makes, before anything runs
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        except Exception as exc:  # omegaconf interpolation errors
            raise ConfigError(f"{where}: {exc}") from exc
        points.append(
            (Point(index, run_name, params, (out / "points" / f"{run_name}.yaml").resolve(), run_dir), resolved)
        )
    return points


def write_points(sweep: SweepConfig, points: list[tuple[Point, dict]]) -> None:
    """The concrete YAMLs and `<out>/sweep.json` (index -> run name, grid values, YAML)."""
    from omegaconf import OmegaConf

    for point, resolved in points:
        point.yaml.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"# sweep {sweep.name}, point {point.index}: {json.dumps(point.params)} (generated by flamingo-sweep)\n"
        )
        point.yaml.write_text(header + OmegaConf.to_yaml(OmegaConf.create(resolved)))
    index = {
        "name": sweep.name,
        "recipe": sweep.recipe,
        "grid": sweep.grid,
        "points": [
            {
                "index": p.index,
                "run_name": p.run_name,
                "params": p.params,
                "yaml": str(p.yaml),
                "run_dir": str(p.run_dir),
            }
            for p, _ in points
        ],
    }
    (Path(sweep.out) / "sweep.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------- run


def composer_command(point: Point, nproc: int | None, launcher: list[str] | None = None) -> list[str]:
    launcher = launcher or ["composer"]
    return [*launcher, *(["-n", str(nproc)] if nproc else []), str(REPO_ROOT / "train.py"), str(point.yaml)]


def local_command(point: Point, nproc: int | None) -> list[str]:
    """The command that runs `point` here: one process is `python train.py` (what `composer -n 1` runs, without
    the launcher process), more go through this environment's Composer launcher."""
    if nproc == 1:
        return [sys.executable, str(REPO_ROOT / "train.py"), str(point.yaml)]
    return composer_command(point, nproc, [sys.executable, "-m", "composer.cli.launcher"])


def _default_nproc(nproc: int | None) -> int | None:
    if nproc is not None:
        return nproc
    import torch

    return None if torch.cuda.is_available() else 1  # composer's default (the GPU count) is 0 without GPUs


def run_points(points: list[Point], nproc: int | None) -> list[tuple[Point, str, float]]:
    """Run each point (skipping finished ones); returns (point, status, seconds). Never stops at a failure."""
    results = []
    nproc = _default_nproc(nproc)
    for point in points:
        if point.finished:
            print(f"[{point.index}] {point.run_name}: finished before, skipped", flush=True)
            results.append((point, "skipped (finished)", 0.0))
            continue
        point.run_dir.mkdir(parents=True, exist_ok=True)
        console = point.run_dir / "console.log"
        command = local_command(point, nproc)
        print(f"[{point.index}] {point.run_name} {json.dumps(point.params)}: running, output in {console}", flush=True)
        start = time.monotonic()
        with console.open("a") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        seconds = time.monotonic() - start
        if done.returncode == 0:
            (point.run_dir / FINISHED_MARKER).write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            results.append((point, "finished", seconds))
        else:
            reason = failure_reason(console.read_text(errors="replace"))
            results.append((point, f"FAILED (exit {done.returncode}): {reason[:160]}", seconds))
        print(f"[{point.index}] {point.run_name}: {results[-1][1]} ({seconds:.0f} s)", flush=True)
    return results


def failure_reason(console_text: str) -> str:
    """The last exception line of a point's console output (rank prefixes dropped), else its last line."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in console_text.strip().splitlines()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return (errors or lines or [""])[-1]


def print_table(results: list[tuple[Point, str, float]]) -> None:
    print("\nsweep summary:")
    for point, status, seconds in results:
        print(f"  {point.index:>3}  {point.run_name:<28} {json.dumps(point.params):<50} {status} ({seconds:.0f} s)")
    failed = [p for p, status, _ in results if status.startswith("FAILED")]
    if failed:
        print(
            f"{len(failed)} point(s) failed; their output: " + ", ".join(str(p.run_dir / "console.log") for p in failed)
        )


def slurm_script(sweep: SweepConfig, points: list[Point], nproc: int | None) -> str:
    """A Slurm array script: task i runs point i unless it is marked finished, and marks it when it succeeds."""
    yamls = " ".join(shlex.quote(str(p.yaml)) for p in points)
    dirs = " ".join(shlex.quote(str(p.run_dir)) for p in points)
    n = f"-n {nproc} " if nproc else ""
    out = Path(sweep.out).resolve()
    return f"""#!/bin/bash
# Sweep {sweep.name}: {len(points)} points (flamingo-sweep). Submit with: sbatch {out}/slurm.sh
# Add your cluster's settings (--partition, --nodes, --gpus-per-node, --time) below.
#SBATCH --job-name={sweep.name}
#SBATCH --array=0-{len(points) - 1}
#SBATCH --output={out}/slurm-%A_%a.out
set -euo pipefail
POINTS=({yamls})
RUN_DIRS=({dirs})
POINT=${{POINTS[$SLURM_ARRAY_TASK_ID]}}
RUN_DIR=${{RUN_DIRS[$SLURM_ARRAY_TASK_ID]}}
if [ -e "$RUN_DIR/{FINISHED_MARKER}" ]; then echo "$POINT finished before: skipped"; exit 0; fi
mkdir -p "$RUN_DIR"
cd {shlex.quote(str(REPO_ROOT))}
composer {n}train.py "$POINT"   # autoresume: a requeued task continues from its latest checkpoint
date > "$RUN_DIR/{FINISHED_MARKER}"
"""


def _select(points: list[tuple[Point, dict]], only: str | None) -> list[tuple[Point, dict]]:
    if only is None:
        return points
    try:
        wanted = [int(i) for i in only.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"--only: expected comma-separated point indices, got {only!r}") from None
    bad = [i for i in wanted if not 0 <= i < len(points)]
    if bad:
        raise ValueError(f"--only: no point {bad[0]} (the sweep has points 0..{len(points) - 1})")
    return [points[i] for i in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flamingo_composer.config_schema import ConfigError

    try:
        sweep = read_sweep(args.sweep)
        points = expand(sweep)
        selected = [point for point, _ in _select(points, args.only)]
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        print(f"error: {args.sweep}: {exc}" if not isinstance(exc, ConfigError) else f"error: {exc}", file=sys.stderr)
        return 2
    write_points(sweep, points)
    print(f"sweep {sweep.name}: {len(points)} point(s), YAMLs in {Path(sweep.out) / 'points'}")
    if args.print_only:
        for point in selected:
            print(shlex.join(composer_command(point, args.nproc)))
        return 0
    if args.slurm:
        path = Path(args.slurm)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(slurm_script(sweep, selected, args.nproc))
        path.chmod(0o755)
        print(f"wrote {path}: sbatch {path}")
        return 0
    results = run_points(selected, args.nproc)
    print_table(results)
    return 1 if any(status.startswith("FAILED") for _, status, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
