"""Recipe composition: a YAML may name `base:` files that are merged underneath it (OmegaConf merge).

    base: openflamingo-base.yaml        # or a list, merged in order; paths relative to this file
    run_name: openflamingo-3b-vitl-mpt1b
    model: {cross_attn_every_n_layers: 1}

A base may have its own `base:`. Mappings merge key by key (the including file wins), lists and scalars are
replaced, interpolations resolve after the merge (so a base can refer to `${run_name}` of the file on top).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig
from omegaconf import OmegaConf as om

from flamingo_composer.config_schema import ConfigError

BASE_KEY = "base"

__all__ = ["BASE_KEY", "load_recipe_yaml"]


def load_recipe_yaml(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> DictConfig:
    """The YAML at `path` with its `base:` files merged underneath (unresolved; `base` itself removed)."""
    path = Path(path)
    where = f"{_chain[-1]}: base" if _chain else "config file"
    if not path.is_file():
        raise ConfigError(f"{where} not found: {path}")
    if path.resolve() in (p.resolve() for p in _chain):
        raise ConfigError(f"recipe bases form a cycle: {' -> '.join(str(p) for p in (*_chain, path))}")
    cfg = om.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    bases = cfg.pop(BASE_KEY, None)
    if bases is None:
        return cfg
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, ListConfig | list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY}: expected a file name or a list of file names, got {bases!r}")
    merged = [load_recipe_yaml(path.parent / base, (*_chain, path)) for base in bases]
    return om.merge(*merged, cfg)
