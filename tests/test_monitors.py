"""The monitors (training/monitors.py): a NaN stops the run naming the step, the dataset and the checkpoint; a
planted loss spike is detected; the cross-attention gates appear in the file log and in flamingo-plot."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from composer import Callback
from step_utils import dual_batch, one_step_trainer, tiny_bundle
from train_helpers import RUN_YAML, short_run_overrides, small_data

from flamingo_composer.training import run as run_module
from flamingo_composer.training.config import load_config
from flamingo_composer.training.monitors import LossSpikeMonitor, NonFiniteMonitor, TrainingStopped
from flamingo_composer.training.run import train_from_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return small_data(tmp_path_factory)


class NaNImages(Callback):
    """Fills the images of `dataset`'s microbatch of step `step` with NaN (a broken batch)."""

    def __init__(self, step: int, dataset: str):
        self.step, self.dataset = step, dataset

    def before_forward(self, state, logger):
        if int(state.timestamp.batch) + 1 == self.step and self.dataset in state.batch:
            state.batch[self.dataset]["images"].fill_(float("nan"))  # (N, 3, H, W), normalised on the device


def test_a_nan_in_a_batch_stops_the_run_naming_step_dataset_and_last_checkpoint(data_root, tmp_path):
    cfg = load_config(RUN_YAML, [*short_run_overrides(data_root, tmp_path, 4), "save_interval=1", "loggers={}"])
    with pytest.raises(TrainingStopped) as stopped:
        train_from_config(cfg, extra_callbacks=[NaNImages(step=3, dataset="mmc4")])
    message = str(stopped.value)
    assert "non-finite training loss at step 3 in dataset mmc4" in message and "loss/train/mmc4 = nan" in message
    assert f"last checkpoint: {tmp_path / 'checkpoints' / 'ep0-ba2-rank0.pt'}" in message
    assert not (tmp_path / "checkpoints" / "ep0-ba3-rank0.pt").exists()  # the bad step is never saved


def test_non_finite_gradients_with_a_finite_loss_are_caught_and_named():
    bundle = tiny_bundle()
    hook = {}

    class NaNGradient(Callback):  # poisons the gradient of the MMC4 microbatch's backward, not its loss
        def before_backward(self, state, logger):
            if "mmc4" in state.batch:
                hook["h"] = bundle.model.perceiver.latents.register_hook(lambda g: g * float("nan"))

        def after_backward(self, state, logger):
            if "h" in hook:
                hook.pop("h").remove()

    trainer = one_step_trainer(bundle.model, dual_batch(bundle.tokenizer), microbatch_size=2, clip=None,
                               callbacks=[NaNGradient(), NonFiniteMonitor()])  # fmt: skip
    with pytest.raises(TrainingStopped, match=r"non-finite gradients at step 1, first after the backward of dataset "
                                              r"mmc4; no checkpoint written yet"):  # fmt: skip
        trainer.fit()
    trainer.close()


def test_train_py_reports_a_stopped_run_in_one_line(monkeypatch, capsys):
    def stops(cfg):
        raise TrainingStopped("non-finite training loss at step 7 in dataset laion (...); last checkpoint: X")

    monkeypatch.setattr(run_module, "load_config", lambda *a: SimpleNamespace())
    monkeypatch.setattr(run_module, "train_from_config", stops)
    assert run_module.main(["any.yaml"]) == 1
    assert capsys.readouterr().err.strip() == (
        "training stopped: non-finite training loss at step 7 in dataset laion (...); last checkpoint: X"
    )


class _Logger:
    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics):
        self.metrics.append(metrics)


def _feed(monitor, losses, logger, start: int = 1):
    for step, loss in enumerate(losses, start):
        state = SimpleNamespace(total_loss_dict={"loss/train/total": loss}, timestamp=SimpleNamespace(batch=step),
                                callbacks=[], run_name="r")  # fmt: skip
        monitor.batch_end(state, logger)


def test_a_planted_loss_spike_is_detected_logged_and_stops_the_run_when_asked():
    steady = [2.0 + 0.05 * (i % 3) for i in range(10)]
    logger = _Logger()
    monitor = LossSpikeMonitor(window=5, multiplier=2.0, patience=2)
    _feed(monitor, [*steady, 9.0, *steady[:3]], logger)
    assert [step for step, _, _ in monitor.spikes] == [11]
    assert logger.metrics == [{"monitors/loss_spike": pytest.approx(9.0 / (sum(steady[5:10]) / 5))}]
    restored = LossSpikeMonitor(window=5, multiplier=2.0, patience=2, stop=True)
    restored.load_state_dict(monitor.state_dict())  # the window survives a resume
    _feed(restored, [9.0], logger, start=15)
    assert [step for step, _, _ in restored.spikes] == [15]  # detected from the first step after the resume
    with pytest.raises(TrainingStopped, match="for 2 steps in a row, at step 16"):
        _feed(restored, [9.5], logger, start=16)
    quiet = LossSpikeMonitor(window=5, multiplier=2.0)
    _feed(quiet, [*steady, 3.0, *steady], _Logger())
    assert quiet.spikes == []  # below 2x the mean: no spike
    with pytest.raises(ValueError, match="multiplier: must be > 1"):
        LossSpikeMonitor(multiplier=1.0)


def test_gate_metrics_are_logged_every_interval_and_plotted(data_root, tmp_path, capsys):
    cfg = load_config(RUN_YAML, [*short_run_overrides(data_root, tmp_path, 3), "callbacks.xattn_gates.interval=1",
                                 "save_folder=null", "autoresume=false"])  # fmt: skip
    trainer = train_from_config(cfg)
    trainer.close()
    log = (tmp_path / "logs-rank0.txt").read_text()
    blocks = [f"layer_{i:02d}" for i in range(2)]  # run.yaml: 2 LM layers, a block before each
    for step in (1, 2, 3):
        for gate in ("attn", "ff"):
            for layer in blocks:
                assert f"[metric][batch={step}]: xattn_gates/{gate}/{layer}: " in log
    gates = trainer.state.model.model.lang_encoder.gpt_neox.layers[1].gated_cross_attn_layer
    assert f"xattn_gates/attn/layer_01: {torch.tanh(gates.attn_gate).item():.4f}" in log  # the last step's value
    from flamingo_composer.cli import plot
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "curves.png")]) == 0
    printed = capsys.readouterr().out
    assert "cross-attention gates: tanh(attn_gate): xattn_gates/attn/layer_00 (3 points)" in printed
    assert "cross-attention gates: tanh(ff_gate): xattn_gates/ff/layer_00 (3 points)" in printed
    assert "z-loss: loss/train/z_loss/laion" in printed
    assert (tmp_path / "curves.png").stat().st_size > 0
