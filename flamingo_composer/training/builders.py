"""The builders the entry point calls: optimizer (with its param groups), scheduler, algorithms, loggers, callbacks.

Names resolve through the registries of training/registry.py (validated when the config loads).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination
from torch import nn

from flamingo_composer.training.algorithms import check_algorithm
from flamingo_composer.training.registry import COMPONENT_REGISTRIES, OPTIMIZERS, SCHEDULERS, lookup

if TYPE_CHECKING:
    from flamingo_composer.training.config import OptimizerConfig, SchedulerConfig

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


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters only, in a decay and a no-decay group."""
    ctor = lookup(OPTIMIZERS, cfg.name, "optimizer.name")
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


def build_scheduler(cfg: SchedulerConfig):
    return lookup(SCHEDULERS, cfg.name, "scheduler.name")(cfg.t_warmup, cfg.alpha_f)


# ---------------------------------------------------------------------------------------------------------------
# Algorithms, loggers, callbacks.


def _build_all(section: str, entries: dict[str, dict[str, Any]]) -> list:
    registry = COMPONENT_REGISTRIES[section]
    return [lookup(registry, name, f"{section}.{name}")(**(kwargs or {})) for name, kwargs in entries.items()]


def build_algorithms(entries: dict[str, dict[str, Any]]) -> list[Algorithm | Callback]:
    """The allowlist's algorithms (training/algorithms.py); a refused or unknown name raises with its reason.
    Some run as Callbacks (`ema`): the Trainer takes those among its callbacks (`split_algorithms`)."""
    return [check_algorithm(name, kwargs) for name, kwargs in entries.items()]


def split_algorithms(built: list[Algorithm | Callback]) -> tuple[list[Algorithm], list[Callback]]:
    """(the Trainer's `algorithms`, the algorithms that go among its `callbacks`)."""
    return [a for a in built if isinstance(a, Algorithm)], [c for c in built if not isinstance(c, Algorithm)]


def build_loggers(entries: dict[str, dict[str, Any]]) -> list[LoggerDestination]:
    return _build_all("loggers", entries)


def build_callbacks(entries: dict[str, dict[str, Any]]) -> list:
    return _build_all("callbacks", entries)
