"""Registries of names -> constructors (as llm-foundry does) and the builders the entry point calls.

Each YAML component map is `{registered name: kwargs}`; an unknown name or keyword is reported with the
registered choices when the config loads, before anything is built.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from composer.callbacks import LRMonitor, MemoryMonitor, OptimizerMonitor, RuntimeEstimator, SpeedMonitor
from composer.core import Algorithm
from composer.loggers import FileLogger, InMemoryLogger, LoggerDestination, WandBLogger
from composer.optim import (
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    DecoupledAdamW,
    LinearWithWarmupScheduler,
)
from torch import nn

from flamingo_composer.training.callbacks import DataSkipLogger

if TYPE_CHECKING:
    from flamingo_composer.training.config import OptimizerConfig, SchedulerConfig, TrainConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer: two param groups (SPEC 3).


def split_decay_groups(model: nn.Module, decay_gates_and_norms: bool = True) -> tuple[list[str], list[str]]:
    """Names of trainable parameters with and without weight decay.

    Decay: every parameter of the gated cross-attention blocks (their LayerNorms and tanh gates too, as the
    reference does), or without gates and norms when `decay_gates_and_norms` is false. No decay: the other
    trainable parameters (perceiver, new-token rows). Frozen parameters are in neither.
    """
    from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock

    excluded_in_blocks: set[int] = set()
    in_blocks: set[int] = set()
    for block in (m for m in model.modules() if isinstance(m, GatedCrossAttentionBlock)):
        for sub in block.modules():
            for pname, param in sub.named_parameters(recurse=False):
                in_blocks.add(id(param))
                is_norm = isinstance(sub, nn.LayerNorm | nn.RMSNorm | nn.GroupNorm)
                is_gate = sub is block and pname.endswith("_gate")
                if is_norm or is_gate:
                    excluded_in_blocks.add(id(param))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        wants_decay = id(param) in in_blocks and (decay_gates_and_norms or id(param) not in excluded_in_blocks)
        (decay if wants_decay else no_decay).append(name)
    return decay, no_decay


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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


OPTIMIZERS: dict[str, Callable[[list[dict], OptimizerConfig], torch.optim.Optimizer]] = {
    "decoupled_adamw": _decoupled_adamw,
    "adamw": _torch_adamw,
}


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters only, in a decay and a no-decay group."""
    ctor = _lookup(OPTIMIZERS, cfg.name, "optimizer.name")
    decay, no_decay = split_decay_groups(model, cfg.decay_gates_and_norms)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameter")
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in names], "decay": is_decay}
        for names, is_decay in ((decay, True), (no_decay, False))
        if names
    ]
    log.info("optimizer %s: %d tensors with decay, %d without", cfg.name, len(decay), len(no_decay))
    return ctor(groups, cfg)


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


def build_scheduler(cfg: SchedulerConfig):
    return _lookup(SCHEDULERS, cfg.name, "scheduler.name")(cfg.t_warmup, cfg.alpha_f)


# ---------------------------------------------------------------------------------------------------------------
# Algorithms, loggers, callbacks.


def _composer_algorithms() -> dict[str, type[Algorithm]]:
    """Every Algorithm class in `composer.algorithms`, named by its subpackage (as llm-foundry names them)."""
    import composer.algorithms as algorithms

    registry = {}
    for cls in (getattr(algorithms, n) for n in algorithms.__all__):
        if isinstance(cls, type) and issubclass(cls, Algorithm):
            registry[cls.__module__.split(".")[2]] = cls
    return registry


ALGORITHMS: dict[str, Callable[..., Algorithm]] = _composer_algorithms()


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
    return WandBLogger(
        project=project, entity=entity, name=name, group=group, tags=tags, log_artifacts=log_artifacts,
        init_kwargs=init_kwargs or None,
    )


LOGGERS: dict[str, Callable[..., LoggerDestination]] = {
    "wandb": _wandb_logger,
    "file": FileLogger,
    "inmemory": InMemoryLogger,
}

CALLBACKS: dict[str, Callable[..., Any]] = {
    "speed_monitor": SpeedMonitor,
    "lr_monitor": LRMonitor,
    "memory_monitor": MemoryMonitor,
    "runtime_estimator": RuntimeEstimator,
    "optimizer_monitor": OptimizerMonitor,
    "data_skips": DataSkipLogger,
}

COMPONENT_REGISTRIES = {"algorithms": ALGORITHMS, "loggers": LOGGERS, "callbacks": CALLBACKS}


def _lookup(registry: dict[str, Any], name: str, key: str):
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
    _lookup(OPTIMIZERS, cfg.optimizer.name, "optimizer.name")
    _lookup(SCHEDULERS, cfg.scheduler.name, "scheduler.name")
    for section, registry in COMPONENT_REGISTRIES.items():
        for name, kwargs in getattr(cfg, section).items():
            ctor = _lookup(registry, name, f"{section}.{name}")
            check_kwargs(ctor, kwargs or {}, f"{section}.{name}")


def _build_all(section: str, entries: dict[str, dict[str, Any]]) -> list:
    registry = COMPONENT_REGISTRIES[section]
    return [_lookup(registry, name, f"{section}.{name}")(**(kwargs or {})) for name, kwargs in entries.items()]


def build_algorithms(entries: dict[str, dict[str, Any]]) -> list[Algorithm]:
    return _build_all("algorithms", entries)


def build_loggers(entries: dict[str, dict[str, Any]]) -> list[LoggerDestination]:
    return _build_all("loggers", entries)


def build_callbacks(entries: dict[str, dict[str, Any]]) -> list:
    return _build_all("callbacks", entries)
