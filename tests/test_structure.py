"""Module layering: the registries are a leaf both the config and the builders import; one dict->dataclass validator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flamingo_composer.config_schema import ConfigError
from flamingo_composer.models.factory import FlamingoModelConfig
from flamingo_composer.models.tiny import tiny_model_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def _modules_loaded_by(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.startswith('flamingo_composer')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def test_registries_are_a_leaf_of_config_and_builders():
    loaded = _modules_loaded_by("flamingo_composer.training.registry")
    assert "flamingo_composer.training.config" not in loaded
    assert "flamingo_composer.training.builders" not in loaded
    config_loads = _modules_loaded_by("flamingo_composer.training.config")
    assert "flamingo_composer.training.registry" in config_loads
    assert "flamingo_composer.training.builders" not in config_loads


def test_config_schema_depends_on_nothing_of_the_package():
    assert _modules_loaded_by("flamingo_composer.config_schema") == {"flamingo_composer", "flamingo_composer.config_schema"}


def test_model_config_uses_the_training_config_validator():
    """FlamingoModelConfig.from_dict is the same validator as the YAML's: dotted keys, types, suggestions."""
    import dataclasses

    data = dataclasses.asdict(tiny_model_config("llama"))
    with pytest.raises(ConfigError, match=r"model.cross_attn_every_n_layers: expected int, got str 'two'"):
        FlamingoModelConfig.from_dict({**data, "cross_attn_every_n_layers": "two"})
    with pytest.raises(ConfigError, match=r"unknown key 'model.lm.nmae' \(did you mean 'name'\?\)"):
        FlamingoModelConfig.from_dict({**data, "lm": {"nmae": "x"}})
    with pytest.raises(ConfigError, match="model.lm.trust_remote_code: only applies with lm.name"):
        FlamingoModelConfig.from_dict({**data, "lm": {"config": {"model_type": "llama"}, "trust_remote_code": True}})
