"""FSDP2 for real, on CPU: 2 processes (torchrun, see `rank_launcher`) over gloo run `tests/dist_train.py`
(train_from_config on run.yaml with a third named dataset: laion and cc of kind pairs with their own loss
multipliers, mmc4 interleaved).

- FSDP2 (sharded state dicts, microbatching) gives DDP's per-step losses, pre-clip gradient norms, FLOPs and
  trainable parameters; every parameter is a DTensor shard; frozen parameters get no gradient.
- Killed after step 3 (SIGKILL, not a clean end) and autoresumed in a new process, DDP, FSDP2 sharded and FSDP2
  full (with activation checkpointing) repeat the uninterrupted DDP run; checkpoints hold no frozen weight.
- A sharded checkpoint written by 2 ranks resumes on 1.
- Every run has the `ema` algorithm and evaluates (held-out) every 3 steps, on the average: under FSDP2 each rank
  averages its own shards, the sharded checkpoints hold them (resharded 2 -> 1 exactly), the monolithic ones
  full tensors; the averages after a kill and a resume equal the uninterrupted DDP run's.
- The released 3B model's shape of LM: remote-code MPT with a tied head and a 50,280-token vocabulary, trains
  under FSDP2 with activation checkpointing (its spliced head works with the embedding sharded), and resumes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

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

STEPS, KILL_AT = 6, 3
LR = 5e-3  # run.yaml's optimizer.lr
FSDP2_SHARDED = "fsdp_config={version: 2, state_dict_type: sharded}"
FSDP2_FULL_AC = "fsdp_config={version: 2, state_dict_type: full, activation_checkpointing: true}"
pytestmark = pytest.mark.slow


def _overrides(data_root: Path, save_folder: Path, steps: int = STEPS) -> list[str]:
    return [
        f"variables.data_root={data_root}", f"max_duration={steps}", "run_name=dist",
        "data.laion.batch_size=4", "data.laion.num_workers=0", "data.mmc4.batch_size=2", "data.mmc4.num_workers=0",
        "data.mmc4.preprocess.max_tokens=64", f"data.mmc4.preprocess.min_image_bytes={SYNTHETIC_MIN_IMAGE_BYTES}",
        "eval_loader.laion.batch_size=4", "eval_loader.mmc4.batch_size=4", "eval_interval=3",
        "eval_subset_num_batches=1", "algorithms.ema={half_life: 2ba}", "scheduler.t_warmup=1", "callbacks={}",
        "loggers={}", "save_interval=1", "autoresume=true", "log_to_console=false", f"save_folder={save_folder}",
        *third_dataset_overrides(data_root),
    ]  # fmt: skip


def launch(out: Path, overrides: list[str], *, ranks: int = 2, kill_at: int | None = None) -> dict:
    """Run dist_train.py on `ranks` processes; its record (up to the kill, for a run killed as asked)."""
    kill = ["--kill-at", str(kill_at)] if kill_at is not None else []
    result = subprocess.run(
        [*rank_launcher(ranks), str(REPO_ROOT / "tests" / "dist_train.py"), str(out), *kill, *overrides],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    if kill_at is not None:
        record = torch.load(out, weights_only=False)
        assert result.returncode != 0 and "trainable" not in record, "the run should have been killed"
        assert sorted(record["losses"]) == list(range(1, kill_at + 1))
        return record
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out, weights_only=False)


def killed_and_resumed(tmp: Path, overrides: list[str], steps: int = STEPS, kill_at: int = KILL_AT) -> dict:
    """Run to `steps` but kill every rank after step `kill_at`; a new launch autoresumes to the end. Returns the
    resumed run's record with the killed run's steps merged in."""
    killed = launch(tmp / "killed.pt", overrides, kill_at=kill_at)
    resumed = launch(tmp / "resumed.pt", overrides)
    assert sorted(resumed["losses"]) == list(range(kill_at + 1, steps + 1))  # it continued, not restarted
    for key in ("losses", "grad_norms", "flops"):
        resumed[key] = {**killed[key], **resumed[key]}
    return resumed


def assert_same_run(run: dict, reference: dict, steps) -> None:
    for step in steps:
        for key in ("loss/train/total", "loss/train/laion", "loss/train/mmc4", f"loss/train/{THIRD}"):
            assert run["losses"][step][key] == pytest.approx(reference["losses"][step][key], rel=1e-5), (step, key)
    # Adam moves every weight by about lr per step whatever its gradient's size, so where a gradient is ~0 its
    # fp32 noise (summation order differs between the strategies) flips the step: a few entries differ by up to
    # ~1e-5. A lost, repeated or wrong step moves whole tensors by ~lr (5e-3 in run.yaml): tolerate lr / 20.
    # (Gradient scale is checked by the pre-clip norms, which Adam alone would hide.)
    for name, value in reference["trainable"].items():
        torch.testing.assert_close(run["trainable"][name], value, rtol=0, atol=LR / 20, msg=name)
    assert run["ema"].keys() == reference["ema"].keys() == {f"model.{name}" for name in reference["trainable"]}
    for name, value in reference["ema"].items():  # the average of those weights: the same tolerance
        torch.testing.assert_close(run["ema"][name], value, rtol=0, atol=LR / 20, msg=name)


def checkpoint_model_keys(path: Path) -> set[str]:
    """Model tensor names in a monolithic (.pt) or sharded (torch.distributed.checkpoint folder) checkpoint."""
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        return {k.removeprefix("state.model.") for k in keys if k.startswith("state.model.")}
    return set(torch.load(path, weights_only=False)["state"]["model"])


def checkpoint_ema_keys(folder: Path) -> set[str]:
    """The averaged tensors a sharded checkpoint holds as sharded tensors (not pickled objects)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = "state.callbacks.FlamingoEMA.ema."
    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {k.removeprefix(prefix) for k, v in keys.items() if k.startswith(prefix) and isinstance(v,
                                                                                               TensorStorageMetadata)}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return small_data(tmp_path_factory)


@pytest.fixture(scope="module")
def ddp(data_root, tmp_path_factory) -> dict:
    """The uninterrupted DDP run (whole per-rank batch, no microbatching): the reference."""
    tmp = tmp_path_factory.mktemp("ddp-straight")
    return launch(tmp / "out.pt", _overrides(data_root, tmp / "ckpt"))


def test_fsdp2_sharded_equals_ddp_resumes_after_a_kill_and_on_fewer_ranks(data_root, ddp, tmp_path):
    overrides = [*_overrides(data_root, tmp_path / "ckpt"), FSDP2_SHARDED, "device_train_microbatch_size=2"]
    resumed = killed_and_resumed(tmp_path, overrides)
    assert_same_run(resumed, ddp, range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed["grad_norms"][step] == pytest.approx(ddp["grad_norms"][step], rel=1e-5)  # the global norm
        assert resumed["flops"][step] == ddp["flops"][step]  # counted before wrapping: not from shards
    assert set(resumed["placements"].values()) == {"(Shard(dim=0),)"}  # every parameter sharded
    assert resumed["frozen_with_grad"] == [] and ddp["frozen_with_grad"] == []
    # The sharded checkpoint holds the trainable tensors only.
    latest = tmp_path / "ckpt" / f"ep0-ba{STEPS}"
    assert checkpoint_model_keys(latest) == {f"model.{name}" for name in ddp["trainable"]}
    assert checkpoint_ema_keys(latest) == {f"model.{name}" for name in ddp["trainable"]}  # one shard per rank
    # 2 ranks' shards resume on 1 rank (torch.distributed.checkpoint reshards): one more step runs.
    one_rank = launch(tmp_path / "one.pt", [*_overrides(data_root, tmp_path / "ckpt", STEPS + 1), FSDP2_SHARDED],
                      ranks=1)  # fmt: skip
    assert sorted(one_rank["losses"]) == [STEPS + 1] and one_rank["world_size"] == 1
    for name, value in resumed["ema"].items():  # the 2 ranks' shards of the average, exactly, on 1 rank
        assert torch.equal(one_rank["ema_at_start"][name], value), name


def test_ddp_resumes_after_a_kill(data_root, ddp, tmp_path):
    resumed = killed_and_resumed(tmp_path, _overrides(data_root, tmp_path / "ckpt"))
    assert_same_run(resumed, ddp, range(1, STEPS + 1))


def test_tied_50k_vocab_remote_mpt_under_fsdp2_full_with_activation_checkpointing(data_root, tmp_path):
    """FSDP2 with full state dicts and activation checkpointing, on the 3B model's kind of LM: equals DDP and
    resumes after a kill; the monolithic checkpoint holds the trainable tensors only."""
    from tiny_remote_lm import MPTConfig, MPTForCausalLM

    MPTConfig.register_for_auto_class()
    MPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    torch.manual_seed(0)
    # MPT-1B's padded vocabulary (50,432 rows, shrunk to the tokenizer's 50,280 by the resize), tied head.
    MPTForCausalLM(MPTConfig(vocab_size=50_432, bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "lm")
    model = ["model.lm.config=null", f"model.lm.name={tmp_path / 'lm'}", "model.lm.trust_remote_code=true",
             "model.tokenizer.builtin=tiny-50k"]  # fmt: skip
    steps, kill_at = 4, 2
    reference = launch(tmp_path / "ddp.pt", [*_overrides(data_root, tmp_path / "ddp", steps), *model])
    resumed = killed_and_resumed(
        tmp_path, [*_overrides(data_root, tmp_path / "ckpt", steps), *model, FSDP2_FULL_AC], steps, kill_at
    )
    assert_same_run(resumed, reference, range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed["grad_norms"][step] == pytest.approx(reference["grad_norms"][step], rel=1e-5)
    saved = checkpoint_model_keys(tmp_path / "ckpt" / f"ep0-ba{steps}-rank0.pt")  # (rotation keeps the newest 2)
    assert saved == {f"model.{name}" for name in reference["trainable"]}
    rows = next(n for n in reference["trainable"] if n.endswith("trainable_rows.weight"))
    assert reference["trainable"][rows].shape == (2, 64)
    embedding = next(v for n, v in resumed["placements"].items() if n.endswith("transformer.wte.weight"))
    assert embedding == "(Shard(dim=0),)"  # the frozen (50,280, 64) matrix the tied head projects with
