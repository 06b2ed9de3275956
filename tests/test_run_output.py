"""What a run shows a person: the progress bar with running losses, a summary at the end, and flamingo-plot.

One short run through the real entry point (`train.py`'s `main`, run.yaml's defaults: progress bar on, console
dumps off) with a held-out evaluation, the file logger and a W&B offline run; the plot is made from both logs.
"""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
from PIL import Image
from train_helpers import RUN_YAML, short_run_overrides, small_data

from flamingo_composer.cli import plot as plot_run
from flamingo_composer.training.run import configure_package_logging, main
from flamingo_composer.training.run_logs import read_run_metrics

STEPS = 4


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    data_root = small_data(tmp_path_factory)
    out = tmp_path_factory.mktemp("short-run")
    dropped = ("eval_loader=null", "progress_bar=false")  # run.yaml's own progress bar and a held-out evaluation
    overrides = [o for o in short_run_overrides(data_root, out, max_duration=STEPS) if o not in dropped] + [
        f"eval_loader.laion.local={data_root}/mds/laion",
        f"eval_loader.mmc4.local={data_root}/mds/mmc4",
        "eval_loader.laion.batch_size=4",
        "eval_loader.mmc4.batch_size=2",
        "eval_loader.mmc4.preprocess.max_tokens=64",
        "eval_loader.mmc4.preprocess.min_image_bytes=100",
        "eval_interval=2",
        "eval_subset_num_batches=1",
        "loggers.wandb.offline=true",
        "loggers.wandb.project=flamingo-tests",
        f"loggers.wandb.dir={out}",
        "autoresume=false",  # Composer's autoresume asks the W&B logger for a remote checkpoint before wandb.init
    ]
    return out, overrides


@pytest.mark.slow
def test_default_job_prints_progress_and_a_summary_and_its_log_plots(short_run, capfd, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, overrides = short_run
    assert main([str(RUN_YAML), *overrides]) == 0
    captured = capfd.readouterr()
    printed = captured.out + captured.err
    assert re.search(r"loss/train/total=\d", printed)  # the progress bar's running loss
    assert "[batch=" not in printed and "Train loss/train/total" not in printed  # no console metric dumps
    summary = captured.out[captured.out.index("run short-run:"):]
    assert f"run short-run: {STEPS} optimizer steps" in summary
    assert re.search(r"train loss \(last step\): total [\d.]+, laion [\d.]+, mmc4 [\d.]+", summary)
    assert re.search(
        r"held-out \(last evaluation\): laion cross-entropy [\d.]+, accuracy [\d.]+, mmc4 cross-entropy", summary
    )
    assert f"checkpoint: {out / 'checkpoints' / f'ep0-ba{STEPS}-rank0.pt'}" in summary
    assert f"log:        {out / 'logs-rank0.txt'}" in summary
    assert f"plot:       flamingo-plot {out}" in summary
    assert "flamingo-export" in summary and "log_to_console=true" in summary

    for source, folder in (("file", out), ("wandb", next(out.glob("wandb/offline-run-*")))):
        metrics, _ = read_run_metrics(folder)
        png = tmp_path / f"{source}.png"
        assert plot_run.main([str(folder), "--out", str(png)]) == 0
        assert Image.open(png).size[0] > 500
        fig, drawn = plot_run.plot_metrics(metrics)
        assert drawn["train loss"] == ["loss/train/laion", "loss/train/mmc4", "loss/train/total"]
        assert drawn["held-out cross-entropy"] == [
            "metrics/eval/laion/LanguageCrossEntropy", "metrics/eval/mmc4/LanguageCrossEntropy"]
        assert "learning rate" in drawn and drawn["throughput"] == [
            "throughput/samples_per_sec", "throughput/tokens_per_sec"]
        # The curves hold the logged values: STEPS train losses, one held-out value per evaluation.
        lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
        assert list(lines["total"].get_ydata()) == [v for _, v in metrics["loss/train/total"]]
        assert len(lines["total"].get_ydata()) == STEPS
        assert len(lines["laion/LanguageCrossEntropy"].get_ydata()) == STEPS // 2
    assert "train loss: loss/train/laion (4 points)" in capfd.readouterr().out


def test_plot_run_names_what_it_could_not_find(tmp_path, capsys):
    assert plot_run.main([str(tmp_path)]) == 2
    assert "no Composer file log" in capsys.readouterr().err
    (tmp_path / "logs-rank0.txt").write_text("[metric][batch=1]: time/batch: 1 \n")
    assert plot_run.main([str(tmp_path)]) == 2
    assert "none of the plotted metrics" in capsys.readouterr().err


def test_an_empty_wandb_run_file_is_named_not_misread(tmp_path):
    run_folder = tmp_path / "wandb" / "offline-run-20261202_000000-abc"
    run_folder.mkdir(parents=True)
    (run_folder / "run-abc.wandb").touch()  # W&B's service creates it first and writes it later
    with pytest.raises(ValueError, match=r"run-abc\.wandb: the run file is empty"):
        read_run_metrics(tmp_path)


def test_package_log_lines_go_to_the_current_stderr(monkeypatch):
    package_log = logging.getLogger("flamingo_composer")
    monkeypatch.setattr(package_log, "handlers", [])  # as in a fresh process (conftest restores the logger after)
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_package_logging()
    first.close()  # as pytest closes a test's captured stderr; a handler bound to it raised on every later line
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)
    logging.getLogger("flamingo_composer.training").info("a later line")
    (line,) = later.getvalue().splitlines()  # the line itself, not logging's "--- Logging error ---" report
    assert line.endswith("flamingo_composer.training: a later line")
