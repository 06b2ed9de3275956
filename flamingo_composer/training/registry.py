"""Registries of names -> constructors (as llm-foundry does), and their validation.

A leaf of the training package: the config (training/config.py, which validates registry names and keyword
arguments when a YAML loads) and the builders (training/builders.py, which construct the components) both import
it, and it imports neither. Each YAML component map is `{registered name: kwargs}`; an unknown name or keyword
is reported with the registered choices.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from composer.callbacks import LRMonitor, MemoryMonitor, OptimizerMonitor, RuntimeEstimator, SpeedMonitor
from composer.core import Algorithm
from composer.loggers import InMemoryLogger, LoggerDestination, WandBLogger
from composer.optim import (
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    DecoupledAdamW,
    LinearWithWarmupScheduler,
)

from flamingo_composer.training.algorithms import SUPPORTED, check_algorithm
from flamingo_composer.training.callbacks import DataSkipLogger
from flamingo_composer.training.file_logger import AppendingFileLogger
from flamingo_composer.training.monitors import LossSpikeMonitor, NonFiniteMonitor, XAttnGateLogger

if TYPE_CHECKING:
    from flamingo_composer.training.config import OptimizerConfig, TrainConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Optimizers: called with the (decay, no-decay) param groups the builder makes (SPEC 3).


def _decoupled_adamw(groups: list[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # Composer's decay is not scaled by lr: torch-AdamW decay wd at lr == decoupled lr * wd.
    decoupled = cfg.lr * cfg.weight_decay
    log.info(
        "weight decay %.3g (torch-AdamW convention, as the reference) -> DecoupledAdamW weight_decay %.3g (lr * wd)",
        cfg.weight_decay,
        decoupled,
    )
    for group in groups:
        group["weight_decay"] = decoupled if group.pop("decay") else 0.0
    return DecoupledAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=decoupled)


def _torch_adamw(groups: list[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    for group in groups:
        group["weight_decay"] = cfg.weight_decay if group.pop("decay") else 0.0
    fused = None if cfg.fused is False else True  # None: torch picks foreach or the loop
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused)  # fmt: skip


OPTIMIZERS: dict[str, Callable[[list[dict], OptimizerConfig], torch.optim.Optimizer]] = {
    "decoupled_adamw": _decoupled_adamw,
    "adamw": _torch_adamw,
}


# ---------------------------------------------------------------------------------------------------------------
# Schedulers (lengths in batches = optimizer steps).


def _constant(t_warmup: str, alpha_f: float | None):
    return ConstantWithWarmupScheduler(t_warmup=t_warmup)


def _linear(t_warmup: str, alpha_f: float | None):
    return LinearWithWarmupScheduler(t_warmup=t_warmup, alpha_f=0.0 if alpha_f is None else alpha_f)


def _cosine(t_warmup: str, alpha_f: float | None):
    return CosineAnnealingWithWarmupScheduler(t_warmup=t_warmup, alpha_f=0.0 if alpha_f is None else alpha_f)


SCHEDULERS: dict[str, Callable] = {
    "constant_with_warmup": _constant,
    "linear_decay_with_warmup": _linear,
    "cosine_with_warmup": _cosine,
}


# ---------------------------------------------------------------------------------------------------------------
# Algorithms, loggers, callbacks.


# The supported ones of the allowlist (training/algorithms.py); the others are refused there, with a reason.
ALGORITHMS: dict[str, Callable[..., Algorithm]] = {name: entry.build for name, entry in SUPPORTED.items()}


class RunWandBLogger(WandBLogger):
    """Composer's WandBLogger, whose checkpoint download says "not here" unless the run uploads checkpoints.

    With `autoresume`, Composer asks every logger for the latest checkpoint before W&B is initialised; the stock
    logger then raises ("get_file_artifact can only be called after running init()"), so a fresh autoresumed
    run with W&B, as every released recipe is, died at start-up. Without `log_artifacts` no checkpoint is ever in
    W&B, so the answer is FileNotFoundError, which Composer treats as "look elsewhere".
    """

    def download_file(self, remote_file_name: str, destination: str, overwrite: bool = False,
                      progress_bar: bool = True):  # fmt: skip
        if not self._log_artifacts:
            raise FileNotFoundError(f"{remote_file_name}: this run does not store checkpoints in W&B")
        return super().download_file(remote_file_name, destination, overwrite, progress_bar)


def _wandb_logger(
    project: str | None = None,
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    offline: bool = False,
    dir: str | None = None,  # noqa: A002  (wandb's own name for the run-files folder)
    log_artifacts: bool = False,
) -> WandBLogger:
    """WandBLogger; `offline: true` records the run locally (wandb mode 'offline'), for later `wandb sync`."""
    init_kwargs: dict[str, Any] = {}
    if offline:
        init_kwargs["mode"] = "offline"
    if dir is not None:
        init_kwargs["dir"] = dir
    return RunWandBLogger(
        project=project, entity=entity, name=name, group=group, tags=tags, log_artifacts=log_artifacts,
        init_kwargs=init_kwargs or None,
    )


LOGGERS: dict[str, Callable[..., LoggerDestination]] = {
    "wandb": _wandb_logger,
    "file": AppendingFileLogger,  # appends across restarts of the run
    "inmemory": InMemoryLogger,
}

CALLBACKS: dict[str, Callable[..., Any]] = {
    "speed_monitor": SpeedMonitor,
    "lr_monitor": LRMonitor,
    "memory_monitor": MemoryMonitor,
    "runtime_estimator": RuntimeEstimator,
    "optimizer_monitor": OptimizerMonitor,
    "data_skips": DataSkipLogger,
    "nan_monitor": NonFiniteMonitor,
    "loss_spike": LossSpikeMonitor,
    "xattn_gates": XAttnGateLogger,
}

COMPONENT_REGISTRIES = {"algorithms": ALGORITHMS, "loggers": LOGGERS, "callbacks": CALLBACKS}


def lookup(registry: dict[str, Any], name: str, key: str):
    if name not in registry:
        raise ValueError(f"{key}: unknown name {name!r}; registered: {sorted(registry)}")
    return registry[name]


def check_kwargs(ctor: Callable, kwargs: dict[str, Any], key: str) -> None:
    """Raise ValueError naming `key.<kwarg>` when `kwargs` do not fit `ctor`'s signature."""
    if kwargs is None:
        return
    signature = inspect.signature(ctor)
    params = signature.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            raise ValueError(f"unknown key '{key}.{unknown[0]}'; accepted: {accepted}")
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{key}: {exc}") from exc


def validate_components(cfg: TrainConfig) -> None:
    """Names and keyword arguments of every registry-built component (called when the config loads)."""
    lookup(OPTIMIZERS, cfg.optimizer.name, "optimizer.name")
    lookup(SCHEDULERS, cfg.scheduler.name, "scheduler.name")
    for name, kwargs in cfg.algorithms.items():  # refused ones with their reason; the algorithm's own checks
        check_algorithm(name, kwargs, cfg.fsdp_config)
    for section in ("loggers", "callbacks"):
        for name, kwargs in getattr(cfg, section).items():
            ctor = lookup(COMPONENT_REGISTRIES[section], name, f"{section}.{name}")
            check_kwargs(ctor, kwargs or {}, f"{section}.{name}")
