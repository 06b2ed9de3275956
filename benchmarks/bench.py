"""Training-speed benchmark: N real optimizer steps (after W warm-up steps), one JSON line of figures.

    python -m benchmarks.bench --config yamls/bench-cpu.yaml [--steps 20] [--warmup 3] [--data memory|loader]

The Trainer is built by the training entry point (`train_from_config`: model, optimizer, schedule, clipping,
precision, microbatching exactly as a run), checkpoints and loggers switched off. `--data memory` (default)
feeds in-memory batches of the config's shapes (`data/fake_batches.py`, the tests' builder too: each dataset's
batch size, `max_tokens`, `max_num_images`, the ViT's image size; `--images-per-doc` real images per document;
captions of 2 to max_tokens - 4 words, documents filling max_tokens), labelled by the data pipeline's collate,
uint8 images normalised on the device as the loader's are; `--data loader` reads the
config's data through the real loaders (decoding included).

Printed: samples/s per dataset (`<name>_samples_per_s`) and in all, tokens/s, the frozen-aware FLOP/s
(training/flops.py) and the same machine's dense matmul FLOP/s measured in this run (a timed square matmul in the
training dtype), their ratio, and peak memory (CUDA max allocated, or the process's max RSS on CPU). On CPU also
`peak_tensor_bytes`: the tensors that live across steps plus the peak one more (untimed) step allocates, as CUDA's
max allocated counts them.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from composer import Callback, State
from composer.loggers import Logger

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training YAML (e.g. yamls/bench-cpu.yaml)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--data", choices=["memory", "loader"], default="memory", help="batch source (see above)")
    parser.add_argument("--images-per-doc", default="2,3", help="memory data: real images per MMC4 document, cycled")
    parser.add_argument("--matmul-size", type=int, default=None, help="side of the timed matmul (default by device)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print torch.profiler's top N ops (self CPU/CUDA time) of the timed steps to stderr")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the YAML")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


# ------------------------------------------------------------------------------------------------------ data


def ensure_synthetic_data(config: str, overrides: list[str]) -> None:
    """Generate the built-in synthetic data at `variables.data_root` when missing and the YAML asks for it."""
    from omegaconf import OmegaConf

    from flamingo_composer.training.recipe import load_recipe_yaml

    raw = OmegaConf.merge(load_recipe_yaml(config), OmegaConf.from_dotlist(list(overrides)))
    variables = raw.get("variables") or {}
    root, size = variables.get("data_root"), variables.get("synthetic_image_size")
    if root is None or size is None or Path(root).exists():
        return
    from flamingo_composer.shards.synthetic import SyntheticConfig, write_synthetic_dataset

    print(f"bench: generating synthetic data at {root} ({size} px)", file=sys.stderr)
    write_synthetic_dataset(
        root,
        SyntheticConfig(num_laion=512, num_laion_val=16, num_mmc4=256, num_mmc4_val=8, image_size=int(size)),
        formats=("mds",),
    )


class MemoryBatches:
    """Endless copies of a few pre-built batches (fresh dicts each time: Composer moves and splits them), their
    microbatches in the config's forward order, their uint8 images normalised by `image_transform` on the device
    as the loader's are."""

    def __init__(self, batches: list[dict], forward_order: list[str] | None = None, image_transform=None):
        self.batches, self.forward_order, self.image_transform = batches, forward_order, image_transform
        lead = next(iter(batches[0].values()))  # the first dataset: microbatch sizes count its rows
        self.batch_size = int(lead["input_ids"].shape[0])

    def __iter__(self):
        step = 0
        while True:
            batch = self.batches[step % len(self.batches)]
            yield {name: dict(sub) for name, sub in batch.items()}
            step += 1


# -------------------------------------------------------------------------------------------------- timing


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(Callback):
    """Wall time at the end of every step, and what each step processed (rows, tokens, frozen-aware FLOPs)."""

    def __init__(self):
        self.ends: list[float] = []
        self.steps: list[dict[str, float]] = []

    def fit_start(self, state: State, logger: Logger) -> None:
        synchronize()
        self.ends.append(time.perf_counter())

    def batch_end(self, state: State, logger: Logger) -> None:
        synchronize()
        self.ends.append(time.perf_counter())
        model = state.model.module if hasattr(state.model, "module") else state.model  # DDP-wrapped or not
        record = {"flops": float(model.flops_per_batch(state.batch))}
        for name, sub in state.batch.items():
            record[f"{name}_samples"] = int(sub["input_ids"].shape[0])
            record[f"{name}_tokens"] = int(sub["input_ids"].numel())
            record[f"{name}_nonpad_tokens"] = int(sub["attention_mask"].sum())
        self.steps.append(record)


def matmul_flops_per_s(device: str, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a (size x size) @ (size x size) matmul: the machine's dense peak in practice."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    inner = 10 if device == "cuda" else 1
    torch.matmul(a, b)  # warm-up (kernel selection, thread pool)
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        synchronize()
        best = min(best, (time.perf_counter() - start) / inner)
    return 2.0 * size**3 / best


def peak_memory() -> tuple[int, str]:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"


def resident_tensor_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors that live across steps: parameters, buffers, optimizer state (each storage once).

    Not the gradients: both training loops set them to None every step (Composer before the batch, the
    reference after its update), so each step allocates them anew and `step_tensor_peak` counts them."""
    from torch.distributed.tensor import DTensor

    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]  # FSDP2: this rank's shards
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def step_tensor_peak(run_step) -> int:
    """Peak bytes of CPU tensors that `run_step()` allocates above what exists before it (activations, gradients,
    temporaries): the profiler's raw allocation and free records, summed in time order. With
    `resident_tensor_bytes` it is the CPU counterpart of CUDA's max_memory_allocated, free of the C allocator's
    retained heap that max RSS also counts.

    The raw records, not the per-op `self_cpu_memory_usage`: a range such as `Optimizer.step` (which holds the
    whole forward and backward when Composer steps with a closure) owns every free made in Python code between
    ops, and those would all count at the range's start. The free of a tensor made before the profile (the last
    step's gradients, set to None) is not recorded; such tensors are not in `resident_tensor_bytes` either."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records = [e for e in records if e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        current += record.nbytes()  # + allocation, - free
        peak = max(peak, current)
    return peak


# ---------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    from flamingo_composer.data.dataspec import build_dataspec
    from flamingo_composer.training.config import load_config
    from flamingo_composer.training.run import train_from_config

    total = args.warmup + args.steps
    ensure_synthetic_data(args.config, args.overrides)
    overrides = [
        *args.overrides,
        f"max_duration={total}",
        "save_folder=null",
        "autoresume=false",
        "load_path=null",
        "eval_loader=null",
        "loggers={}",
        "progress_bar=false",
        "log_to_console=false",
    ]
    cfg = load_config(args.config, overrides)
    timer = StepTimer()
    trainer = train_from_config(cfg, extra_callbacks=[timer], fit=False)
    composer_model = trainer.state.model.module if hasattr(trainer.state.model, "module") else trainer.state.model
    flamingo = composer_model.model

    device = "cuda" if trainer.state.device.name == "gpu" else "cpu"
    train_dtype = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(cfg.precision, torch.float32)
    size = args.matmul_size or (8192 if device == "cuda" else 2048)
    matmul = matmul_flops_per_s(device, train_dtype, size)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fit_kwargs = {}
    if args.data == "memory":
        from flamingo_composer.data.fake_batches import fake_batch, fake_datasets_of
        from flamingo_composer.data.images import SplitImageTransform
        from flamingo_composer.models.towers import build_vision
        from flamingo_composer.models.vision import vision_image_size

        image_size = vision_image_size(flamingo.vision_encoder)[0]
        per_doc = [int(n) for n in args.images_per_doc.split(",")]
        tokenizer = composer_model_tokenizer(cfg)
        transform = SplitImageTransform.of(build_vision(cfg.model.vision, on_meta=True)[1])
        shapes = fake_datasets_of(cfg.data, per_doc)
        batches = [fake_batch(tokenizer, shapes, image_size=image_size, index=i) for i in range(4)]
        batches = MemoryBatches(batches, cfg.data.forward_order(), transform)
        fit_kwargs["train_dataloader"] = build_dataspec(batches)
    if args.profile:
        trainer.fit(duration=f"{args.warmup}ba", **fit_kwargs)  # warm-up outside the profile
        with torch.profiler.profile() as prof:
            trainer.fit(duration=f"{args.steps}ba")
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile), file=sys.stderr)
    else:
        trainer.fit(**fit_kwargs)
    memory, memory_kind = peak_memory()
    ends, records = list(timer.ends), list(timer.steps)  # the timed run's, before the memory step below
    tensor_memory = memory  # CUDA max allocated counts tensors
    if device == "cpu":  # one more step, untimed, under the memory profiler
        resident = resident_tensor_bytes(composer_model, trainer.state.optimizers[0])
        tensor_memory = resident + step_tensor_peak(lambda: trainer.fit(duration="1ba"))
    trainer.close()

    timed = records[args.warmup :]
    seconds = ends[-1] - ends[args.warmup]  # end of the last warm-up step -> end of the last step
    totals: dict[str, float] = {}
    for record in timed:
        for key, value in record.items():
            totals[key] = totals.get(key, 0.0) + value
    achieved = totals["flops"] / seconds
    names = list(cfg.data.enabled())  # every enabled dataset, whatever its name
    result = {
        "config": str(args.config),
        "data": args.data,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "precision": cfg.precision,
        "fsdp": None if cfg.fsdp_config is None else f"FSDP{cfg.fsdp_config.version}",
        "steps": args.steps,
        "warmup": args.warmup,
        "step_time_s": seconds / args.steps,
        **{f"{name}_samples_per_s": totals.get(f"{name}_samples", 0.0) / seconds for name in names},
        "samples_per_s": sum(totals.get(f"{name}_samples", 0.0) for name in names) / seconds,
        "tokens_per_s": sum(totals.get(f"{name}_tokens", 0.0) for name in names) / seconds,
        "nonpad_tokens_per_s": sum(totals.get(f"{name}_nonpad_tokens", 0.0) for name in names) / seconds,
        "flops_per_step": totals["flops"] / args.steps,
        "achieved_flops_per_s": achieved,
        "matmul_flops_per_s": matmul,
        "matmul": f"{size}x{size} {str(train_dtype).removeprefix('torch.')}",
        "achieved_over_matmul": achieved / matmul,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "peak_tensor_bytes": tensor_memory,  # CPU: resident tensors + one step's peak
        "torch": torch.__version__,
    }
    return result


def composer_model_tokenizer(cfg):
    """The tokenizer of the run's model config (with the Flamingo tokens added, as the factory does)."""
    from flamingo_composer.models.embeddings import add_flamingo_tokens
    from flamingo_composer.models.factory import build_tokenizer

    tokenizer = build_tokenizer(cfg.model.tokenizer)
    add_flamingo_tokens(tokenizer)
    return tokenizer


def main(argv=None) -> int:
    args = parse_args(argv)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
