"""Shared set-up for the training-entry-point tests: small synthetic data and short-run overrides of run.yaml."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from data_loader_helpers import synthetic_once

from flamingo_composer.shards.synthetic import SYNTHETIC_MIN_IMAGE_BYTES, SyntheticConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_YAML = REPO_ROOT / "yamls" / "run.yaml"


def rank_launcher(ranks: int) -> list[str]:
    """The command that starts a test harness script on `ranks` local processes: torchrun (standalone: a free
    port). It sets what Composer reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT)
    except NODE_RANK, which Composer requires once distributed is initialised: set here.

    Composer's own launcher takes ~12 s more per start (its imports and shutdown wait; 14 s against 2 s for a
    no-op script on 2 ranks), and the distributed tests start about a dozen runs. `composer -n` itself is what
    the entry-point tests use (`train.py`, `flamingo-evaluate` in test_train_cli and test_eval_integration).
    """
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return ["env", "NODE_RANK=0", torchrun, "--standalone", f"--nproc_per_node={ranks}"]


# Every 9th sample is broken, so the runs also exercise (and log) skipped samples.
SMALL_DATA = SyntheticConfig(
    num_laion=96, num_laion_val=16, num_mmc4=48, num_mmc4_val=8, image_size=32,
    laion_shard_size=24, mmc4_shard_size=12, mds_size_limit=1 << 14, bad_every=9,
)  # fmt: skip


def small_data(tmp_path_factory) -> Path:
    """The training tests' small synthetic data set (wds + mds)."""
    return synthetic_once(tmp_path_factory, "train-data", SMALL_DATA)


def short_run_overrides(data_root: Path, out_dir: Path, max_duration: int = 3) -> list[str]:
    """run.yaml made tiny: small batches, short sequences, no workers, no eval, checkpoints every 2 batches."""
    return [
        f"variables.data_root={data_root}",
        f"max_duration={max_duration}",
        "run_name=short-run",
        "data.laion.batch_size=4",
        "data.laion.num_workers=0",
        "data.mmc4.batch_size=2",
        "data.mmc4.num_workers=0",
        "data.mmc4.preprocess.max_tokens=64",
        f"data.mmc4.preprocess.min_image_bytes={SYNTHETIC_MIN_IMAGE_BYTES}",
        "eval_loader=null",
        "scheduler.t_warmup=1",
        "callbacks.speed_monitor.window_size=1",
        "callbacks.data_skips.log_interval=1",
        "console_log_interval=1",
        f"save_folder={out_dir}/checkpoints",
        "save_interval=2",
        f"loggers.file.filename={out_dir}/logs-rank{{rank}}.txt",
        "loggers.file.flush_interval=1",
        "progress_bar=false",  # run.yaml shows one; tests read the logs (pytest's capsys has no terminal for it)
    ]


# The multi-dataset runs add a third dataset to run.yaml's laion (pairs, multiplier 1.0) and mmc4 (interleaved): a
# second pairs dataset with its own multiplier, seed and batch size, reading the synthetic pairs in another order.
THIRD = "cc"


def third_dataset_overrides(data_root: Path, fmt: str = "mds", *, batch_size: int = 2, num_workers: int = 0,
                            loss_multiplier: float = 0.5) -> list[str]:  # fmt: skip
    """Overrides that add the pairs dataset `THIRD` (after laion and mmc4 in config order: laion stays the lead)."""
    key = f"data.{THIRD}"
    if fmt == "wds":
        count = len(list((data_root / "wds" / "laion").glob("train-*.tar")))
        source = [f"{key}.format=wds", f"{key}.shards={data_root}/wds/laion/train-{{000000..{count - 1:06d}}}.tar",
                  f"{key}.shuffle_buffer=8"]  # fmt: skip
    else:
        source = [f"{key}.format=mds", f"{key}.local={data_root}/mds/laion", f"{key}.split=train"]
    return [
        f"{key}.kind=pairs", *source, f"{key}.batch_size={batch_size}", f"{key}.num_workers={num_workers}",
        f"{key}.loss_multiplier={loss_multiplier}", f"{key}.seed=3",
    ]  # fmt: skip


def subprocess_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline"
    )
    return env
