"""Module layering: the registries are a leaf both the config and the builders import; one dict->dataclass validator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flamingo_composer.config_schema import ConfigError
from flamingo_composer.models.factory import FlamingoModelConfig
from flamingo_composer.models.tiny import tiny_model_config

REPO_ROOT = Path(__file__).resolve().parent.parent


# One fresh interpreter imports each module in turn and reports the package modules it loaded, forgetting them
# (from sys.modules) before the next: one start-up (composer's import takes ~20 s) instead of one per module.
_IMPORT_EACH = """
import importlib, json, sys
loaded = {}
for module in sys.argv[1:]:
    importlib.import_module(module)
    loaded[module] = sorted(m for m in sys.modules if m.startswith("flamingo_composer"))
    for m in loaded[module]:
        del sys.modules[m]
print(json.dumps(loaded))
"""
CHECKED = (
    "flamingo_composer.config_schema", "flamingo_composer.training.registry", "flamingo_composer.training.config"
)


@pytest.fixture(scope="module")
def loaded_by() -> dict[str, set[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *CHECKED], capture_output=True, text=True, cwd=REPO_ROOT, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {module: set(names) for module, names in json.loads(done.stdout.splitlines()[-1]).items()}


def test_registries_are_a_leaf_of_config_and_builders(loaded_by):
    assert "flamingo_composer.training.config" not in loaded_by["flamingo_composer.training.registry"]
    assert "flamingo_composer.training.builders" not in loaded_by["flamingo_composer.training.registry"]
    assert "flamingo_composer.training.registry" in loaded_by["flamingo_composer.training.config"]
    assert "flamingo_composer.training.builders" not in loaded_by["flamingo_composer.training.config"]


def test_config_schema_depends_on_nothing_of_the_package(loaded_by):
    assert loaded_by["flamingo_composer.config_schema"] == {"flamingo_composer", "flamingo_composer.config_schema"}


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


def test_make_test_lints_first_with_the_line_length_the_code_keeps():
    """CI runs `make test`: ruff before pytest, and E501 is not switched off (the configured length means it)."""
    import tomllib

    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest: ")[1].split("\n\n")[0].splitlines()[1:]
    commands = [line.strip() for line in recipe]
    assert commands[0] == "$(BIN)/ruff check ." and commands[1].startswith("$(BIN)/python -m pytest"), commands
    ruff = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    assert "E501" not in ruff["lint"].get("ignore", []) and "E" in ruff["lint"]["select"]
    assert ruff["line-length"] == 120
