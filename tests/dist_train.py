"""A real multi-rank run of `train_from_config` on yamls/run.yaml with the given overrides, recording what the
distributed tests compare:

    torchrun --standalone --nproc_per_node 2 tests/dist_train.py OUT.pt [--kill-at K] [--slow-save S] [key=value ...]

Rank 0 writes OUT.pt after every step (so a killed run leaves its steps) and at the end: per-step logged losses, the
global gradient norm before clipping (from the accumulated gradients after the last microbatch's backward), the
trainable parameters at the end (full tensors, gathered from FSDP2 shards), each trainable parameter's DTensor
placements, whether any frozen parameter got a gradient, FLOPs per batch as the model counts them, the world size,
and with the `ema` algorithm its average (full tensors) when training starts (after a resume: what the checkpoint
held) and at the end. `--kill-at K` SIGKILLs every rank at the start of step K + 1, after step K's checkpoint is
written: a crashed job, not a finished one. `--slow-save S` writes each checkpoint file in two halves S seconds
apart, as a large model's long write: a kill in between meets a partial file.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import torch
from composer import Callback, State
from composer.loggers import Logger


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a DTensor is gathered), detached on the CPU."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu().clone()


def _name(parameter_name: str) -> str:
    """The parameter's name in the unwrapped model (activation checkpointing inserts a wrapper module)."""
    return parameter_name.replace("_checkpoint_wrapped_module.", "")


def _composer_model(state: State) -> torch.nn.Module:
    return state.model.module if hasattr(state.model, "module") else state.model  # DDP wraps the ComposerModel


def _flamingo(state: State) -> torch.nn.Module:
    return _composer_model(state).model


def ema_average(state: State) -> dict[str, torch.Tensor] | None:
    """The `ema` algorithm's average as full tensors (gathered from FSDP2 shards), or None without it."""
    found = [c for c in state.callbacks if type(c).__name__ == "FlamingoEMA"]
    return {name: _full(t) for name, t in found[0]._ema.items()} if found else None


class Recorder(Callback):
    def __init__(self, out: str, kill_at: int | None):
        self.out, self.kill_at = out, kill_at
        self.losses: dict[int, dict[str, float]] = {}
        self.grad_norms: dict[int, float] = {}
        self.flops: dict[int, float] = {}
        self.frozen_with_grad: set[str] = set()
        self.ema_at_start = None
        self._last_norm = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self.ema_at_start = ema_average(state)

    def batch_start(self, state: State, logger: Logger) -> None:
        if self.kill_at is not None and int(state.timestamp.batch) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_backward(self, state: State, logger: Logger) -> None:
        norms = [_full(p.grad).norm() for p in _flamingo(state).parameters() if p.grad is not None]
        self._last_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def after_train_batch(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch) + 1
        self.grad_norms[step] = self._last_norm  # before GradientClipping: the last microbatch's accumulated grads
        self.flops[step] = float(_composer_model(state).flops_per_batch(state.batch))
        for name, param in _flamingo(state).named_parameters():
            if not param.requires_grad and param.grad is not None:
                self.frozen_with_grad.add(_name(name))

    def batch_end(self, state: State, logger: Logger) -> None:
        self.losses[int(state.timestamp.batch)] = dict(state.total_loss_dict)
        self.save()

    def save(self, **extra) -> None:
        from composer.utils import dist

        if dist.get_global_rank() == 0:
            record = {"losses": self.losses, "grad_norms": self.grad_norms, "flops": self.flops,
                      "frozen_with_grad": sorted(self.frozen_with_grad), "world_size": dist.get_world_size(),
                      "ema_at_start": self.ema_at_start}
            torch.save({**record, **extra}, self.out)  # fmt: skip


def slow_checkpoint_writes(seconds: float) -> None:
    """torch.save into an open file (how Composer writes a monolithic checkpoint) pauses halfway through."""
    save = torch.save

    def save_in_two_halves(obj, f, *args, **kwargs):
        if isinstance(f, str | os.PathLike | io.BytesIO):
            return save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(seconds)
        f.write(data[len(data) // 2 :])

    torch.save = save_in_two_halves


def main(argv: list[str]) -> None:
    from flamingo_composer.training.run import configure_package_logging, load_config, train_from_config

    out, args = argv[0], argv[1:]
    kill_at = None
    while args[:1] in (["--kill-at"], ["--slow-save"]):
        if args[0] == "--kill-at":
            kill_at = int(args[1])
        else:
            slow_checkpoint_writes(float(args[1]))
        args = args[2:]
    torch.set_num_threads(1)
    configure_package_logging()
    recorder = Recorder(out, kill_at)
    config = load_config(Path(__file__).resolve().parent.parent / "yamls" / "run.yaml", args)
    trainer = train_from_config(config, extra_callbacks=[recorder])
    flamingo = _flamingo(trainer.state)
    trainable = {_name(n): _full(p) for n, p in flamingo.named_parameters() if p.requires_grad}
    placements = {_name(n): str(getattr(p, "placements", None)) for n, p in flamingo.named_parameters()}
    ema = ema_average(trainer.state)
    trainer.close()
    recorder.save(trainable=trainable, placements=placements, ema=ema)


if __name__ == "__main__":
    main(sys.argv[1:])
