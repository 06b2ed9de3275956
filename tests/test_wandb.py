"""wandb in offline mode records both dataset losses (read back from the offline run files), in a fresh run with
autoresume on, as the released recipes combine them (Composer asks W&B for a checkpoint before it is initialised)."""

from __future__ import annotations

import pytest
import wandb
from train_helpers import RUN_YAML, short_run_overrides, small_data

from flamingo_composer.training.run import load_config, train_from_config
from flamingo_composer.training.run_logs import read_wandb_offline


@pytest.mark.slow
def test_wandb_offline_records_both_losses(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must come from the config, not the environment
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = short_run_overrides(small_data(tmp_path_factory), tmp_path, max_duration=2)
    overrides += [
        "loggers.wandb.offline=true",
        "loggers.wandb.project=flamingo-tests",
        f"loggers.wandb.dir={tmp_path}",
        "autoresume=true",  # with save_folder (from short_run_overrides) and no checkpoint there yet
    ]
    trainer = train_from_config(load_config(RUN_YAML, overrides))
    trainer.close()  # wandb.finish(): the run is marked finished, but the service may still be writing its file
    wandb.teardown()  # joins the service process, so the run file is complete (as at the end of a train.py run)
    (run_folder,) = tmp_path.glob("wandb/offline-run-*")
    history = read_wandb_offline(run_folder)
    for key in ("loss/train/laion", "loss/train/mmc4", "loss/train/total"):
        values = history[key]
        assert len(values) == 2 and all(v > 0 for _, v in values), (key, values)
