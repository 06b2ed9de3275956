"""`composer train.py yamls/run.yaml ...` end to end: config errors stop it early, short runs train and save.

These run the real entry point in subprocesses (as a user would); the in-process variants live in the other
training tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import (
    REPO_ROOT,
    RUN_YAML,
    THIRD,
    short_run_overrides,
    small_data,
    subprocess_env,
    third_dataset_overrides,
)

COMPOSER = str(Path(sys.executable).parent / "composer")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return small_data(tmp_path_factory)


def run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def logged_values(log_file: Path, key: str) -> list[float]:
    """Values of one metric in a FileLogger file (lines like `[metric][batch=3]: loss/train/laion: 4.52`)."""
    pattern = re.compile(rf"\[metric\]\[batch=\d+\]: {re.escape(key)}: ([-+0-9.eE]+)")
    return [float(m.group(1)) for m in pattern.finditer(log_file.read_text())]


def test_config_errors_exit_nonzero_before_training(data_root, tmp_path):
    bad_key = run(
        [sys.executable, "train.py", str(RUN_YAML), f"variables.data_root={data_root}", "optimizer.lrr=1"]
    )
    assert bad_key.returncode == 2
    assert "unknown key 'optimizer.lrr' (did you mean 'lr'?)" in bad_key.stderr
    assert "Building" not in bad_key.stdout + bad_key.stderr and "batch=" not in bad_key.stdout
    missing = tmp_path / "no-such-data"
    launched = run([COMPOSER, "-n", "1", "train.py", str(RUN_YAML), f"variables.data_root={missing}"])
    assert launched.returncode != 0
    assert f"MDS index not found: {missing}/mds/laion/train/index.json" in launched.stderr + launched.stdout
    assert not (REPO_ROOT / "runs" / "short-run").exists()


def _check_run(out: Path, world_size: int, max_duration: int, datasets=("laion", "mmc4")) -> None:
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("ep*-ba*-rank0.pt"))
    assert checkpoints == [f"ep0-ba{b}-rank0.pt" for b in range(2, max_duration + 1, 2)]
    for rank in range(world_size):
        log_file = out / f"logs-rank{rank}.txt"
        if rank == 0:
            for name in datasets:  # each dataset's loss under its name
                values = logged_values(log_file, f"loss/train/{name}")
                assert len(values) == max_duration and all(v > 0 for v in values), name
            assert re.search(r"\]: data/skipped/(laion|mmc4)/\w+: [1-9]", log_file.read_text())  # bad_every=9
    state = torch.load(out / "checkpoints" / f"ep0-ba{max_duration}-rank0.pt", weights_only=False)["state"]
    keys = set(state["model"])
    # Trainable-only: perceiver, cross-attention blocks, new-token rows; no CLIP or LM weight.
    assert keys and all(
        k.startswith("model.perceiver.")
        or ".gated_cross_attn_layer." in k
        or k.endswith("trainable_rows.weight")
        for k in keys
    )
    assert state["timestamp"]["Timestamp"]["batch"] == max_duration
    positions = state["callbacks"]["DataPositionCallback"]["loader"]["positions"]
    assert sorted(positions) == sorted(datasets) and all(len(positions[name]) == world_size for name in datasets)


def test_composer_n1_runs_to_the_end_with_three_named_datasets(data_root, tmp_path):
    """run.yaml's laion and mmc4 plus a second pairs dataset with its own loss multiplier."""
    overrides = [*short_run_overrides(data_root, tmp_path, 4), *third_dataset_overrides(data_root)]
    result = run([COMPOSER, "-n", "1", "train.py", str(RUN_YAML), *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    _check_run(tmp_path, world_size=1, max_duration=4, datasets=("laion", "mmc4", THIRD))
    assert f"{THIRD} " in result.stdout[result.stdout.index("train loss (last step)"):]  # the summary names it
    # Each of the package's log lines is printed once (not also by the root handler libraries install).
    output = (result.stdout + result.stderr).splitlines()
    ours = [line for line in output if "flamingo_composer." in line and "optimizer adamw" in line]
    assert len(ours) == 1, ours
    assert not [line for line in output if line.startswith("INFO:flamingo_composer")]


def test_data_without_any_readable_sample_stops_before_training_naming_it(data_root, tmp_path, capsys):
    from flamingo_composer.training.run import main

    (tmp_path / "zero.tar").write_bytes(b"")
    (tmp_path / "page.tar").write_text("<html>not a tar</html>" * 50)
    overrides = [*short_run_overrides(data_root, tmp_path), "data.laion.format=wds", "data.laion.local=null",
                 "data.laion.split=null", f"data.laion.shards=[{tmp_path}/zero.tar,{tmp_path}/page.tar]"]  # fmt: skip
    assert main([str(RUN_YAML), *overrides]) == 2
    error = capsys.readouterr().err
    assert "config error: data.laion.shards: no readable sample" in error
    assert f"{tmp_path}/zero.tar" in error and f"{tmp_path}/page.tar" in error
    assert not (tmp_path / "checkpoints").exists()


def test_a_switched_off_dataset_logs_no_eval_metrics(data_root, tmp_path):
    """MMC4 off (train and eval): held-out metrics exist for LAION only, no NaN `metrics/eval/mmc4/*`."""
    from composer.loggers import InMemoryLogger

    from flamingo_composer.training.run import load_config, train_from_config

    overrides = [
        *short_run_overrides(data_root, tmp_path, max_duration=1), "loggers={inmemory: {}}",
        "data.mmc4.enabled=false", "eval_loader={laion: {format: mds, local: " + f"{data_root}/mds/laion, "
        "split: val, batch_size: 4, shuffle: false}, mmc4: {enabled: false}}", "eval_interval=1",
        "eval_subset_num_batches=1",
    ]  # fmt: skip
    trainer = train_from_config(load_config(RUN_YAML, overrides))
    logged = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger)).data
    trainer.close()
    eval_keys = sorted(k for k in logged if k.startswith("metrics/eval/"))
    assert eval_keys == ["metrics/eval/laion/LanguageCrossEntropy", "metrics/eval/laion/TokenAccuracy"]


@pytest.mark.slow
def test_composer_n2_ddp_over_gloo(data_root, tmp_path):
    result = run(
        [COMPOSER, "-n", "2", "train.py", str(RUN_YAML), *short_run_overrides(data_root, tmp_path, 2)]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check_run(tmp_path, world_size=2, max_duration=2)
    for rank in (0, 1):
        assert "num_cpus_per_node: 2" in (tmp_path / f"logs-rank{rank}.txt").read_text()  # 2 local ranks
    # Composer all-reduces the logged losses: both ranks report the same global values.
    for key in ("loss/train/laion", "loss/train/mmc4"):
        values = [logged_values(tmp_path / f"logs-rank{rank}.txt", key) for rank in (0, 1)]
        assert len(values[0]) == 2 and values[0] == pytest.approx(values[1], rel=1e-5)


def test_autoresume_restores_trainable_weights_and_data_position(data_root, tmp_path):
    """In-process: a trainable-only checkpoint resumes (frozen weights rebuilt from the recipe, strict=False)."""
    from flamingo_composer.training.run import load_config, train_from_config

    overrides = [*short_run_overrides(data_root, tmp_path, max_duration=2), "loggers={inmemory: {}}"]
    first = train_from_config(load_config(RUN_YAML, overrides))
    first_model = {k: v.detach().clone() for k, v in first.state.model.named_parameters()}
    saved = torch.load(tmp_path / "checkpoints" / "ep0-ba2-rank0.pt", weights_only=False)["state"]
    first.close()

    # Same run again: autoresume finds latest-rank0.pt at batch 2 = max_duration: it loads and trains nothing.
    second = train_from_config(load_config(RUN_YAML, overrides))
    assert int(second.state.timestamp.batch) == 2
    params = dict(second.state.model.named_parameters())
    for name, value in first_model.items():
        torch.testing.assert_close(
            params[name].detach(), value, rtol=0, atol=0
        )  # trainable from file, frozen rebuilt
    assert set(saved["model"]) == {n for n, p in params.items() if p.requires_grad}
    from flamingo_composer.training.callbacks import DataPositionCallback

    position = next(c for c in second.state.callbacks if isinstance(c, DataPositionCallback))
    assert (
        position.loader.state_dict()["positions"]
        == saved["callbacks"]["DataPositionCallback"]["loader"]["positions"]
    )
    second.close()


def test_load_reference_checkpoint_before_training(data_root, tmp_path):
    """`load_reference_checkpoint` puts a released-layout checkpoint.pt into the model before the Trainer starts."""
    from flamingo_composer.training.run import load_config, train_from_config

    fixture = REPO_ROOT / "tests" / "fixtures" / "openflamingo-tiny-gptneox"
    overrides = [
        *short_run_overrides(data_root, tmp_path),
        "model.vision.custom_config=null",
        f"model.vision.config_path={fixture}/vision/of-tiny-vit-small.json",
        "model.lm.config=null",
        f"model.lm.name={fixture}/lm",
        "model.tokenizer.builtin=null",
        f"model.tokenizer.name={fixture}/lm",
        "model.cross_attn_every_n_layers=2",
        "model.perceiver_depth=6",
        "model.perceiver_heads=8",
        "model.perceiver_dim_head=64",
        "model.perceiver_num_latents=64",
        f"load_reference_checkpoint={fixture}/checkpoint.pt",
    ]
    trainer = train_from_config(load_config(RUN_YAML, overrides), fit=False)
    reference = torch.load(fixture / "checkpoint.pt", weights_only=True)
    model = trainer.state.model.model
    params = dict(model.named_parameters())
    for key in (
        "perceiver.latents",
        "lang_encoder.gpt_neox.layers.1.gated_cross_attn_layer.attn.to_q.weight",
        "lang_encoder.gpt_neox.layers.3.gated_cross_attn_layer.attn_gate",
    ):
        torch.testing.assert_close(params[key].detach(), reference[key], rtol=0, atol=0)
    rows = model.lang_encoder.get_input_embeddings().new_token_rows.detach()
    torch.testing.assert_close(
        rows, reference["lang_encoder.gpt_neox.embed_in.weight"][[618, 619]], rtol=0, atol=0
    )
    trainer.close()
