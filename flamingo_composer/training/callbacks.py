"""Callbacks: data-skip and dropped-image counts per reason, the data position of both loaders in every checkpoint, and
trainable-only model state in checkpoints.

Composer saves a monolithic checkpoint from rank 0 only and every rank loads that file, so state must be the same
on every rank when written: counts are summed over ranks, positions gathered from all ranks. `state_dict()` is
called on every rank while saving, which makes a collective safe there.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from flamingo_composer.data.items import DROPPED_IMAGES


def _gather(obj: Any) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]` (a plain list on one process)."""
    return dist.all_gather_object(obj) if dist.get_world_size() > 1 else [obj]


class DataSkipLogger(Callback):
    """Logs `data/skipped/<dataset>/<reason>` (samples the loaders rejected) and `data/dropped_images/<dataset>/
    <reason>` (images lost by samples they kept) since the run began, all ranks summed.

    Each sub-batch carries both as {reason: count} since the previous batch (made in DataLoader workers), read here
    at AFTER_DATALOADER on the full per-rank batch. Totals are summed across ranks when logged (every
    `log_interval` batches and at the end) and survive resume through the checkpoint.
    """

    COUNTS = ("skipped", DROPPED_IMAGES)  # sub-batch keys; each becomes data/<key>/<dataset>/<reason>

    def __init__(self, log_interval: int = 1):
        if log_interval < 1:
            raise ValueError(f"log_interval: must be >= 1, got {log_interval}")
        self.log_interval = log_interval
        self._resumed: Counter[str] = Counter()  # global totals from the checkpoint we resumed from
        self._local: Counter[str] = Counter()  # this rank's counts since this process started
        self._global: Counter[str] = Counter()  # last all-rank total computed
        # Keys of all three: `<count>/<dataset>/<reason>`, e.g. `skipped/laion/corrupt_image`.

    def after_dataloader(self, state: State, logger: Logger) -> None:
        batch = state.batch
        if not isinstance(batch, dict):
            return
        for dataset, sub in batch.items():
            if not isinstance(sub, dict):
                continue
            for count in self.COUNTS:
                for reason, n in (sub.get(count) or {}).items():
                    self._local[f"{count}/{dataset}/{reason}"] += int(n)

    def _refresh(self) -> Counter[str]:
        total = Counter(self._resumed)
        for counts in _gather(dict(self._local)):
            total.update(counts)
        self._global = total
        return total

    def _log(self, logger: Logger) -> None:
        totals = self._refresh()
        if totals:
            logger.log_metrics({f"data/{key}": n for key, n in sorted(totals.items())})

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.log_interval == 0:
            self._log(logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._log(logger)

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self._refresh())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Older checkpoints hold only the skipped samples, as `totals` keyed `<dataset>/<reason>`."""
        older = {f"skipped/{key}": n for key, n in state.get("totals", {}).items()}
        self._resumed = Counter(state.get("counts", older))
        self._local = Counter()
        self._global = Counter(self._resumed)


class DataPositionCallback(Callback):
    """Puts the DualBatchLoader's position (both streams, every rank) into each checkpoint and restores it.

    The loader's own `state_dict()` gathers every rank's raw-stream positions (it is called on every rank while
    saving), and its `load_state_dict()` picks this rank's. Use with `Trainer(spin_dataloaders=False)`: the loader
    continues at the saved position itself, so Composer must not re-read and discard the consumed batches. Restored
    at checkpoint load (Trainer init), i.e. before the first batch of the resumed run.
    """

    def __init__(self, loader: Any):
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(loader, method, None)):
                raise TypeError(f"{type(loader).__name__} has no {method}(): its position cannot be checkpointed")
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])


class TrainableOnlyModelState(Callback):
    """Checkpoints collect the trainable parameters only, without ever gathering a frozen weight.

    Composer's `State.get_model_state_dict` asks `torch.distributed.checkpoint` for the whole model; with FSDP full
    state dicts that all-gathers the frozen CLIP and LM to rank 0 (27 GB at 9B in fp32) before `save_ignore_keys`
    drops them, and sharded saves write their shards. Composer offers no option for it, so at INIT (before it
    wraps the model or loads a checkpoint) this replaces that one method on the State by the same call with
    `ignore_frozen_params=True`. Loading then asks for the trainable tensors only, too; the frozen weights come
    from the recipe. Buffers are left to `run.trainable_only_filter` (save and load ignore keys).
    """

    def init(self, state: State, logger: Logger) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        def trainable_model_state_dict() -> dict[str, Any]:
            options = StateDictOptions(
                full_state_dict=state.fsdp_state_dict_type == "full",
                cpu_offload=state.fsdp_enabled,
                ignore_frozen_params=True,
            )
            return get_model_state_dict(model=state.model, options=options)

        state.get_model_state_dict = trainable_model_state_dict


class FSDP2AfterWrap(Callback):
    """After Composer wraps the model (AFTER_LOAD), two FSDP2 fixes; both do nothing without FSDP2.

    - on gloo, the gradient reduction becomes a mean, so gradients equal DDP's on CPU as on GPUs
      (`fsdp.average_fsdp2_gradients_on_gloo`);
    - the root unit stays gathered after forward, for the loss's head (`fsdp.keep_root_gathered_after_forward`).
    """

    def after_load(self, state: State, logger: Logger) -> None:
        from flamingo_composer.training.fsdp import (
            average_fsdp2_gradients_on_gloo,
            keep_root_gathered_after_forward,
        )

        average_fsdp2_gradients_on_gloo(state.model)
        keep_root_gathered_after_forward(state.model)
