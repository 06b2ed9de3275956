"""flamingo-sweep: a base recipe + a grid -> validated concrete YAMLs with unique names and folders; run / print /
Slurm."""

from __future__ import annotations

import json
import subprocess

import pytest
from omegaconf import OmegaConf
from train_helpers import RUN_YAML, short_run_overrides, small_data

from flamingo_composer.cli import sweep as sweep_tool
from flamingo_composer.training.config import load_config

# 2 x 2: 3 attention heads do not divide the LM's hidden size 64, so those points fail when the model is built
# (after validation, like a run that crashes): the sweep must go on past them.
GRID = {"optimizer.lr": [1.0e-3, 5.0e-3], "model.lm.config.num_attention_heads": [4, 3]}


@pytest.fixture
def sweep_file(tmp_path_factory, tmp_path):
    data_root = small_data(tmp_path_factory)
    path = tmp_path / "sweeps" / "tiny.yaml"
    path.parent.mkdir()
    OmegaConf.save(OmegaConf.create({
        "recipe": str(RUN_YAML),
        "out": str(tmp_path / "out"),
        "overrides": short_run_overrides(data_root, tmp_path / "shared", max_duration=2),
        "grid": GRID,
    }), path)
    return path


def test_grid_expands_to_validated_concrete_yamls_with_unique_names_and_folders(sweep_file, tmp_path, capsys):
    assert sweep_tool.main([str(sweep_file), "--print"]) == 0
    index = json.loads((tmp_path / "out" / "sweep.json").read_text())
    points = index["points"]
    assert [p["run_name"] for p in points] == [f"tiny-{i:02d}" for i in range(4)]
    assert [p["params"] for p in points] == [
        {"optimizer.lr": lr, "model.lm.config.num_attention_heads": heads} for lr in GRID["optimizer.lr"]
        for heads in GRID["model.lm.config.num_attention_heads"]
    ]
    configs = [load_config(p["yaml"]) for p in points]  # concrete: no base, no interpolation left
    for point, cfg in zip(points, configs):
        assert cfg.run_name == point["run_name"] and cfg.autoresume
        assert cfg.optimizer.lr == point["params"]["optimizer.lr"]
        assert cfg.model.lm.config["num_attention_heads"] == point["params"]["model.lm.config.num_attention_heads"]
        assert cfg.save_folder == f"{point['run_dir']}/checkpoints"
        assert cfg.loggers["file"]["filename"] == f"{point['run_dir']}/logs-rank{{rank}}.txt"
        assert cfg.max_duration == "2ba"  # the sweep's common overrides
    assert len({c.save_folder for c in configs}) == 4 and len({c.loggers["file"]["filename"] for c in configs}) == 4
    assert "${" not in (tmp_path / "out" / "points" / "tiny-00.yaml").read_text()
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("composer ")]
    assert commands == [f"composer {sweep_tool.REPO_ROOT / 'train.py'} {p['yaml']}" for p in points]


def test_slurm_array_script(sweep_file, tmp_path):
    script = tmp_path / "slurm.sh"
    assert sweep_tool.main([str(sweep_file), "--slurm", str(script), "--nproc", "8"]) == 0
    text = script.read_text()
    assert "#SBATCH --array=0-3" in text and "composer -n 8 train.py" in text and ".finished" in text
    for i in range(4):
        assert str(tmp_path / "out" / "points" / f"tiny-{i:02d}.yaml") in text
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_an_invalid_point_stops_the_sweep_before_anything_runs(sweep_file, tmp_path, capsys):
    data = OmegaConf.load(sweep_file)
    data.grid = {"optimizer.lr": [1.0e-3, -1.0]}
    OmegaConf.save(data, sweep_file)
    assert sweep_tool.main([str(sweep_file), "--print"]) == 2
    err = capsys.readouterr().err
    assert "sweep point 1 (optimizer.lr=-1.0)" in err and "optimizer.lr" in err
    assert not (tmp_path / "out" / "points").exists()
    data.grid = {"optimizr.lr": [1.0e-3]}
    OmegaConf.save(data, sweep_file)
    assert sweep_tool.main([str(sweep_file), "--print"]) == 2
    assert "unknown key 'optimizr'" in capsys.readouterr().err
    data.pop("grid")
    OmegaConf.save(data, sweep_file)
    assert sweep_tool.main([str(sweep_file)]) == 2
    assert "missing required key 'sweep.grid'" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_runs_points_to_the_end_past_a_failure_and_skips_finished_ones(sweep_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert sweep_tool.main([str(sweep_file), "--only", "0,1,2", "--nproc", "1"]) == 1  # point 1 fails
    out = capsys.readouterr().out
    summary = out[out.index("sweep summary:"):]
    assert "tiny-00" in summary and "tiny-02" in summary
    assert [line.split()[1] for line in summary.splitlines() if "FAILED" in line] == ["tiny-01"]
    for name in ("tiny-00", "tiny-02"):
        run_dir = tmp_path / "out" / name
        assert (run_dir / "checkpoints" / "ep0-ba2-rank0.pt").exists(), name  # trained to max_duration
        assert (run_dir / ".finished").exists() and (run_dir / "logs-rank0.txt").exists()
    assert not (tmp_path / "out" / "tiny-01" / ".finished").exists()
    assert "ValueError: The hidden size is not divisible by the number of attention heads" in summary

    assert sweep_tool.main([str(sweep_file), "--only", "0,2", "--nproc", "1"]) == 0  # started again
    out = capsys.readouterr().out
    assert out.count("finished before, skipped") == 2 and "running" not in out
