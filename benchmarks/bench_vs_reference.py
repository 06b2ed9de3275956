"""Training step time and peak memory, ours against the reference OpenFlamingo (open-flamingo 2.0.1), side by side.

    python -m benchmarks.bench_vs_reference --config yamls/bench-cpu.yaml [--pairs 5] [--steps 6] [--warmup 2]

Each pair runs, in fresh processes and in alternating order, (a) the reference's real `train_one_epoch` on its
model built from the config's `model:` section by `tests/reference_oracle.py` (same ViT, LM and tokenizer files;
the reference's fixed perceiver sizes) and (b) ours: `benchmarks/bench.py` (the training entry point with its real
Trainer). Both see the same in-memory batch shapes and tokens (`data/fake_batches.py`: the config's LAION and MMC4
batch sizes and lengths, `--images-per-doc` real images per MMC4 document, the rest of the slots empty), the same
optimizer settings, fp32 on CPU (or the config's device). Prints one JSON line: each pair's step times and ratio
(reference / ours: > 1 means ours is faster), their median, both peak memories (max RSS of the process, or CUDA
max allocated) and their ratio (ours / reference), both peak tensor memories (`bench.py`'s `peak_tensor_bytes`,
measured the same way on both sides, on CPU in one more, untimed step) and their ratio, and the machine. This is
the figure the trainer's speed is judged by; `benchmarks/bench.py` alone gives our FLOP/s and MFU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="yamls/bench-cpu.yaml")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--images-per-doc", default="2,3", help="real images per MMC4 document, cycled")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of both (default: as set)")
    parser.add_argument("--reference-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _RepeatedBatch:
    """The loader `train_one_epoch` reads: `num_batches` and iteration."""

    def __init__(self, batch, num_batches: int):
        self.batch, self.num_batches = batch, num_batches

    def __iter__(self):
        return iter([self.batch] * self.num_batches)


def reference_worker(args: argparse.Namespace) -> dict:
    """Time the reference's train_one_epoch on the config's shapes (this process builds only the reference)."""
    from torch.nn.parallel import DistributedDataParallel
    from transformers import get_constant_schedule_with_warmup

    from benchmarks.bench import ensure_synthetic_data, resident_tensor_bytes, step_tensor_peak
    from flamingo_composer.data.fake_batches import fake_batch, fake_datasets_of
    from flamingo_composer.data.images import SplitImageTransform
    from flamingo_composer.models.reference_images import padded_vision_x
    from flamingo_composer.models.towers import build_vision
    from flamingo_composer.models.vision import vision_image_size
    from flamingo_composer.training.config import load_config
    from tests.reference_oracle import (
        REFERENCE_PERCEIVER,
        build_reference,
        reference_modules,
        reference_optimizer,
        set_reference_gates,
        single_process_group,
        write_reference_files,
    )

    ensure_synthetic_data(args.config, [])  # the config names its data (validated); bench.py makes it too
    cfg = load_config(args.config, [])
    device = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        files = write_reference_files(replace(cfg.model, seed=0, **REFERENCE_PERCEIVER), tmp)
        model, _, tokenizer = build_reference(files, cross_attn_every_n_layers=cfg.model.cross_attn_every_n_layers,
                                              seed=0)  # fmt: skip
    set_reference_gates(model, 0)
    model.to(device)
    image_size = vision_image_size(model.vision_encoder)[0]
    per_doc = [int(n) for n in args.images_per_doc.split(",")]
    batch = fake_batch(tokenizer, fake_datasets_of(cfg.data, per_doc), image_size=image_size)
    normalize = SplitImageTransform.of(build_vision(cfg.model.vision, on_meta=True)[1]).normalize
    for sub in batch.values():  # the reference takes padded float images: (B, T_img, 1, 3, H, W)
        sub["vision_x"] = padded_vision_x(normalize(sub.pop("images")), sub["image_mask"])
    total = args.warmup + args.steps
    laion, mmc4 = batch["laion"], batch["mmc4"]
    # The reference loaders' layouts: LAION images (B, C, H, W) with (ids, mask); MMC4 images (B, T, C, H, W)
    # with one (ids (1, L), mask (1, L)) pair per document.
    laion_batch = (laion["vision_x"][:, 0, 0], (laion["input_ids"], laion["attention_mask"]))
    mmc4_text = [
        (mmc4["input_ids"][i : i + 1], mmc4["attention_mask"][i : i + 1]) for i in range(len(mmc4["input_ids"]))
    ]
    loaders = [_RepeatedBatch(laion_batch, total), _RepeatedBatch((mmc4["vision_x"][:, :, 0], mmc4_text), total)]
    run_args = SimpleNamespace(
        num_epochs=1, precision={"fp32": "fp32", "amp_bf16": "amp_bf16"}.get(cfg.precision, "fp32"), fsdp=False,
        fsdp_use_orig_params=False, rank=0, world_size=1, gradient_accumulation_steps=1, freeze_lm_embeddings=False,
        report_to_wandb=False, logging_steps=10**9, batch_size_laion=batch["laion"]["input_ids"].shape[0],
        batch_size_mmc4=batch["mmc4"]["input_ids"].shape[0],
        loss_multiplier_laion=cfg.data["laion"].effective_loss_multiplier,
        loss_multiplier_mmc4=cfg.data["mmc4"].effective_loss_multiplier,
    )  # fmt: skip
    ends: list[float] = []

    def step_done(*_):
        if device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())

    with single_process_group(), contextlib.redirect_stderr(io.StringIO()):
        ddp_model = DistributedDataParallel(model)
        optimizer = reference_optimizer(ddp_model, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
        optimizer.register_step_post_hook(step_done)
        scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=0)

        def train(loaders):
            reference_modules().train_utils.train_one_epoch(
                args=run_args, model=ddp_model, epoch=0, laion_loader=loaders[0], mmc4_loader=loaders[1],
                tokenizer=tokenizer, optimizer=optimizer, lr_scheduler=scheduler, device_id=device, wandb=None,
            )  # fmt: skip

        train(loaders)
        figures = {"step_time_s": (ends[-1] - ends[args.warmup - 1]) / args.steps if args.warmup else
                   (ends[-1] - ends[0]) / max(1, args.steps - 1), "peak_memory_bytes": peak_memory_bytes()}  # fmt: skip
        figures["peak_tensor_bytes"] = figures["peak_memory_bytes"]  # CUDA max allocated counts tensors
        if device == "cpu":  # one more step, untimed, under the memory profiler (as bench.py does for ours)
            one = [_RepeatedBatch(loader.batch, 1) for loader in loaders]
            resident = resident_tensor_bytes(model, optimizer)  # DDP's bucket buffers are not counted
            figures["peak_tensor_bytes"] = resident + step_tensor_peak(lambda: train(one))
    return figures


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def run_worker(cmd: list[str], env: dict[str, str]) -> dict:
    """One side's figures (the last JSON line it prints); a failed side stops the bench with its own error."""
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"bench_vs_reference: {' '.join(cmd)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return _last_json(result.stdout)


def side_command(side: str, args) -> list[str]:
    module = ["benchmarks.bench_vs_reference", "--reference-worker"] if side == "reference" else ["benchmarks.bench"]
    script = ["-m", *module]
    return [sys.executable, *script, "--config", args.config, "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--images-per-doc", args.images_per_doc]  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reference_worker:
        print(json.dumps(reference_worker(args)), flush=True)
        return 0
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    pairs = []
    for index in range(args.pairs):
        runs = {}
        for side in (("reference", "ours") if index % 2 == 0 else ("ours", "reference")):
            runs[side] = run_worker(side_command(side, args), env)
        pairs.append(runs)
        print(f"pair {index}: reference {runs['reference']['step_time_s']:.3f} s/step, "
              f"ours {runs['ours']['step_time_s']:.3f} s/step", file=sys.stderr)  # fmt: skip
    ratios = [p["reference"]["step_time_s"] / p["ours"]["step_time_s"] for p in pairs]
    memory = {side: max(p[side]["peak_memory_bytes"] for p in pairs) for side in ("reference", "ours")}
    tensors = {side: max(p[side]["peak_tensor_bytes"] for p in pairs) for side in ("reference", "ours")}
    print(json.dumps({
        "config": args.config, "pairs": args.pairs, "steps": args.steps, "warmup": args.warmup,
        "reference_step_time_s": [round(p["reference"]["step_time_s"], 4) for p in pairs],
        "ours_step_time_s": [round(p["ours"]["step_time_s"], 4) for p in pairs],
        "speedup_per_pair": [round(r, 3) for r in ratios], "speedup_median": round(statistics.median(ratios), 3),
        "reference_peak_memory_bytes": memory["reference"], "ours_peak_memory_bytes": memory["ours"],
        "memory_ratio_ours_over_reference": round(memory["ours"] / memory["reference"], 3),
        "reference_peak_tensor_bytes": tensors["reference"], "ours_peak_tensor_bytes": tensors["ours"],
        "tensor_memory_ratio_ours_over_reference": round(tensors["ours"] / tensors["reference"], 3),
        "ours_achieved_over_matmul": [round(p["ours"]["achieved_over_matmul"], 3) for p in pairs],
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}",
        "torch": torch.__version__,
    }), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
