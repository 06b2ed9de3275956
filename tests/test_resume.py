"""Exact resume: a run stopped at step k and resumed with autoresume gives the losses of a run that never stopped.

Through the real entry point (`train_from_config` on yamls/run.yaml plus a third named dataset: laion and cc of
kind pairs with their own loss multipliers, mmc4 interleaved), MDS or webdataset data with rejected samples
(every 9th synthetic sample is broken) read by 2 DataLoader workers for laion and mmc4, none for cc (webdataset:
the readers' shard cursors travel through the Composer checkpoint). Both runs have the same max_duration, so
the schedule is the same; the interrupted one stops after k steps (`Trainer.fit(duration=...)`), which saves a
checkpoint, and a fresh Trainer resumes from it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from step_utils import LossRecorder
from train_helpers import RUN_YAML, THIRD, short_run_overrides, small_data, third_dataset_overrides

from flamingo_composer.training.config import load_config
from flamingo_composer.training.run import train_from_config

TOTAL_STEPS, STOP_AT = 6, 3
KEYS = ("loss/train/total", "loss/train/laion", "loss/train/mmc4", f"loss/train/{THIRD}")


def _webdataset(data_root: Path) -> list[str]:
    overrides = []
    for name in ("laion", "mmc4"):
        count = len(list((data_root / "wds" / name).glob("train-*.tar")))
        overrides += [f"data.{name}.format=wds", f"data.{name}.local=null", f"data.{name}.split=null",
                      f"data.{name}.shards={data_root}/wds/{name}/train-{{000000..{count - 1:06d}}}.tar",
                      f"data.{name}.shuffle_buffer=8"]  # fmt: skip
    return overrides


def _config(data_root: Path, out: Path, fmt: str):
    overrides = short_run_overrides(data_root, out, max_duration=TOTAL_STEPS) + [
        "data.laion.num_workers=2",
        "data.mmc4.num_workers=2",
        "save_interval=1",
        "autoresume=true",
        "loggers={}",
        "callbacks.speed_monitor.window_size=1",
    ]
    webdataset = _webdataset(data_root) if fmt == "wds" else []
    return load_config(RUN_YAML, overrides + webdataset + third_dataset_overrides(data_root, fmt))


def _run(cfg, duration: str | None = None) -> list[tuple[int, dict[str, float]]]:
    recorder = LossRecorder()
    trainer = train_from_config(cfg, extra_callbacks=[recorder], fit=False)
    trainer.fit(duration=duration) if duration else trainer.fit()
    trainer.close()
    return recorder.losses


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_resumed_run_repeats_the_uninterrupted_losses(tmp_path_factory, tmp_path, fmt):
    data_root = small_data(tmp_path_factory)
    uninterrupted = _run(_config(data_root, tmp_path / "straight", fmt))
    assert [step for step, _ in uninterrupted] == list(range(1, TOTAL_STEPS + 1))

    interrupted_cfg = _config(data_root, tmp_path / "interrupted", fmt)
    first = _run(interrupted_cfg, duration=f"{STOP_AT}ba")
    assert [step for step, _ in first] == list(range(1, STOP_AT + 1))
    assert (tmp_path / "interrupted" / "checkpoints" / f"ep0-ba{STOP_AT}-rank0.pt").exists()
    resumed = _run(_config(data_root, tmp_path / "interrupted", fmt))
    assert [step for step, _ in resumed] == list(range(STOP_AT + 1, TOTAL_STEPS + 1))

    straight = dict(uninterrupted)
    for step, losses in first + resumed:
        for key in KEYS:
            assert losses[key] == pytest.approx(straight[step][key], abs=1e-6), (step, key)
    for _, losses in uninterrupted:  # each dataset's token mean under its name, weighted by its multiplier
        weighted = losses["loss/train/laion"] + losses["loss/train/mmc4"] + 0.5 * losses[f"loss/train/{THIRD}"]
        assert losses["loss/train/total"] == pytest.approx(weighted, rel=1e-5)
    # The losses move, so equal values are not a constant: the resumed run continues the trained weights.
    assert len({round(losses["loss/train/total"], 6) for _, losses in uninterrupted}) == TOTAL_STEPS
