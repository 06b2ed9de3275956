"""The training entry point: validated config -> model, data, optimizer, callbacks -> Composer Trainer.fit().

`composer train.py yamls/run.yaml [dotted.key=value ...]` calls `main`. Config problems exit non-zero with the
message before the model is built.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from composer import Trainer
from composer.core import Evaluator, Time
from composer.utils import dist, get_device, reproducibility
from torch import nn
from torch.distributed.fsdp._common_utils import clean_tensor_name

from flamingo_composer.data.dataspec import build_dataspec
from flamingo_composer.data.dual_loader import build_dual_loader
from flamingo_composer.eval.composer_eval import FewShotComposerModel, build_fewshot_evaluators
from flamingo_composer.models.factory import build_flamingo
from flamingo_composer.models.reference_checkpoint import load_reference_state_dict
from flamingo_composer.training.builders import (
    build_algorithms,
    build_callbacks,
    build_loggers,
    build_optimizer,
    build_scheduler,
    split_algorithms,
)
from flamingo_composer.training.callbacks import (
    DataPositionCallback,
    FSDP2AfterWrap,
    TrainableOnlyModelState,
)
from flamingo_composer.training.checkpoints import (
    LATEST_MONOLITHIC,
    LATEST_SHARDED,
    build_checkpoint_saver,
    prepare_checkpoints,
)
from flamingo_composer.training.composer_model import FlamingoComposerModel, heldout_metric_names
from flamingo_composer.training.config import ConfigError, TrainConfig, config_to_dict, load_config
from flamingo_composer.training.fsdp import install_fsdp_policies
from flamingo_composer.training.loss import REQUIRED_TRAINER_KWARGS, StepTokenCounts
from flamingo_composer.training.monitors import TrainingStopped
from flamingo_composer.training.summary import run_summary

__all__ = ["ConfigError", "load_config", "main", "train_from_config", "trainable_only_filter",
           "trainable_parameter_names"]

log = logging.getLogger(__name__)


def trainable_parameter_names(model: nn.Module) -> set[str]:
    """Names of `model`'s trainable parameters as its state dict names them (wrapper prefixes such as activation
    checkpointing's removed)."""
    return {clean_tensor_name(name) for name, p in model.named_parameters() if p.requires_grad}


def trainable_only_filter(trainable_names: set[str] | Callable[[], set[str]]) -> Callable[[dict], None]:
    """A `save_ignore_keys` / `load_ignore_keys` callable dropping every model tensor that is not a trainable
    parameter.

    Checkpoints then hold the perceiver, cross-attention blocks and new-token rows (plus optimizer, scheduler,
    RNG, timestamp, callbacks, algorithms); the frozen CLIP and LM weights are rebuilt from the recipe on load
    (`load_strict_model_weights=False`). On load it trims what Composer asks a sharded checkpoint for to what was
    saved (`torch.distributed.checkpoint` fails on any requested key it lacks). `trainable_names` are names in
    the ComposerModel (`model.perceiver...`), or a function giving them at each save and load: the model as the
    Trainer holds it, with whatever an algorithm added at INIT.
    """

    def drop_frozen(checkpoint: dict) -> None:
        model_state = checkpoint.get("state", {}).get("model")
        if model_state is None:
            return
        keep = trainable_names() if callable(trainable_names) else trainable_names
        for key in [k for k in model_state if k not in keep]:
            del model_state[key]

    return drop_frozen


def _model_config(cfg: TrainConfig):
    """The model config, with the model-level activation checkpointing switched on when asked for (no FSDP)."""
    if cfg.activation_checkpointing:
        return dataclasses.replace(cfg.model, gradient_checkpointing=True)
    return cfg.model


def compile_trainable_modules(flamingo) -> int:
    """`torch.compile` the perceiver and every gated cross-attention block in place (their own forward; the
    modules, names and FSDP units stay the same); returns how many were compiled."""
    from flamingo_composer.models.cross_attention import GatedCrossAttentionBlock

    modules = [flamingo.perceiver, *(m for m in flamingo.modules() if isinstance(m, GatedCrossAttentionBlock))]
    for module in modules:
        module.compile(dynamic=True)
    return len(modules)


def build_data_loader(data, key: str, bundle, *, for_eval: bool = False):
    """The loader of `data`'s datasets; data that cannot train at all (no readable sample) is a ConfigError naming
    it."""
    try:
        return build_dual_loader(data, bundle.tokenizer, bundle.image_transform, for_eval=for_eval)
    except ValueError as exc:
        raise ConfigError(f"{key}.{exc}") from exc


def _evaluators(cfg: TrainConfig, bundle) -> list[Evaluator]:
    """One Evaluator over the held-out loader (it rewinds each time, so every evaluation sees the same data).

    The model's metrics are per dataset (`<name>/LanguageCrossEntropy`, ...), so one batch feeds every dataset's.
    """
    if cfg.eval_loader is None:
        return []
    loader = build_data_loader(cfg.eval_loader, "eval_loader", bundle, for_eval=True)
    return [
        Evaluator(
            label="eval",
            dataloader=build_dataspec(loader),
            # Only the metrics of the datasets this loader holds (an absent dataset's would log NaN), and not the
            # few-shot ones. Composer matches these as regular expressions: anchored, exact names.
            metric_names=[f"^{re.escape(name)}$" for name in heldout_metric_names(cfg.eval_loader.enabled())],
            subset_num_batches=cfg.eval_subset_num_batches,
            device_eval_microbatch_size=loader.batch_size,
        )
    ]


def train_from_config(cfg: TrainConfig, *, extra_callbacks: Sequence[Any] = (), extra_algorithms: Sequence[Any] = (),
                      fit: bool = True) -> Trainer:  # fmt: skip
    """Build everything from a validated config and train; returns the Trainer (tests inspect it).

    `extra_algorithms`: Algorithm objects added after the config's (tests: algorithms outside the allowlist).
    """
    device = get_device(cfg.device)
    dist.initialize_dist(device, timeout=cfg.dist_timeout)
    reproducibility.seed_all(cfg.seed)
    sharded = cfg.fsdp_config is not None and cfg.fsdp_config.state_dict_type == "sharded"
    # Before anything heavy: the checkpoint to resume from (the newest complete one) or load_path, checked.
    start = prepare_checkpoints(cfg.save_folder, run_name=cfg.run_name, autoresume=cfg.autoresume,
                                load_path=cfg.load_path, sharded=sharded)  # fmt: skip
    if start and dist.get_global_rank() == 0:
        log.info(start)

    # Under FSDP only rank 0 reads the weights; the other ranks get them from it when Composer shards the model.
    on_meta = cfg.fsdp_config is not None and cfg.fsdp_config.mixed_init and dist.get_global_rank() > 0
    bundle = build_flamingo(_model_config(cfg), on_meta=on_meta)
    if cfg.load_reference_checkpoint and not on_meta:
        report = load_reference_state_dict(bundle.model, cfg.load_reference_checkpoint)
        log.info("reference checkpoint: %s", report.summary())
    losses = {
        "loss_multipliers": cfg.data.loss_multipliers(), "loss_chunk_tokens": cfg.loss_chunk_tokens,
        "z_loss_weight": cfg.loss.z_loss_weight,
    }
    if cfg.evaluators:  # few-shot evaluators: the model also answers generation batches
        composer_model = FewShotComposerModel(bundle.model, bundle.tokenizer, **losses)
    else:
        composer_model = FlamingoComposerModel(bundle.model, **losses)
    if cfg.compile_trainable:
        compile_trainable_modules(bundle.model)
    if cfg.fsdp_config is not None:
        install_fsdp_policies(composer_model)
    # At each save and load, from the model as the Trainer holds it (an algorithm may add parameters at INIT).
    trainable = functools.partial(trainable_parameter_names, composer_model)

    train_loader = build_data_loader(cfg.data, "data", bundle)
    evaluators = _evaluators(cfg, bundle) + build_fewshot_evaluators(
        cfg.evaluators, bundle.tokenizer, bundle.image_transform
    )
    optimizer = build_optimizer(cfg.optimizer, bundle.model)
    saver = build_checkpoint_saver(
        save_folder=cfg.save_folder, sharded=sharded, save_interval=cfg.save_interval,
        keep=cfg.save_num_checkpoints_to_keep, overwrite=cfg.save_overwrite,
        ignore_keys=trainable_only_filter(trainable),
    )  # fmt: skip
    algorithms, algorithm_callbacks = split_algorithms(build_algorithms(cfg.algorithms))
    callbacks = [
        StepTokenCounts(), *algorithm_callbacks, *build_callbacks(cfg.callbacks), DataPositionCallback(train_loader),
        TrainableOnlyModelState(), FSDP2AfterWrap(), *extra_callbacks, *([saver] if saver else []),
    ]

    trainer = Trainer(
        model=composer_model,
        train_dataloader=build_dataspec(train_loader),
        spin_dataloaders=False,  # the loader resumes itself (DataPositionCallback)
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=build_scheduler(cfg.scheduler),
        step_schedulers_every_batch=True,
        algorithms=[*algorithms, *extra_algorithms],
        callbacks=callbacks,
        loggers=build_loggers(cfg.loggers),
        run_name=cfg.run_name,
        progress_bar=cfg.progress_bar,
        log_to_console=cfg.log_to_console,
        console_log_interval=cfg.console_log_interval,
        python_log_level=cfg.python_log_level,
        eval_dataloader=evaluators or None,
        eval_interval=cfg.eval_interval if evaluators else 0,
        save_folder=cfg.save_folder,  # the saver above writes (checkpoints.py); these two locate `latest`
        save_latest_filename=LATEST_SHARDED if sharded else LATEST_MONOLITHIC,
        load_ignore_keys=trainable_only_filter(trainable),
        autoresume=cfg.autoresume,
        load_path=cfg.load_path,
        load_strict_model_weights=False,  # frozen weights are not in our checkpoints
        device=device,
        precision=cfg.precision,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        parallelism_config=cfg.fsdp_config.to_composer() if cfg.fsdp_config is not None else None,
        seed=cfg.seed,
        dist_timeout=cfg.dist_timeout,
        **REQUIRED_TRAINER_KWARGS,
    )
    hparams = config_to_dict(cfg)
    # Both conventions of the decay: the config's torch-AdamW value and what each param group really uses.
    hparams["optimizer_groups"] = [
        {"tensors": len(g["params"]), "weight_decay": g["weight_decay"], "lr": g["lr"]} for g in optimizer.param_groups
    ]
    trainer.logger.log_hyperparameters(hparams)
    if fit:
        if trainer.state.timestamp.batch >= Time.from_timestring(cfg.max_duration):
            # Autoresume found the final checkpoint: the run is complete (Composer would raise instead).
            log.info("run %s already reached max_duration %s; nothing to train", cfg.run_name, cfg.max_duration)
        else:
            trainer.fit()
    return trainer


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at each line (as logging's last-resort handler does), not the stream of
    the first call: a caller that swaps stderr and closes it (pytest's capture, a notebook cell) breaks no later
    line."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def configure_package_logging() -> None:
    """INFO-level lines of this package, printed once: our own handler, and no propagation to the root logger
    (libraries such as open_clip call `logging.warning()`, which installs a root handler that would print every
    line a second time)."""
    package_log = logging.getLogger("flamingo_composer")
    if not package_log.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
    package_log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """`train.py YAML [dotted.key=value ...]`: 0 on success, 2 on a config error (message on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: composer train.py yamls/run.yaml [dotted.key=value ...]", file=sys.stderr)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
        configure_package_logging()
        trainer = train_from_config(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:  # a monitor stopped the run (training/monitors.py)
        print(f"training stopped: {exc}", file=sys.stderr)
        return 1
    if dist.get_global_rank() == 0:
        print(run_summary(trainer, cfg, recipe=argv[0]), flush=True)
    return 0
