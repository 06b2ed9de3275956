"""`composer train.py yamls/run.yaml ...` end to end: config errors stop it early, short runs train and save.

These run the real entry point in subprocesses (as a user would); the in-process variants live in the other
training tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import REPO_ROOT, RUN_YAML, short_run_overrides, small_data, subprocess_env

COMPOSER = str(Path(sys.executable).parent / "composer")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return small_data(tmp_path_factory)


def run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def logged_values(log_file: Path, key: str) -> list[float]:
    """Values of one metric in a FileLogger file (lines like `[metric][batch=3]: loss/train/laion: 4.52`)."""
    pattern = re.compile(rf"\[metric\]\[batch=\d+\]: {re.escape(key)}: ([-+0-9.eE]+)")
    return [float(m.group(1)) for m in pattern.finditer(log_file.read_text())]


def test_config_errors_exit_nonzero_before_training(data_root, tmp_path):
    bad_key = run([sys.executable, "train.py", str(RUN_YAML), f"variables.data_root={data_root}", "optimizer.lrr=1"])
    assert bad_key.returncode == 2
    assert "unknown key 'optimizer.lrr' (did you mean 'lr'?)" in bad_key.stderr
    assert "Building" not in bad_key.stdout + bad_key.stderr and "batch=" not in bad_key.stdout
    missing = tmp_path / "no-such-data"
    launched = run([COMPOSER, "-n", "1", "train.py", str(RUN_YAML), f"variables.data_root={missing}"])
    assert launched.returncode != 0
    assert f"MDS index not found: {missing}/mds/laion/train/index.json" in launched.stderr + launched.stdout
    assert not (REPO_ROOT / "runs" / "short-run").exists()


def _check_run(out: Path, world_size: int, max_duration: int) -> None:
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("ep*-ba*-rank0.pt"))
    assert checkpoints == [f"ep0-ba{b}-rank0.pt" for b in range(2, max_duration + 1, 2)]
    for rank in range(world_size):
        log_file = out / f"logs-rank{rank}.txt"
        if rank == 0:
            laion = logged_values(log_file, "loss/train/laion")
            mmc4 = logged_values(log_file, "loss/train/mmc4")
            assert len(laion) == len(mmc4) == max_duration and all(v > 0 for v in laion + mmc4)
            assert re.search(r"\]: data/skipped/(laion|mmc4)/\w+: [1-9]", log_file.read_text())  # bad_every=9
    state = torch.load(out / "checkpoints" / f"ep0-ba{max_duration}-rank0.pt", weights_only=False)["state"]
    keys = set(state["model"])
    # Trainable-only: perceiver, cross-attention blocks, new-token rows; no CLIP or LM weight.
    assert keys and all(
        k.startswith("model.perceiver.") or ".gated_cross_attn_layer." in k or k.endswith("trainable_rows.weight")
        for k in keys
    )
    assert state["timestamp"]["Timestamp"]["batch"] == max_duration
    positions = state["callbacks"]["DataPositionCallback"]["loader"]["positions"]
    assert len(positions["laion"]) == len(positions["mmc4"]) == world_size


def test_composer_n1_runs_to_the_end(data_root, tmp_path):
    result = run([COMPOSER, "-n", "1", "train.py", str(RUN_YAML), *short_run_overrides(data_root, tmp_path, 4)])
    assert result.returncode == 0, result.stderr[-3000:]
    _check_run(tmp_path, world_size=1, max_duration=4)


@pytest.mark.slow
def test_composer_n2_ddp_over_gloo(data_root, tmp_path):
    result = run([COMPOSER, "-n", "2", "train.py", str(RUN_YAML), *short_run_overrides(data_root, tmp_path, 2)])
    assert result.returncode == 0, result.stderr[-3000:]
    _check_run(tmp_path, world_size=2, max_duration=2)
    for rank in (0, 1):
        assert "num_cpus_per_node: 2" in (tmp_path / f"logs-rank{rank}.txt").read_text()  # 2 local ranks
    # Composer all-reduces the logged losses: both ranks report the same global values.
    for key in ("loss/train/laion", "loss/train/mmc4"):
        values = [logged_values(tmp_path / f"logs-rank{rank}.txt", key) for rank in (0, 1)]
        assert len(values[0]) == 2 and values[0] == pytest.approx(values[1], rel=1e-5)
