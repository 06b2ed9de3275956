"""`python train.py` with current backbones: Qwen3 and Gemma-3 LMs (tiny, random) and a SigLIP2-shaped open_clip
timm tower, on the built-in synthetic data, as a user would run them."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from test_train_cli import logged_values
from train_helpers import REPO_ROOT, RUN_YAML, short_run_overrides, small_data, subprocess_env

from flamingo_composer.models.tiny import TINY_LM_CONFIGS, TINY_VISION_CONFIGS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return small_data(tmp_path_factory)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_train_py_trains_a_current_lm_with_a_siglip2_tower(family, data_root, tmp_path):
    recipe = OmegaConf.load(RUN_YAML)
    recipe.model.lm = {"config": TINY_LM_CONFIGS[family], "attn_implementation": "eager"}
    recipe.model.vision = {"custom_config": TINY_VISION_CONFIGS["tiny-siglip2"]}
    path = tmp_path / f"{family}.yaml"
    OmegaConf.save(recipe, path)
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "train.py", str(path), *short_run_overrides(data_root, out, 4)],
        cwd=REPO_ROOT, env=subprocess_env(2), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    log_file = out / "logs-rank0.txt"
    for dataset in ("laion", "mmc4"):
        losses = logged_values(log_file, f"loss/train/{dataset}")
        assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses), (dataset, losses)
    state = torch.load(out / "checkpoints" / "ep0-ba4-rank0.pt", weights_only=False)["state"]["model"]
    assert any(".gated_cross_attn_layer." in key for key in state)
    assert any(key.startswith("model.lang_encoder.model.layers.") for key in state)  # found the layers
    assert state["model.perceiver.latents"].shape[-1] == 64  # the tower's width
