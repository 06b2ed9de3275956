"""Training speed on your GPU at the OpenFlamingo-3B shapes: benchmarks/bench.py per variant, with and without the
speed levers, then one summary.

    python -m benchmarks.gpu_bench [--config yamls/bench-3b.yaml] [--steps 8] [--warmup 3] [--variants levers,...]
        [--peak-flops 989e12] [--out runs/gpu-bench]

What it measures, per variant (see VARIANTS below): the step time, samples/s per GPU (LAION pairs + MMC4
documents), the model FLOPs utilisation (MFU: achieved FLOP/s, counting only what the frozen-aware backward
computes, over the GPU's dense bf16 peak) and the peak tensor memory. The peak comes from `--peak-flops`, else
from a small table of known GPUs matched by the device name (KNOWN_GPU_PEAKS), else the measured matmul rate
(always on CPU). Beside them the goals: MFU >= 45%, and 2x the reference's published 2.2 samples/s/GPU at 9B,
scaled to 3B (benchmarks/bench_data.py's `gpu_step_estimate`).

Each variant runs in a fresh process (its own memory peak, no compile caches shared) under a time limit and
prints its line as soon as it ends, so a run cut short still reports the variants that finished. Everything
printed is also appended to OUT/gpu_bench.jsonl. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_data import gpu_step_estimate

REPO_ROOT = Path(__file__).resolve().parent.parent

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, matched as substrings of the device
# name, most specific first. A GPU not listed: pass --peak-flops.
KNOWN_GPU_PEAKS = (
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),  # SXM
    ("B200", 2250e12),
    ("A100", 312.0e12),
    ("L40S", 362.05e12),
    ("A10G", 70.0e12),
    ("L4", 121.0e12),
    ("MI300X", 1307.4e12),
)


def known_peak_flops(device: str) -> float | None:
    """The dense bf16 peak of a GPU named `device` (torch.cuda.get_device_name), None when not in the table."""
    for name, flops in KNOWN_GPU_PEAKS:
        if name in device:
            return flops
    return None


MFU_GOAL = 0.45
# Overrides per variant. "levers": the recipe as written (per-image cross-attention, bf16 frozen weights, fused
# AdamW, chunked CE). "no-levers": the reference's forms of each (masked cross-attention, fp32 frozen weights,
# the foreach AdamW, the CE in one chunk); per-dataset backward and the supervised-only logits are structural
# and stay. "no-fsdp": the levers on one plain device (FSDP2's own cost on one GPU). "checkpointed": the levers
# with activation checkpointing (memory against time). "compiled" (not run by default): the levers with
# torch.compile of the trainable blocks (compile time is spent in the warm-up steps).
VARIANTS = {
    "levers": [],
    "no-levers": [
        "model.cross_attention=masked",
        "model.frozen_dtype=null",
        "optimizer.fused=false",
        "loss_chunk_tokens=null",
    ],
    "no-fsdp": ["fsdp_config=null"],
    "checkpointed": ["fsdp_config.activation_checkpointing=true"],
    "compiled": ["compile_trainable=true"],
}
DEFAULT_VARIANTS = "levers,no-levers,no-fsdp,checkpointed"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "yamls" / "bench-3b.yaml"))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--variant-timeout", type=float, default=120.0, help="seconds per variant")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="the MFU denominator, FLOP/s (default: the known GPUs' table, else the measured matmul)")
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "gpu-bench"), help="where gpu_bench.jsonl goes")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every variant")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    return args


def bench_command(args: argparse.Namespace, variant: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.bench",
        "--config",
        args.config,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        *args.overrides,
        *VARIANTS[variant],
    ]


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """bench.py's JSON line for one variant, or what went wrong (the end of its stderr) in its place."""
    start = time.perf_counter()
    try:
        done = subprocess.run(bench_command(args, variant), capture_output=True, text=True,
                              timeout=args.variant_timeout, cwd=REPO_ROOT)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"over --variant-timeout {args.variant_timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"variant": variant, "error": f"exit {done.returncode}", "stderr_tail": done.stderr[-3000:]}
    return {"variant": variant, "wall_s": round(time.perf_counter() - start, 1), **json.loads(lines[-1])}


def summarise(results: list[dict], peak_flops: float | None) -> dict:
    """Per variant: MFU, samples/s per GPU and peak memory beside the goals (the module docstring)."""
    estimate = gpu_step_estimate()
    goals = {"mfu": MFU_GOAL, "samples_per_s_per_gpu": estimate["samples_per_s_per_gpu"],
             "samples_source": estimate["source"]}  # fmt: skip
    rows = {}
    for result in results:
        if "error" in result:
            rows[result["variant"]] = {"error": result["error"]}
            continue
        on_cpu = result["device"].startswith("cpu")
        peak = peak_flops or (None if on_cpu else known_peak_flops(result["device"])) or result["matmul_flops_per_s"]
        samples = result["samples_per_s"]
        mfu = result["achieved_flops_per_s"] / peak
        rows[result["variant"]] = {
            "step_time_s": round(result["step_time_s"], 4),
            "samples_per_s_per_gpu": round(samples, 2),
            "mfu": round(mfu, 4),
            "mfu_peak_flops": peak,
            "achieved_over_matmul": round(result["achieved_over_matmul"], 4),
            "peak_memory_gib": round(result["peak_tensor_bytes"] / 2**30, 2),
            "meets_mfu_goal": mfu >= MFU_GOAL,
            "meets_samples_goal": samples >= goals["samples_per_s_per_gpu"],
        }
    return {"summary": rows, "goals": goals}


def emit(record: dict, log: Path) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with log.open("a") as handle:
        handle.write(line + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    log = Path(args.out) / "gpu_bench.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants.split(","):
        results.append(run_variant(args, variant))
        emit(results[-1], log)
    emit(summarise(results, args.peak_flops), log)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
