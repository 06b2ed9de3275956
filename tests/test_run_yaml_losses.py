"""yamls/run.yaml trains as it did before datasets became named entries of a kind: a short run's losses, step by
step, and its held-out metrics equal the ones recorded from the code before that change
(tests/fixtures/run-yaml-losses.json; how it was made is stored in it).

The run keeps run.yaml's own preprocessing, so the held-out MMC4 entry, which no longer repeats it, must inherit
it from the training entry to give the recorded held-out values. `python tests/test_run_yaml_losses.py OUT.json`
records the values again (in a checkout of the code to record).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
from step_utils import LossRecorder
from train_helpers import RUN_YAML, SMALL_DATA, small_data

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run-yaml-losses.json"
STEPS = 3


def overrides(data_root: Path) -> list[str]:
    """run.yaml made small (its preprocessing and multipliers untouched); microbatches of 2 LAION pairs."""
    return [
        f"variables.data_root={data_root}", f"max_duration={STEPS}", "run_name=run-yaml-losses",
        "data.laion.batch_size=4", "data.laion.num_workers=0", "data.mmc4.batch_size=2", "data.mmc4.num_workers=0",
        "device_train_microbatch_size=2", "eval_loader.laion.batch_size=4", "eval_loader.mmc4.batch_size=2",
        f"eval_interval={STEPS}", "eval_subset_num_batches=1", "scheduler.t_warmup=1", "callbacks={}",
        "loggers={}", "progress_bar=false", "log_to_console=false", "save_folder=null", "autoresume=false",
    ]  # fmt: skip


def run_values(data_root: Path) -> dict:
    """{'train': {step: {loss key: value}}, 'held_out': {metric: value}} of the short run."""
    from flamingo_composer.training.config import load_config
    from flamingo_composer.training.run import train_from_config

    recorder = LossRecorder()
    trainer = train_from_config(load_config(RUN_YAML, overrides(data_root)), extra_callbacks=[recorder])
    held_out = {name: float(value) for name, value in trainer.state.eval_metric_values.items()}
    trainer.close()
    train = {str(step): {k: float(v) for k, v in losses.items()} for step, losses in recorder.losses}
    return {"train": train, "held_out": held_out}


def test_run_yaml_repeats_the_recorded_losses(tmp_path_factory):
    recorded = json.loads(FIXTURE.read_text())
    now = run_values(small_data(tmp_path_factory))
    assert now["train"].keys() == recorded["train"].keys() == {str(s) for s in range(1, STEPS + 1)}
    for step, losses in recorded["train"].items():
        assert now["train"][step].keys() == losses.keys(), step
        for key, value in losses.items():
            assert now["train"][step][key] == pytest.approx(value, rel=1e-5), (step, key)
    assert now["held_out"].keys() == recorded["held_out"].keys()
    for key, value in recorded["held_out"].items():
        assert now["held_out"][key] == pytest.approx(value, rel=1e-5), key


def record(path: Path) -> None:
    """Write the fixture from the code of this checkout (fresh synthetic data, as the test generates it)."""
    import subprocess

    import torch

    from flamingo_composer.shards.synthetic import write_synthetic_dataset

    torch.manual_seed(0)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / "synthetic"
        write_synthetic_dataset(data_root, SMALL_DATA)
        values = run_values(data_root)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    values["made_by"] = (
        f"python tests/test_run_yaml_losses.py at commit {commit} (before datasets became named entries of a "
        f"kind), torch {torch.__version__}, 2 threads, CPU; overrides of yamls/run.yaml: see overrides()"
    )
    path.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1]))
