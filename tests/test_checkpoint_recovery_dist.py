"""Real kills of a 2-rank FSDP2 job (torchrun over gloo, `tests/dist_train.py` on run.yaml plus a third named
dataset), `state_dict_type: full` (a monolithic `.pt` from rank 0, the format a kill during the save used to leave
half-written).

Every process of the job is SIGKILLed 3 times at random moments while checkpoint writes are slowed (as a large
model's save takes long, so most moments fall inside a write), then the same command finishes the run: it ends on
the uninterrupted run's weights.
Planted damage (partial, truncated, missing checkpoints) in each format: test_checkpoint_recovery.py.
"""

from __future__ import annotations

import contextlib
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from train_helpers import (
    REPO_ROOT,
    SYNTHETIC_MIN_IMAGE_BYTES,
    THIRD,
    rank_launcher,
    small_data,
    subprocess_env,
    third_dataset_overrides,
)

# Each start is killed within a second after its 2nd or 3rd step (the save after a step takes longer than that),
# so 3 starts get at most 9 of the 12 steps done: every kill hits a running job.
STEPS, SLOW_SAVE_S, KILL_WITHIN_S = 12, 0.8, 1.0
FULL = "fsdp_config={version: 2, state_dict_type: full}"
pytestmark = pytest.mark.slow


def overrides(data_root: Path, save_folder: Path, keep: int) -> list[str]:
    return [
        f"variables.data_root={data_root}", f"max_duration={STEPS}", "run_name=recovery",
        "data.laion.batch_size=4", "data.laion.num_workers=0", "data.mmc4.batch_size=2", "data.mmc4.num_workers=0",
        "data.mmc4.preprocess.max_tokens=64", f"data.mmc4.preprocess.min_image_bytes={SYNTHETIC_MIN_IMAGE_BYTES}",
        "eval_loader=null", "scheduler.t_warmup=1", "callbacks={}", "loggers={}", "save_interval=1",
        f"save_num_checkpoints_to_keep={keep}", "autoresume=true", "log_to_console=false",
        f"save_folder={save_folder}", FULL, "device_train_microbatch_size=2", *third_dataset_overrides(data_root),
    ]  # fmt: skip


def command(out: Path, args: list[str], slow_save: float | None = None) -> list[str]:
    slow = ["--slow-save", str(slow_save)] if slow_save else []
    return [*rank_launcher(2), str(REPO_ROOT / "tests" / "dist_train.py"), str(out), *slow, *args]


def launch(out: Path, args: list[str]) -> tuple[dict, str]:
    """Run to the end; (dist_train's record, the output)."""
    result = subprocess.run(command(out, args), cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return torch.load(out, weights_only=False), output


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return small_data(tmp_path_factory)


def kill_every_process(job: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as a preemption does (torchrun starts each rank in a session
    of its own, so the launcher's process group alone would leave the ranks running)."""
    try:
        processes = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return  # that start already finished
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)


def steps_done(out: Path) -> int:
    """How many steps this start has run (dist_train's record, rewritten by rank 0 after each step)."""
    try:
        return len(torch.load(out, weights_only=False)["losses"])
    except (OSError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError):  # not yet written, or mid-write
        return 0


def test_fsdp2_full_killed_three_times_at_random_moments_ends_on_the_uninterrupted_weights(
    data_root, tmp_path
):
    """Each kill comes at a random moment after a random step (the 2nd or 3rd) of that start; the same command then
    finishes the run."""
    reference, _ = launch(tmp_path / "reference.pt", overrides(data_root, tmp_path / "uninterrupted", keep=-1))
    args = overrides(data_root, tmp_path / "checkpoints", keep=2)
    chance = random.Random(28)  # fixed seed: the same moments every time
    for attempt in range(3):
        out, log_path = tmp_path / f"killed-{attempt}.pt", tmp_path / f"killed-{attempt}.log"
        after_step, delay = chance.randint(2, 3), chance.uniform(0.0, KILL_WITHIN_S)
        with open(log_path, "w") as log:
            job = subprocess.Popen(command(out, args, SLOW_SAVE_S), cwd=REPO_ROOT, env=subprocess_env(),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            deadline = time.monotonic() + 240
            while steps_done(out) < after_step and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(delay)
            kill_every_process(job)
            assert job.wait(timeout=60) == -signal.SIGKILL, log_path.read_text()[-3000:]  # killed while running

    run, output = launch(tmp_path / "final.pt", args)
    (tmp_path / "final.log").write_text(output)

    assert min(run["losses"]) > 1, output[-3000:]  # it continued from a checkpoint of the killed starts
    for step, logged in run["losses"].items():
        for key in ("loss/train/total", f"loss/train/{THIRD}"):
            assert logged[key] == reference["losses"][step][key], (step, key)
    assert run["trainable"].keys() == reference["trainable"].keys()
    for name, value in reference["trainable"].items():
        assert torch.equal(run["trainable"][name], value), name
