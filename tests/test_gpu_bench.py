"""The GPU benchmark (benchmarks/gpu_bench.py, yamls/bench-3b.yaml): its variants are valid configs at the 3B
shapes, its summary computes MFU against the GPU's peak and the goals from bench.py's figures, its --help says
what it measures, and it runs each variant through bench.py (here on CPU, on the tiny run.yaml model)."""

from __future__ import annotations

import json

import pytest
from train_helpers import REPO_ROOT, RUN_YAML, small_data

from benchmarks import bench_data, gpu_bench
from flamingo_composer.training.config import load_config

BENCH_3B = REPO_ROOT / "yamls" / "bench-3b.yaml"


def test_every_variant_is_a_valid_config_at_the_3b_shapes(tmp_path_factory):
    data = [f"variables.data_root={small_data(tmp_path_factory)}"]
    configs = {name: load_config(BENCH_3B, data + overrides) for name, overrides in gpu_bench.VARIANTS.items()}
    levers = configs["levers"]
    assert (levers.model.vision.name, levers.model.vision.pretrained) == ("ViT-L-14", None)
    lm = levers.model.lm.config
    assert (lm["model_type"], lm["d_model"], lm["n_layers"]) == ("mpt", 2048, 24)
    assert levers.model.cross_attn_every_n_layers == 1
    assert levers.model.tokenizer.builtin == "tiny-50k" and levers.model.lm.name is None  # nothing from the hub
    assert (levers.data["laion"].batch_size, levers.data["mmc4"].batch_size) == (64, 32)
    assert levers.precision == "amp_bf16" and levers.fsdp_config.version == 2
    assert (levers.model.cross_attention, levers.model.frozen_dtype, levers.loss_chunk_tokens) == (
        "per_image", "bfloat16", 1024
    )
    assert levers.optimizer.fused is not False and not levers.fsdp_config.activation_checkpointing
    plain = configs["no-levers"]
    assert (plain.model.cross_attention, plain.model.frozen_dtype, plain.optimizer.fused, plain.loss_chunk_tokens) == (
        "masked", None, False, None
    )
    assert configs["no-fsdp"].fsdp_config is None
    assert configs["checkpointed"].fsdp_config.activation_checkpointing
    assert configs["compiled"].compile_trainable


def _bench_record(device: str, **figures) -> dict:
    record = {"variant": "levers", "device": device, "step_time_s": 2.0, "samples_per_s": 48.0,
              "achieved_flops_per_s": 4.0e14, "matmul_flops_per_s": 8.0e14, "achieved_over_matmul": 0.5,
              "peak_tensor_bytes": 3 * 2**30}  # fmt: skip
    return {**record, **figures}


def test_summary_gives_mfu_against_the_gpu_peak_and_the_scaled_reference_goal():
    goal = bench_data.gpu_step_estimate()["samples_per_s_per_gpu"]
    gpu = _bench_record("NVIDIA H200", samples_per_s=goal + 16.0)  # every dataset's samples: above the goal
    cpu = {**_bench_record("cpu x2 threads", achieved_flops_per_s=1.0e11, matmul_flops_per_s=3.0e11), "variant": "cpu"}
    failed = {"variant": "compiled", "error": "over --variant-timeout 120 s"}
    summary = gpu_bench.summarise([gpu, cpu, failed], peak_flops=None)
    rows = summary["summary"]
    h200 = 989.4e12  # NVIDIA's dense bf16 peak of the H200
    assert rows["levers"]["mfu"] == pytest.approx(4.0e14 / h200, abs=1e-4) and rows["levers"]["mfu_peak_flops"] == h200
    assert not rows["levers"]["meets_mfu_goal"]
    assert rows["levers"]["samples_per_s_per_gpu"] == pytest.approx(goal + 16.0, abs=0.01)
    assert rows["levers"]["meets_samples_goal"] and rows["levers"]["peak_memory_gib"] == 3.0
    assert rows["cpu"]["mfu"] == pytest.approx(1 / 3, abs=1e-4) and rows["cpu"]["mfu_peak_flops"] == 3.0e11
    assert rows["compiled"] == {"error": failed["error"]}
    assert summary["goals"]["samples_per_s_per_gpu"] == goal and summary["goals"]["mfu"] == 0.45
    pinned = gpu_bench.summarise([gpu], peak_flops=8.0e14)["summary"]["levers"]
    assert pinned["mfu"] == pytest.approx(0.5) and pinned["meets_mfu_goal"]


def test_peak_table_matches_device_names_and_falls_back_to_the_measured_matmul():
    assert gpu_bench.known_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_bench.known_peak_flops("NVIDIA H100 PCIe") == 756.0e12
    assert gpu_bench.known_peak_flops("NVIDIA A100-SXM4-80GB") == 312.0e12
    assert gpu_bench.known_peak_flops("NVIDIA GeForce RTX 2080") is None
    unknown = _bench_record("NVIDIA GeForce RTX 2080", achieved_flops_per_s=1.0e13, matmul_flops_per_s=4.0e13)
    assert gpu_bench.summarise([unknown], peak_flops=None)["summary"]["levers"]["mfu"] == pytest.approx(0.25)


def test_help_says_what_it_measures_and_nothing_about_one_machine(capsys):
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for measured in ("MFU", "samples/s per GPU", "peak tensor memory", "--peak-flops", "KNOWN_GPU_PEAKS"):
        assert measured in text, measured
    for machine_word in ("lent", "$OUT", "wheel", "carry"):
        assert machine_word not in text, machine_word


def test_unknown_variant_is_named():
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--variants", "levers,turbo"])


@pytest.mark.slow
def test_each_variant_runs_bench_in_its_own_process(tmp_path, tmp_path_factory, capsys):
    """Under FSDP2 (one process, gloo) as on the GPU, and without it (the no-fsdp variant's override wins)."""
    argv = ["--config", str(RUN_YAML), "--steps", "1", "--warmup", "1", "--variants", "levers,no-fsdp",
            "--out", str(tmp_path), "--variant-timeout", "300", f"variables.data_root={small_data(tmp_path_factory)}",
            "data.laion.batch_size=4", "data.mmc4.batch_size=2", "fsdp_config.version=2"]  # fmt: skip
    assert gpu_bench.main(argv) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    logged = [json.loads(line) for line in (tmp_path / "gpu_bench.jsonl").read_text().splitlines()]
    assert printed == logged and len(logged) == 3
    assert [(r["variant"], r["fsdp"]) for r in logged[:2]] == [("levers", "FSDP2"), ("no-fsdp", None)]
    assert all(r["step_time_s"] > 0 and r["samples_per_s"] > 0 for r in logged[:2])
    assert set(logged[2]["summary"]) == {"levers", "no-fsdp"}
    assert all(0 < row["mfu"] for row in logged[2]["summary"].values())
