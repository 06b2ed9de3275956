"""The few lines a person wants after a run: where the checkpoint and the log are, the losses, what to do next."""

from __future__ import annotations

import shlex
from pathlib import Path

from composer import Trainer
from composer.utils import format_name_with_dist

from flamingo_composer.training.config import TrainConfig

__all__ = ["run_summary"]


def _latest_checkpoint(cfg: TrainConfig, run_name: str) -> str | None:
    """The run's newest checkpoint (what `latest-rank0.pt` points to), or its save folder when remote / sharded."""
    if not cfg.save_folder:
        return None
    folder = format_name_with_dist(cfg.save_folder, run_name)
    if "://" in folder:
        return folder
    latest = Path(folder) / "latest-rank0.pt"
    if latest.exists():
        return str(latest.resolve()) if latest.is_symlink() else str(latest)
    sharded = Path(folder) / "latest-sharded-rank0"
    return str(sharded.resolve()) if sharded.exists() else None


def _file_log(cfg: TrainConfig, run_name: str) -> str | None:
    file_logger = cfg.loggers.get("file")
    if file_logger is None:
        return None
    return format_name_with_dist(file_logger.get("filename", "{run_name}/logs-rank{rank}.txt"), run_name)


def _fmt(values: dict[str, float], names: dict[str, str]) -> str:
    return ", ".join(f"{label} {float(values[key]):.4g}" for key, label in names.items() if key in values)


def _ema_callbacks(state) -> list:
    from flamingo_composer.training.ema import FlamingoEMA

    return [c for c in state.callbacks if isinstance(c, FlamingoEMA)]


def run_summary(trainer: Trainer, cfg: TrainConfig, recipe: str) -> str:
    """Summary of a finished `train_from_config` run (rank 0 prints it); `recipe` = the YAML it was started with."""
    state = trainer.state
    run_name = state.run_name
    lines = [f"run {run_name}: {int(state.timestamp.batch)} optimizer steps"]
    datasets = list(cfg.data)
    losses = {k: float(v) for k, v in (state.total_loss_dict or {}).items()}
    if losses:
        names = {"loss/train/total": "total", **{f"loss/train/{name}": name for name in datasets}}
        lines.append(f"  train loss (last step): {_fmt(losses, names)}")
    held_out = {k: float(v) for k, v in state.eval_metric_values.items()}
    if held_out:
        names = {}
        for name in datasets:
            names.update({f"{name}/LanguageCrossEntropy": f"{name} cross-entropy", f"{name}/TokenAccuracy": "accuracy"})
        shown = _fmt(held_out, names)
        others = {k: v for k, v in held_out.items() if k not in names}
        weights = ", EMA weights" if any(getattr(c, "started", False) for c in _ema_callbacks(state)) else ""
        lines.append(f"  held-out (last evaluation{weights}): {shown}"
                     + (f"; {_fmt(others, {k: k for k in others})}" if others else ""))  # fmt: skip
    checkpoint, log = _latest_checkpoint(cfg, run_name), _file_log(cfg, run_name)
    lines.append(f"  checkpoint: {checkpoint or 'none saved (save_folder is null)'}")
    if log:
        lines.append(f"  log:        {log}")
        lines.append(f"  plot:       flamingo-plot {shlex.quote(str(Path(log).parent))}")
    if checkpoint and "://" not in checkpoint:
        lines.append(
            f"  export:     flamingo-export {shlex.quote(checkpoint)} --config "
            f"{shlex.quote(recipe)} --out checkpoint.pt   (released OpenFlamingo format)"
        )
    if cfg.autoresume:
        lines.append("  the same command continues this run from its latest checkpoint (autoresume)")
    if not cfg.log_to_console:
        lines.append("  Composer's full metric dumps: add log_to_console=true (every console_log_interval)")
    return "\n".join(lines)
