"""wandb in offline mode records both dataset losses (read back from the offline run files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import RUN_YAML, short_run_overrides, small_data

from flamingo_composer.training.run import load_config, train_from_config


def read_offline_history(wandb_dir: Path) -> list[dict]:
    """History rows of the single offline run under `wandb_dir` (its `run-*.wandb` record log)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    run_files = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    store = datastore.DataStore()
    store.open_for_scan(str(run_files[0]))
    rows = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


@pytest.mark.slow
def test_wandb_offline_records_both_losses(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must come from the config, not the environment
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = short_run_overrides(small_data(tmp_path_factory), tmp_path, max_duration=2)
    overrides += [
        "loggers.wandb.offline=true",
        "loggers.wandb.project=flamingo-tests",
        f"loggers.wandb.dir={tmp_path}",
        "autoresume=false",
        "save_folder=null",
    ]
    trainer = train_from_config(load_config(RUN_YAML, overrides))
    trainer.close()
    rows = read_offline_history(tmp_path)
    for key in ("loss/train/laion", "loss/train/mmc4", "loss/train/total"):
        values = [row[key] for row in rows if key in row]
        assert len(values) == 2 and all(v > 0 for v in values), (key, values)
