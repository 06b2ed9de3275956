"""Typed, validated training configuration (llm-foundry style YAML -> dataclasses).

A run must fail before anything heavy starts when its YAML is wrong: an unknown key anywhere (Composer itself
accepts unknown `fsdp_config` keys silently), a wrong type, an inconsistent setting or a missing local path stops
it with a `ConfigError` naming the dotted key or the path.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from composer.core import Time, TimeUnit
from omegaconf import OmegaConf as om

from flamingo_composer.config_schema import ConfigError, from_dict
from flamingo_composer.data.config import DataConfig, inherit_preprocessing
from flamingo_composer.eval.config import EvaluatorConfig
from flamingo_composer.models.factory import FlamingoModelConfig
from flamingo_composer.training.fsdp import FSDPSettings
from flamingo_composer.training.recipe import load_recipe_yaml
from flamingo_composer.training.registry import validate_components

# ---------------------------------------------------------------------------------------------------------------
# The sections.


@dataclass
class OptimizerConfig:
    """AdamW as the reference trains (SPEC 3). `weight_decay` is in torch-AdamW terms (decay scaled by lr).

    `adamw` is torch's AdamW, the reference's own optimizer; `fused` (its default for `adamw`) runs torch's fused
    kernel, one pass over each tensor (CPU and CUDA): on the CPU bench model's 44M trainable weights 26 ms per
    update against 349 ms for Composer's per-tensor loop, the same update within fp32 rounding.
    `decoupled_adamw` is Composer's DecoupledAdamW, which does not scale decay by lr: the builder gives it
    lr * weight_decay. It has no fused kernel.
    """

    name: str = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)  # explicit: DecoupledAdamW's own default is (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # SPEC 3: decay on ALL gated cross-attention parameters, LayerNorms and tanh gates included; false leaves
    # the gates and norms undecayed. Perceiver and new-token rows are never decayed.
    decay_gates_and_norms: bool = True
    fused: bool | None = None  # adamw: None or true = torch's fused kernel, false = its foreach/loop default

    def __post_init__(self):
        if self.fused and self.name != "adamw":
            raise ValueError(f"fused: only adamw has a fused kernel, not {self.name!r}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")


@dataclass
class SchedulerConfig:
    """Learning-rate schedule; `t_warmup` counts optimizer steps (batches), whatever the accumulation."""

    name: Literal["constant_with_warmup", "linear_decay_with_warmup", "cosine_with_warmup"] = "constant_with_warmup"
    t_warmup: int | str = 0
    alpha_f: float | None = None  # final lr multiplier of the linear / cosine decay (default 0.0)

    def __post_init__(self):
        self.t_warmup = as_batches(self.t_warmup, "t_warmup")
        if self.name == "constant_with_warmup" and self.alpha_f is not None:
            raise ValueError("alpha_f: has no meaning for constant_with_warmup (use a decaying schedule)")


def as_batches(value: int | str, key: str) -> str:
    """Normalise a length given as an int or an 'Nba' string to Composer's 'Nba' (optimizer steps)."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{key}: must be >= 0 batches, got {value}")
        return f"{value}ba"
    try:
        time = Time.from_timestring(value)
    except ValueError as exc:
        raise ValueError(f"{key}: {value!r} is not a length in batches such as '100ba'") from exc
    if time.unit != TimeUnit.BATCH:
        raise ValueError(f"{key}: {value!r} must be counted in batches (optimizer steps), e.g. '100ba'")
    return f"{time.value}ba"


@dataclass
class LossConfig:
    """Extra terms of the training loss (training/loss.py). `z_loss_weight`: w in `w * logsumexp(logits)^2` per
    supervised token, normalised like the CE and added to each dataset's CE before its multiplier; the term is
    logged per dataset (`loss/train/z_loss/<dataset>`) whatever its weight, 0 included."""

    z_loss_weight: float = 0.0

    def __post_init__(self):
        if self.z_loss_weight < 0:
            raise ValueError(f"z_loss_weight: must be >= 0, got {self.z_loss_weight}")


DEFAULT_ALGORITHMS = {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}}
# Component maps where `NAME: null` removes an entry (one a base recipe set): a recipe or an override switches
# it off, e.g. `algorithms.gradient_clipping=null`.
COMPONENT_SECTIONS = ("algorithms", "callbacks", "loggers")


@dataclass
class TrainConfig:
    """Everything a run needs. Component maps (`algorithms`, `loggers`, `callbacks`) are {registered name: kwargs}."""

    model: FlamingoModelConfig
    data: DataConfig
    max_duration: int | str  # batches (optimizer steps): 100 or '100ba'
    run_name: str | None = None
    seed: int = 17
    device: Literal["cpu", "gpu"] | None = None  # None: gpu when CUDA is available
    # Deprecated: `data.laion.loss_multiplier`, `data.mmc4.loss_multiplier` (mapped onto them, with a warning).
    loss_multiplier_laion: float | None = None
    loss_multiplier_mmc4: float | None = None
    # Supervised positions per chunk of the training CE (a chunk's (n, V) logits live only inside its forward, see
    # loss.LinearCrossEntropySum); null: one chunk. LMs that compute their logits inside forward (remote
    # MosaicGPT/MPT code) use the full logits instead.
    loss_chunk_tokens: int | None = 1024
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    algorithms: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_ALGORITHMS))
    loggers: dict[str, dict[str, Any]] = field(default_factory=dict)
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress_bar: bool = False
    log_to_console: bool = True
    console_log_interval: int | str = 1
    python_log_level: str | None = None
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "fp32"
    device_train_microbatch_size: int | Literal["auto"] | None = None  # None: the whole per-rank batch
    fsdp_config: FSDPSettings | None = None
    # torch.compile the trainable modules (perceiver, gated cross-attention blocks) in place; the frozen CLIP and
    # LM run eagerly. Measured on CPU with benchmarks/bench.py.
    compile_trainable: bool = False
    # Model-level activation checkpointing for runs without FSDP (single device, DDP); under FSDP use
    # fsdp_config.activation_checkpointing instead.
    activation_checkpointing: bool = False
    save_folder: str | None = None
    save_interval: int | str = 1000
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    load_reference_checkpoint: str | None = None  # a released OpenFlamingo checkpoint.pt, loaded before training
    eval_loader: DataConfig | None = None
    eval_interval: int | str = "1dur"
    eval_subset_num_batches: int = -1
    evaluators: list[EvaluatorConfig] = field(default_factory=list)  # few-shot CIDEr / VQA tasks (eval/config.py)
    dist_timeout: float = 600.0
    variables: dict[str, Any] = field(default_factory=dict)  # free-form, for ${variables.x} interpolation

    def __post_init__(self):
        self.max_duration = as_batches(self.max_duration, "max_duration")
        if self.max_duration == "0ba":
            raise ValueError("max_duration: must be at least one batch")
        self.save_interval = as_batches(self.save_interval, "save_interval")
        self.console_log_interval = as_batches(self.console_log_interval, "console_log_interval")
        if isinstance(self.eval_interval, int) or not str(self.eval_interval).endswith("dur"):
            self.eval_interval = as_batches(self.eval_interval, "eval_interval")
        if isinstance(self.device_train_microbatch_size, int) and self.device_train_microbatch_size < 1:
            raise ValueError(f"device_train_microbatch_size: must be >= 1, got {self.device_train_microbatch_size}")
        self._map_deprecated_loss_multipliers()

    def _map_deprecated_loss_multipliers(self) -> None:
        """`loss_multiplier_<name>` sets `data.<name>.loss_multiplier` (with a FutureWarning); both is an error."""
        for key, name in DEPRECATED_LOSS_MULTIPLIERS.items():
            value = getattr(self, key)
            if value is None:
                continue
            setattr(self, key, None)  # one place holds the weight: the dataset's entry
            new_key = f"data.{name}.loss_multiplier"
            if value < 0:
                raise ValueError(f"{key}: must be >= 0, got {value}")
            if name not in self.data:
                raise ValueError(f"{key}: data has no dataset named '{name}' to weigh; use data.<name>.loss_multiplier")
            if self.data[name].loss_multiplier is not None:
                raise ValueError(f"{key}: set together with {new_key}; keep {new_key} only ({key} is deprecated)")
            warnings.warn(f"{key} is deprecated: write {new_key}: {value} instead", FutureWarning, stacklevel=2)
            self.data[name].loss_multiplier = value


# The top-level multipliers of the two datasets recipes had before datasets were named entries: key -> dataset.
DEPRECATED_LOSS_MULTIPLIERS = {"loss_multiplier_laion": "laion", "loss_multiplier_mmc4": "mmc4"}


# ---------------------------------------------------------------------------------------------------------------
# Loading.


def load_config(yaml_path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file + `dotted.key=value` overrides -> validated `TrainConfig` (raises `ConfigError`)."""
    yaml_path = Path(yaml_path)
    if not yaml_path.is_file():
        raise ConfigError(f"config file not found: {yaml_path}")
    try:
        cfg = load_recipe_yaml(yaml_path)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form dotted.key=value")
            cfg = om.merge(cfg, om.from_dotlist(list(overrides)))
        raw = om.to_container(cfg, resolve=True)
    except ConfigError:
        raise
    except Exception as exc:  # omegaconf parse / interpolation errors name the key themselves
        raise ConfigError(f"{yaml_path}: {exc}") from exc
    return config_from_dict(raw)


def drop_removed_components(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` without the component entries set to null (`algorithms.NAME: null` removes what a base set)."""
    out = dict(raw)
    for section in COMPONENT_SECTIONS:
        if isinstance(out.get(section), dict):
            out[section] = {name: kwargs for name, kwargs in out[section].items() if kwargs is not None}
    return out


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Validate plain data (already interpolated) into a `TrainConfig`, including cross-field checks. Held-out
    datasets take their training entry's `kind` and `preprocess` underneath their own keys."""
    raw = drop_removed_components(raw)
    if "eval_loader" in raw:
        raw["eval_loader"] = inherit_preprocessing(raw["eval_loader"], raw.get("data"))
    cfg = from_dict(TrainConfig, raw)
    check_consistency(cfg)
    return cfg


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def check_consistency(cfg: TrainConfig) -> None:
    """Checks that span several keys or need the filesystem / registries (all before anything heavy)."""
    if cfg.autoresume and not (cfg.run_name and cfg.save_folder):
        raise ConfigError("autoresume: true needs both run_name and save_folder (they locate the latest checkpoint)")
    device = cfg.device or ("gpu" if _cuda_available() else "cpu")
    if device == "cpu":
        if cfg.precision != "fp32":
            raise ConfigError(f"precision: {cfg.precision} needs a GPU; use fp32 on CPU")
        if cfg.fsdp_config is not None and cfg.fsdp_config.version == 1:
            raise ConfigError(
                "fsdp_config.version: FSDP1 needs GPUs (Composer passes it a CUDA device); use version: 2 on CPU"
            )
        if cfg.device_train_microbatch_size == "auto":
            raise ConfigError("device_train_microbatch_size: 'auto' needs a GPU (it reacts to CUDA OOM)")
    if cfg.fsdp_config is not None and cfg.fsdp_config.version == 2 and cfg.device_train_microbatch_size == "auto":
        raise ConfigError(
            "device_train_microbatch_size: 'auto' needs FSDP1 in Composer 0.32.1; give a size, or set "
            "fsdp_config.version: 1"
        )
    if cfg.model.frozen_dtype in ("bfloat16", "float16") and cfg.precision == "fp32":
        raise ConfigError(
            f"model.frozen_dtype: {cfg.model.frozen_dtype} weights need an amp precision (amp_bf16 on GPUs), "
            "which runs the frozen matmuls in low precision; with fp32 use null"
        )
    _check_model_sources(cfg.model)
    if cfg.activation_checkpointing and cfg.fsdp_config is not None:
        raise ConfigError(
            "activation_checkpointing: under FSDP set fsdp_config.activation_checkpointing instead "
            "(the top-level key is the model-level option for runs without FSDP)"
        )
    if cfg.eval_loader is not None:
        _check_held_out(cfg.data, cfg.eval_loader)
        if cfg.eval_subset_num_batches < 1:
            raise ConfigError("eval_subset_num_batches: must be >= 1 with an eval_loader (the loaders are streams)")
    if cfg.load_reference_checkpoint and cfg.model.qk_norm:
        raise ConfigError(
            "load_reference_checkpoint: a released OpenFlamingo checkpoint has no qk-norm weights, and "
            "model.qk_norm: true adds them (train qk-norm models from scratch, or set model.qk_norm: false)"
        )
    for key in ("load_reference_checkpoint", "load_path"):
        path = getattr(cfg, key)
        if path and not _is_remote(path) and not Path(path).exists():
            if key == "load_path" and cfg.autoresume:
                continue  # autoresume may find a newer checkpoint in save_folder first; Composer reports it
            raise ConfigError(f"{key}: file not found: {path}")
    try:
        validate_components(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if isinstance(cfg.device_train_microbatch_size, int):
        from flamingo_composer.data.dataspec import validate_microbatch_size

        try:
            validate_microbatch_size(cfg.data.batch_sizes(), cfg.device_train_microbatch_size)
        except ValueError as exc:
            raise ConfigError(f"device_train_microbatch_size: {exc}") from exc


def _check_held_out(data: DataConfig, held_out: DataConfig) -> None:
    """Held-out data evaluates training datasets: each entry names one, of the same kind."""
    for name, dataset in held_out.items():
        if name not in data:
            raise ConfigError(
                f"eval_loader.{name}: no training dataset of that name in data ({', '.join(data)}); held-out "
                "entries evaluate a training dataset and take its kind and preprocessing"
            )
        if dataset.kind != data[name].kind:
            raise ConfigError(f"eval_loader.{name}.kind: {dataset.kind}, but data.{name} is {data[name].kind}")


def _check_model_sources(model: FlamingoModelConfig) -> None:
    """Each model part names exactly one source, and local files named exist (before anything is built). The vision
    tower's keys depend on its `source`: VisionConfig checks them itself."""
    for section, keys in (
        ("lm", ("name", "config")),
        ("tokenizer", ("name", "builtin")),
    ):
        given = [k for k in keys if getattr(getattr(model, section), k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"model.{section}: set exactly one of {', '.join(keys)} (got {', '.join(given) or 'none'})"
            )
    if model.vision.config_path is not None and not Path(model.vision.config_path).is_file():
        raise ConfigError(f"model.vision.config_path: file not found: {model.vision.config_path}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain-data view of the validated config (for logging hyperparameters); `data` and `eval_loader` as
    {name: dataset}, as written."""
    plain = dataclasses.asdict(cfg)
    for key in ("data", "eval_loader"):
        if plain[key] is not None:
            plain[key] = plain[key]["datasets"]
    return plain
