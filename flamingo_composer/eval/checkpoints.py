"""Recipes and checkpoints for the standalone tools (flamingo-evaluate, flamingo-generate).

A recipe is a training YAML; the tools read only its `model:` and `evaluators:` sections (validated like the
training config), so evaluating needs neither the training data nor its paths. A checkpoint is either ours (a
Composer checkpoint written by train.py: trainable weights under `state.model`, frozen ones rebuilt from the
recipe) or a released OpenFlamingo `checkpoint.pt` (a plain state dict of the trainable parameters).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

COMPOSER_MODEL_PREFIX = "model."  # FlamingoComposerModel keeps the Flamingo module as `self.model`


def read_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Any, list]:
    """(FlamingoModelConfig, [EvaluatorConfig]) from a recipe's `model:` and `evaluators:` sections."""
    from omegaconf import OmegaConf as om

    from flamingo_composer.config_schema import ConfigError, _coerce, from_dict
    from flamingo_composer.eval.config import EvaluatorConfig
    from flamingo_composer.models.factory import FlamingoModelConfig
    from flamingo_composer.training.recipe import load_recipe_yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    cfg = load_recipe_yaml(path)  # a recipe's `base:` files merged in
    if overrides:
        cfg = om.merge(cfg, om.from_dotlist(list(overrides)))
    raw = om.to_container(cfg, resolve=True)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ConfigError(f"{path}: no 'model:' section")
    model = from_dict(FlamingoModelConfig, raw["model"], "model")
    evaluators = _coerce(raw.get("evaluators") or [], list[EvaluatorConfig], "evaluators")
    return model, evaluators


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Composer checkpoints hold more than tensors (timestamps, RNG states): a full unpickle, which runs
        # code from the file, so only load checkpoints you trust (as Composer itself does).
        return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(model: torch.nn.Module, path: str | Path, weights: str = "auto") -> dict[str, Any]:
    """Load our Composer checkpoint or a released `checkpoint.pt` into `model` (our Flamingo); returns a summary.

    `weights` (ours only): 'auto' = the EMA average when the checkpoint holds one, else the trained weights;
    'ema' or 'raw' to choose (training/ema.py). A released checkpoint has raw weights only.
    """
    from flamingo_composer.models.reference_checkpoint import load_reference_state_dict
    from flamingo_composer.training.ema import WEIGHT_CHOICES, checkpoint_weights

    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights: must be one of {list(WEIGHT_CHOICES)}, got {weights!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raw = _load(path)
    state = raw.get("state") if isinstance(raw, dict) else None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        chosen_weights, chosen = checkpoint_weights(raw, weights)
        tensors = {
            k[len(COMPOSER_MODEL_PREFIX) :]: v
            for k, v in chosen_weights.items()
            if k.startswith(COMPOSER_MODEL_PREFIX) and torch.is_tensor(v)
        }
        report = load_reference_state_dict(model, tensors, layout="checkpoint")
        kind = "composer"
    else:
        if weights == "ema":
            raise ValueError(f"{path} is a released checkpoint: it holds no EMA weights (use --weights raw)")
        report = load_reference_state_dict(model, raw, layout="checkpoint")
        kind, chosen = "openflamingo", "raw"
    return {"path": str(path), "format": kind, "weights": chosen, "tensors_loaded": len(report.loaded)}
