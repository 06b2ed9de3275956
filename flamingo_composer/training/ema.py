"""An exponential moving average of the trainable weights: the `ema` algorithm of the allowlist.

Why not Composer 0.32.1's EMA: it averages every buffer in float and copies it back (the integer buffer
`new_token_ids` drifts, and a tied head then writes the new tokens' logits into other vocabulary columns), it
swaps the averaged weights into the model for checkpoints (so the model state of a checkpoint is not the trained
one), and its copies of FSDP2 shards do not survive a sharded resume (a shape error on rank 1).

This one:
- averages the trainable floating-point parameters only, never a buffer or a frozen weight: the copy is
  trainable-sized (under FSDP2 each rank holds its own shards' copy, DTensors like the parameters);
- never touches the training weights except to swap the average in for evaluation (EVAL_START) and back
  (EVAL_END), by exact copies: training is bit for bit that of a run without it;
- is checkpointed beside the raw weights (`state.callbacks['FlamingoEMA']['ema']`: {name: tensor}): DTensors
  in sharded checkpoints, which torch.distributed.checkpoint reshards on load (N -> M ranks, as the model's
  own), full tensors in monolithic ones. flamingo-evaluate and flamingo-export read it (`--weights`).

It is configured as the algorithm `ema` (training/algorithms.py) but runs as a Callback: Composer 0.32.1 writes
the algorithms' state into a sharded checkpoint as one pickled list, rank 0's (so every rank would load rank 0's
shards), while the callbacks' state is a dict whose tensors torch.distributed.checkpoint saves per rank and
reshards.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._common_utils import clean_tensor_name
from torch.distributed.tensor import DTensor, distribute_tensor

log = logging.getLogger(__name__)

__all__ = ["EMA_STATE_NAME", "WEIGHT_CHOICES", "FlamingoEMA", "checkpoint_weights", "ema_weights_of"]

EMA_STATE_NAME = "FlamingoEMA"  # how a checkpoint's `state.callbacks` names this callback's entry


def _batches(value: str | None, key: str, minimum: int) -> int | None:
    if value is None:
        return None
    try:
        time = Time.from_timestring(str(value))
    except ValueError as exc:
        raise ValueError(f"{key}: {value!r} is not a length such as '100ba'") from exc
    if time.unit != TimeUnit.BATCH:
        raise ValueError(f"{key}: {value!r} must be counted in batches (optimizer steps), e.g. '100ba'")
    if time.value < minimum:
        raise ValueError(f"{key}: must be at least {minimum}ba, got {value!r}")
    return int(time.value)


def _unwrapped(state: State) -> torch.nn.Module:
    """The ComposerModel (DDP wraps it after loading)."""
    model = state.model
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself under no_grad, so in-place ops reach the DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class FlamingoEMA(Callback):
    """`ema_t = s * ema_{t-1} + (1 - s) * w_t` every `update_interval` optimizer steps from `ema_start` on, with
    `s = 2 ** (-update_interval / half_life)` (or `smoothing` given directly); held-out and few-shot evaluation
    run on the average once it has started. Lengths in batches ('100ba'), as Composer's EMA takes them."""

    def __init__(self, half_life: str | None = "1000ba", smoothing: float | None = None,
                 update_interval: str | None = None, ema_start: str = "0ba"):  # fmt: skip
        if (half_life is None) == (smoothing is None):
            raise ValueError("give exactly one of half_life (e.g. '1000ba') or smoothing (a float in (0, 1))")
        self.half_life = _batches(half_life, "half_life", 1)
        self.update_interval = _batches(update_interval or "1ba", "update_interval", 1)
        self.ema_start = _batches(ema_start, "ema_start", 0)
        if smoothing is not None and not 0.0 < smoothing < 1.0:
            raise ValueError(f"smoothing: must be in (0, 1), got {smoothing}")
        self.smoothing = smoothing if smoothing is not None else 2.0 ** (-self.update_interval / self.half_life)
        self.started = False
        self.updates = 0
        self._ema: dict[str, torch.Tensor] = {}  # canonical parameter name -> its average (DTensor under FSDP2)
        self._sharded = False  # the checkpoint is torch.distributed.checkpoint's sharded one
        self._active = False  # the average is in the model (between EVAL_START and EVAL_END)

    def __repr__(self) -> str:
        return (f"FlamingoEMA(smoothing={self.smoothing:.6g}, update_interval={self.update_interval}ba, "
                f"ema_start={self.ema_start}ba)")  # fmt: skip

    # ---------------------------------------------------------------------------------------------------------

    def _trainable(self, state: State) -> dict[str, torch.nn.Parameter]:
        return {
            clean_tensor_name(name): param
            for name, param in _unwrapped(state).named_parameters()
            if param.requires_grad and param.is_floating_point()
        }

    def before_load(self, state: State, logger: Logger) -> None:
        """The model is wrapped (FSDP2: sharded) and no checkpoint is loaded yet: the copies a load fills."""
        self._sharded = bool(state.fsdp_sharded_state_dict_enabled)
        with torch.no_grad():
            self._ema = {name: p.detach().clone() for name, p in self._trainable(state).items()}
        logger.log_hyperparameters({"ema": repr(self), "eval_weights": "ema (once started)"})

    def batch_end(self, state: State, logger: Logger) -> None:
        self._update(state)

    def eval_start(self, state: State, logger: Logger) -> None:
        self._swap_in(state, logger)

    def eval_end(self, state: State, logger: Logger) -> None:
        if self._active:
            self._swap(state)
            self._active = False

    @torch.no_grad()
    def _update(self, state: State) -> None:
        step = int(state.timestamp.batch)
        if step < self.ema_start or step % self.update_interval:
            return
        params = self._trainable(state)
        ema = [_local(self._ema[name]) for name in params]
        weights = [_local(p.detach()) for p in params.values()]
        if self.started:
            torch._foreach_lerp_(ema, weights, 1.0 - self.smoothing)
        else:  # the average starts at the weights of its first update
            torch._foreach_copy_(ema, weights)
            self.started = True
        self.updates += 1

    def _swap_in(self, state: State, logger: Logger) -> None:
        if not self.started:
            logger.log_metrics({"eval/on_ema_weights": 0.0})
            if dist.get_global_rank() == 0:
                log.info("evaluation on the raw weights: the EMA starts at batch %d", self.ema_start)
            return
        if not self._active:
            self._swap(state)
            self._active = True
        logger.log_metrics({"eval/on_ema_weights": 1.0})
        if dist.get_global_rank() == 0:
            log.info("evaluation on the EMA weights (%s, %d updates)", repr(self), self.updates)

    @torch.no_grad()
    def _swap(self, state: State) -> None:
        """Exchange the weights and their average in place, one tensor-sized temporary at a time (exact).

        Under FSDP2 every unit is resharded first: an evaluation forward leaves the root unit gathered (torch 2.7
        reshards it only after a backward), and its gathered copy would go on serving the swapped-out weights.
        """
        for module in _unwrapped(state).modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        for name, param in self._trainable(state).items():
            weights, average = _local(param.detach()), _local(self._ema[name])
            held = weights.clone()
            weights.copy_(average)
            average.copy_(held)

    # ---------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The average beside the model's raw weights: DTensors for a sharded checkpoint (resharded on load),
        full tensors for a monolithic one (gathered: called on every rank while saving)."""
        if self._active:
            raise RuntimeError("FlamingoEMA: a checkpoint was asked for during evaluation, with the average swapped in")
        if self._sharded:
            ema = dict(self._ema)
        else:
            ema = {
                name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu() for name, t in self._ema.items()
            }
        return {"repr": repr(self), "started": self.started, "updates": self.updates, "ema": ema}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        self.started, self.updates = bool(state["started"]), int(state["updates"])
        saved = state["ema"]
        unknown = sorted(set(saved) - set(self._ema))
        if unknown:
            raise KeyError(f"FlamingoEMA: the checkpoint averages parameters this model has not: {unknown[:5]}")
        missing = sorted(set(self._ema) - set(saved))
        if missing:
            log.warning("FlamingoEMA: the checkpoint has no average of %s; they start from the weights", missing[:5])
        for name, tensor in saved.items():
            mine = self._ema[name]
            if tensor is mine:  # a sharded load filled our own tensors in place
                continue
            if isinstance(mine, DTensor) and not isinstance(tensor, DTensor):  # a full tensor: this rank's shard
                tensor = distribute_tensor(
                    tensor.to(mine.device), mine.device_mesh, mine.placements, src_data_rank=None
                )
            mine.copy_(tensor)


def ema_weights_of(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """A monolithic checkpoint's averaged weights under the ComposerModel's names (`model.perceiver...`), or None
    when it holds no average (the run had no `ema`, or it had not started)."""
    entry = ((checkpoint.get("state") or {}).get("callbacks") or {}).get(EMA_STATE_NAME)
    return dict(entry["ema"]) if isinstance(entry, dict) and entry.get("started") else None


WEIGHT_CHOICES = ("auto", "ema", "raw")  # the tools' --weights: auto = the average when the checkpoint holds one


def checkpoint_weights(checkpoint: dict[str, Any], which: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """(the model weights of a monolithic checkpoint under the ComposerModel's names, 'ema' or 'raw').

    `which`: 'raw' = the trained weights (`state.model`); 'ema' = those with the average of every averaged
    parameter in place (ValueError when the checkpoint holds none); 'auto' = 'ema' when it holds one, else 'raw'.
    """
    if which not in WEIGHT_CHOICES:
        raise ValueError(f"weights: must be one of {list(WEIGHT_CHOICES)}, got {which!r}")
    weights = dict(checkpoint["state"]["model"])
    ema = ema_weights_of(checkpoint) if which != "raw" else None
    if ema is None:
        if which == "ema":
            raise ValueError("the checkpoint holds no EMA weights (the run had no `ema` algorithm, or its average "
                             "had not started): use the raw weights")  # fmt: skip
        return weights, "raw"
    unknown = sorted(set(ema) - set(weights))
    if unknown:
        raise ValueError(f"the checkpoint's EMA averages tensors its model state lacks: {unknown[:5]}")
    return {**weights, **ema}, "ema"
