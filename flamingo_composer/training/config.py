"""Typed, validated training configuration (llm-foundry style YAML -> dataclasses).

A run must fail before anything heavy starts when its YAML is wrong: an unknown key anywhere (Composer itself
accepts unknown `fsdp_config` keys silently), a wrong type, an inconsistent setting or a missing local path stops
it with a `ConfigError` naming the dotted key or the path.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from composer.core import Time, TimeUnit
from omegaconf import OmegaConf as om

from flamingo_composer.data.config import DataConfig
from flamingo_composer.eval.config import EvaluatorConfig
from flamingo_composer.models.factory import FlamingoModelConfig
from flamingo_composer.training.fsdp import FSDPSettings


class ConfigError(ValueError):
    """The training configuration is invalid; the message names the key (dotted path) or file."""


# ---------------------------------------------------------------------------------------------------------------
# Generic dict -> dataclass validation (unknown keys, types, missing fields), used for every nested section.


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from plain YAML data, recursing into nested dataclasses, checking keys and types."""
    where = path or "<top level>"
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    init_fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in init_fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), init_fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown key '{_join(path, key)}'{hint}; allowed keys{' in ' + path if path else ''}: "
            f"{sorted(init_fields)}"
        )
    kwargs = {}
    for name, f in init_fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_join(path, name)}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # Checks in __post_init__ start their message with the field name ("lr: must be > 0"): name the full key.
        message = str(exc)
        match = re.match(r"^(\w+): (.*)$", message, flags=re.S)
        if match and match.group(1) in init_fields:
            raise ConfigError(f"{_join(path, match.group(1))}: {match.group(2)}") from exc
        raise ConfigError(f"{where}: {message}") from exc


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against the annotation `hint`; return it converted (nested dataclasses, tuples, floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null (expected {_type_name(hint)})")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        # A mapping aimed at a dataclass member: report its own (more precise) error.
        nested = [e for e, a in zip(errors, (a for a in args if a is not type(None))) if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and nested:
            raise nested[0]
        raise ConfigError(f"{path}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin in (list, tuple, dict) or hint in (list, tuple, dict):
        return _coerce_container(value, hint, origin or hint, args, path)
    if value is None:
        raise ConfigError(f"{path}: must not be null (expected {_type_name(hint)})")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, str | Path):
            return Path(value)
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        for member in hint:
            if value in (member.value, member.name):
                return member
        raise ConfigError(f"{path}: must be one of {[m.value for m in hint]}, got {value!r}")
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        return value
    raise ConfigError(f"{path}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")


def _coerce_container(value: Any, hint: Any, origin: type, args: tuple, path: str) -> Any:
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        value_hint = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, value_hint, _join(path, k)) for k, v in value.items()}
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
    if origin is list:
        item_hint = args[0] if args else Any
        return [_coerce(v, item_hint, f"{path}[{i}]") for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if args and len(value) != len(args):
        raise ConfigError(f"{path}: expected a list of {len(args)} values, got {len(value)}: {list(value)!r}")
    return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))


# ---------------------------------------------------------------------------------------------------------------
# The sections.


@dataclass
class OptimizerConfig:
    """AdamW as the reference trains (SPEC 3). `weight_decay` is in torch-AdamW terms (decay scaled by lr).

    The builder converts it for Composer's DecoupledAdamW (which does not scale by lr): lr * weight_decay.
    """

    name: str = "decoupled_adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)  # explicit: DecoupledAdamW's own default is (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # SPEC 3: decay on ALL gated cross-attention parameters, LayerNorms and tanh gates included; false leaves
    # the gates and norms undecayed. Perceiver and new-token rows are never decayed.
    decay_gates_and_norms: bool = True

    def __post_init__(self):
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


DEFAULT_ALGORITHMS = {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}}


@dataclass
class TrainConfig:
    """Everything a run needs. Component maps (`algorithms`, `loggers`, `callbacks`) are {registered name: kwargs}."""

    model: FlamingoModelConfig
    data: DataConfig
    max_duration: int | str  # batches (optimizer steps): 100 or '100ba'
    run_name: str | None = None
    seed: int = 17
    device: Literal["cpu", "gpu"] | None = None  # None: gpu when CUDA is available
    loss_multiplier_laion: float = 0.2
    loss_multiplier_mmc4: float = 1.0
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


# ---------------------------------------------------------------------------------------------------------------
# Loading.


def load_config(yaml_path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file + `dotted.key=value` overrides -> validated `TrainConfig` (raises `ConfigError`)."""
    yaml_path = Path(yaml_path)
    if not yaml_path.is_file():
        raise ConfigError(f"config file not found: {yaml_path}")
    try:
        cfg = om.load(yaml_path)
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


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Validate plain data (already interpolated) into a `TrainConfig`, including cross-field checks."""
    cfg = from_dict(TrainConfig, raw)
    check_consistency(cfg)
    return cfg


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def check_consistency(cfg: TrainConfig) -> None:
    """Checks that span several keys or need the filesystem / registries (all before anything heavy)."""
    from flamingo_composer.training.builders import validate_components

    if cfg.autoresume and not (cfg.run_name and cfg.save_folder):
        raise ConfigError("autoresume: true needs both run_name and save_folder (they locate the latest checkpoint)")
    device = cfg.device or ("gpu" if _cuda_available() else "cpu")
    if device == "cpu":
        if cfg.precision != "fp32":
            raise ConfigError(f"precision: {cfg.precision} needs a GPU; use fp32 on CPU")
        if cfg.fsdp_config is not None:
            raise ConfigError("fsdp_config: FSDP needs GPUs; remove it (null) for CPU runs")
        if cfg.device_train_microbatch_size == "auto":
            raise ConfigError("device_train_microbatch_size: 'auto' needs a GPU (it reacts to CUDA OOM)")
    _check_model_sources(cfg.model)
    if cfg.activation_checkpointing and cfg.fsdp_config is not None:
        raise ConfigError(
            "activation_checkpointing: under FSDP set fsdp_config.activation_checkpointing instead "
            "(the top-level key is the model-level option for runs without FSDP)"
        )
    if cfg.eval_loader is not None and cfg.eval_subset_num_batches < 1:
        raise ConfigError("eval_subset_num_batches: must be >= 1 with an eval_loader (the loaders are streams)")
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
        from flamingo_composer.data.dual_loader import validate_microbatch_size

        try:
            validate_microbatch_size(*cfg.data.batch_sizes(), cfg.device_train_microbatch_size)
        except ValueError as exc:
            raise ConfigError(f"device_train_microbatch_size: {exc}") from exc


def _check_model_sources(model: FlamingoModelConfig) -> None:
    """Each model part names exactly one source, and local files named exist (before anything is built)."""
    for section, keys in (
        ("vision", ("name", "custom_config", "config_path")),
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
    """Plain-data view of the validated config (for logging hyperparameters)."""
    return dataclasses.asdict(cfg)
