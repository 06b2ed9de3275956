"""Monitors of a training run, as callbacks (on by default in yamls/run.yaml and the released recipes).

- `NonFiniteMonitor` (`nan_monitor`): a NaN or inf in a logged training loss or in the accumulated gradients
  stops the run, naming the step, the dataset and the last checkpoint written (autoresume continues from it).
- `LossSpikeMonitor` (`loss_spike`): a loss above `multiplier` x the mean of a rolling window of earlier losses is
  logged; with `stop: true`, `patience` spikes in a row stop the run (as llm-foundry's kill_loss_spike).
- `XAttnGateLogger` (`xattn_gates`): tanh(attn_gate) and tanh(ff_gate) of every gated cross-attention block,
  every `interval` steps, so a run shows the cross-attention opening up (flamingo-plot draws them).

Cheap by construction: the losses they read are the host floats Composer logs anyway (`state.total_loss_dict`);
the gradient check reduces each microbatch's gradients to one device flag, read with one small all-reduce after
Composer's own loss synchronisation; the gates are read every `interval` steps only.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.fsdp._common_utils import clean_tensor_name
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)

__all__ = ["LossSpikeMonitor", "NonFiniteMonitor", "TrainingStopped", "XAttnGateLogger", "gate_metric_names"]

LOSS_PREFIX = "loss/train/"
GATE_METRIC = "xattn_gates/{gate}/layer_{layer:02d}"  # gate: 'attn' or 'ff'; layer: the LM layer it precedes


class TrainingStopped(RuntimeError):
    """A monitor stopped the run; the message says why, where, and which checkpoint to continue from."""


def _unwrapped(state: State) -> torch.nn.Module:
    model = state.model
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _last_checkpoint(state: State) -> str:
    from flamingo_composer.training.checkpoints import last_checkpoint_of_run

    found = last_checkpoint_of_run(state)
    return f"last checkpoint: {found} (the same command with autoresume continues from it)" if found else (
        "no checkpoint written yet")


def _datasets_in(keys) -> list[str]:
    """The datasets that logged loss keys name (`loss/train/<name>`, `loss/train/z_loss/<name>`), in key order."""
    names = [key.split("/")[-1] for key in keys if key != "loss/train/total"]
    return list(dict.fromkeys(names))


class NonFiniteMonitor(Callback):
    """Stops the run at the first step whose logged loss or accumulated gradient holds a NaN or inf.

    `check_gradients`: also flag the gradients after each microbatch's backward (a device flag per microbatch;
    the first non-finite one names the dataset whose backward made them so).
    """

    def __init__(self, check_gradients: bool = True):
        self.check_gradients = check_gradients
        self._flags: list[tuple[str, torch.Tensor]] = []  # (dataset of the microbatch, 0-d bool on the device)

    def batch_start(self, state: State, logger: Logger) -> None:
        self._flags = []

    def after_backward(self, state: State, logger: Logger) -> None:
        if not self.check_gradients:
            return
        grads = [_local(p.grad) for p in _unwrapped(state).parameters() if p.grad is not None]
        grads = [g for g in grads if g.numel()]
        # (n_tensors,) norms, non-finite if any entry is; every rank appends one flag per microbatch
        norms = torch.stack(torch._foreach_norm(grads)) if grads else torch.zeros(1, device=state.device._device)
        self._flags.append(("/".join(state.batch), ~torch.isfinite(norms.sum())))

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        losses = {k: v for k, v in (state.total_loss_dict or {}).items() if not math.isfinite(float(v))}
        gradient_problem = self._first_non_finite_gradient()
        if not losses and gradient_problem is None:
            return
        if losses:
            shown = ", ".join(f"{k} = {v}" for k, v in sorted(losses.items()))
            what = f"non-finite training loss at step {step} in dataset {', '.join(_datasets_in(losses)) or '?'} "
            what += f"({shown})"
        else:
            what = f"non-finite gradients at step {step}, first after the backward of dataset {gradient_problem}"
        raise TrainingStopped(f"{what}; {_last_checkpoint(state)}")

    def _first_non_finite_gradient(self) -> str | None:
        if not self._flags:
            return None
        flags = torch.stack([flag for _, flag in self._flags]).to(torch.uint8)  # (microbatches,)
        if dist.get_world_size() > 1:  # FSDP: each rank checked its own shards
            dist.all_reduce(flags, reduce_operation="MAX")
        bad = flags.nonzero().flatten().tolist()  # after Composer's loss sync: no wait here
        return self._flags[bad[0]][0] if bad else None


class LossSpikeMonitor(Callback):
    """Flags a training loss above `multiplier` x the mean of the last `window` non-spike losses.

    Each spike is logged (`monitors/loss_spike`: the ratio to the window mean) and printed once; spikes do not
    enter the window. With `stop`, `patience` spikes in a row stop the run. `metric`: which logged loss
    (`loss/train/total` by default). The window survives resume (checkpointed).
    """

    def __init__(self, window: int = 100, multiplier: float = 2.0, patience: int = 4, stop: bool = False,
                 metric: str = "loss/train/total"):  # fmt: skip
        if window < 1:
            raise ValueError(f"window: must be >= 1, got {window}")
        if multiplier <= 1:
            raise ValueError(f"multiplier: must be > 1, got {multiplier}")
        if patience < 1:
            raise ValueError(f"patience: must be >= 1, got {patience}")
        if not metric.startswith(LOSS_PREFIX):
            raise ValueError(f"metric: must be a logged training loss ({LOSS_PREFIX}...), got {metric!r}")
        self.window, self.multiplier, self.patience, self.stop, self.metric = window, multiplier, patience, stop, metric
        self._losses: deque[float] = deque(maxlen=window)
        self._in_a_row = 0
        self.spikes: list[tuple[int, float, float]] = []  # (step, loss, window mean) of this process's spikes

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = (state.total_loss_dict or {}).get(self.metric)
        if loss is None or not math.isfinite(float(loss)):  # non-finite: the NaN monitor's
            return
        loss = float(loss)
        if len(self._losses) < self.window or loss <= self.multiplier * (mean := sum(self._losses) / len(self._losses)):
            self._losses.append(loss)
            self._in_a_row = 0
            return
        step = int(state.timestamp.batch)
        self._in_a_row += 1
        self.spikes.append((step, loss, mean))
        logger.log_metrics({"monitors/loss_spike": loss / mean})
        if dist.get_global_rank() == 0:
            log.warning("loss spike at step %d: %s = %.4g, %.2f x the mean %.4g of the last %d steps", step,
                        self.metric, loss, loss / mean, mean, self.window)  # fmt: skip
        if self.stop and self._in_a_row >= self.patience:
            raise TrainingStopped(
                f"loss spike: {self.metric} above {self.multiplier} x its mean over the last {self.window} steps for "
                f"{self._in_a_row} steps in a row, at step {step} ({loss:.4g} vs {mean:.4g}); {_last_checkpoint(state)}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self._losses), "in_a_row": self._in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._losses = deque(state.get("losses", []), maxlen=self.window)
        self._in_a_row = int(state.get("in_a_row", 0))


def _gate_blocks(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(LM layer index, GatedCrossAttentionBlock) in layer order, whatever wraps them (FSDP2, checkpointing)."""
    from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock

    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, GatedCrossAttentionBlock):
            match = re.search(r"\.(\d+)\.gated_cross_attn_layer$", clean_tensor_name(name))
            blocks.append((int(match.group(1)) if match else len(blocks), module))
    return sorted(blocks, key=lambda item: item[0])


def gate_metric_names(layers, gates=("attn", "ff")) -> list[str]:
    return [GATE_METRIC.format(gate=gate, layer=layer) for gate in gates for layer in layers]


class XAttnGateLogger(Callback):
    """Logs tanh(attn_gate) and tanh(ff_gate) of every gated cross-attention block every `interval` steps, as
    `xattn_gates/{attn,ff}/layer_NN` (NN: the LM layer the block runs before). 0 at the start: the LM alone."""

    def __init__(self, interval: int = 100):
        if interval < 1:
            raise ValueError(f"interval: must be >= 1, got {interval}")
        self.interval = interval

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.interval:
            return
        metrics = {}
        with torch.no_grad():
            for layer, block in _gate_blocks(_unwrapped(state)):
                for gate in ("attn", "ff"):
                    value = getattr(block, f"{gate}_gate")  # (1,); a DTensor under FSDP2: gathered on every rank
                    full = value.full_tensor() if isinstance(value, DTensor) else value
                    metrics[GATE_METRIC.format(gate=gate, layer=layer)] = full.tanh()
        values = torch.cat(list(metrics.values())).tolist() if metrics else []  # one host read
        logger.log_metrics(dict(zip(metrics, values)))
