"""Peak host memory (RSS) per rank while an FSDP2 run starts: model built, sharded, ready to train.

    python -m benchmarks.bench_startup [--ranks 2] [--lm mpt-1b|tiny]

Runs `composer -n RANKS` twice on CPU (gloo), with `fsdp_config.mixed_init` on (ranks > 0 build the model on
the meta device and receive rank 0's weights) and off (every rank builds it), on an MPT-1B-shaped random LM
(d_model 2048, 24 layers, 50,432-row vocabulary, tied head: about 1.3B parameters) with the `tiny-50k` tokenizer,
a tiny ViT and the built-in synthetic data. Prints one JSON line per setting: the peak RSS of each rank in GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LMS = {
    "mpt-1b": {"model_type": "mpt", "d_model": 2048, "n_layers": 24, "n_heads": 16, "expansion_ratio": 4,
               "vocab_size": 50432, "max_seq_len": 2048, "bos_token_id": 0, "eos_token_id": 0},
    "tiny": {"model_type": "mpt", "d_model": 64, "n_layers": 2, "n_heads": 4, "expansion_ratio": 4,
             "vocab_size": 50432, "max_seq_len": 512, "bos_token_id": 0, "eos_token_id": 0},
}  # fmt: skip


def _overrides(data_root: Path, out_dir: Path, mixed_init: bool) -> list[str]:
    return [
        f"variables.data_root={data_root}", "max_duration=1", "run_name=startup", "eval_loader=null",
        "data.laion.num_workers=0", "data.mmc4.num_workers=0", "data.laion.batch_size=2", "data.mmc4.batch_size=1",
        f"data.mmc4.preprocess.min_image_bytes={_min_image_bytes()}", "callbacks={}", "loggers={}",
        "autoresume=false", f"save_folder={out_dir}/ckpt", "model.tokenizer.builtin=tiny-50k",
        f"fsdp_config={{version: 2, mixed_init: {str(mixed_init).lower()}}}",
    ]  # fmt: skip


def _min_image_bytes() -> int:
    from flamingo_composer.shards.synthetic import SYNTHETIC_MIN_IMAGE_BYTES

    return SYNTHETIC_MIN_IMAGE_BYTES


def worker(out: str, lm: str, overrides: list[str]) -> None:
    """One rank: build everything as `composer train.py` does (no step), then record this process's peak RSS."""
    from composer.utils import dist

    from flamingo_composer.training.run import load_config, train_from_config

    cfg = load_config(REPO_ROOT / "yamls" / "run.yaml", overrides)
    cfg.model.lm.config = dict(LMS[lm])  # replaced whole (a dotted override would merge into run.yaml's LM)
    trainer = train_from_config(cfg, fit=False)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    params = sum(_local(p).numel() for p in trainer.state.model.parameters())  # this rank's shard sizes
    Path(f"{out}.rank{dist.get_global_rank()}").write_text(json.dumps({"peak_rss_gb": peak_kb / 2**20,
                                                                        "local_params": params}))
    trainer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--lm", choices=sorted(LMS), default="mpt-1b")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.lm, args.worker[1:])
        return 0

    from flamingo_composer.shards.synthetic import SyntheticConfig, write_synthetic_dataset

    composer = str(Path(sys.executable).parent / "composer")
    with tempfile.TemporaryDirectory() as tmp:
        data = SyntheticConfig(num_laion=16, num_laion_val=4, num_mmc4=8, num_mmc4_val=2, image_size=32,
                               laion_shard_size=8, mmc4_shard_size=4)  # fmt: skip
        write_synthetic_dataset(Path(tmp) / "data", data, formats=("mds",))
        failed = 0
        for mixed_init in (True, False):
            out = Path(tmp) / f"mixed-{mixed_init}"
            cmd = [composer, "-n", str(args.ranks), __file__, "--lm", args.lm, "--worker", str(out),
                   *_overrides(Path(tmp) / "data", out, mixed_init)]  # fmt: skip
            result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
            figures = {"lm": args.lm, "ranks": args.ranks, "mixed_init": mixed_init,
                       "host_memory_gb": round(_host_memory_gb(), 1),
                       "machine": platform.processor() or platform.machine()}  # fmt: skip
            if result.returncode != 0:
                failed += 1
                print(result.stdout[-2000:] + result.stderr[-4000:], file=sys.stderr)
                killed = "exit code -9" in result.stderr
                figures["failed"] = "a rank was killed (SIGKILL: out of host memory?)" if killed else "see stderr"
            else:
                ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(args.ranks)]
                figures["peak_rss_gb"] = [round(r["peak_rss_gb"], 2) for r in ranks]
                figures["node_peak_rss_gb"] = round(sum(r["peak_rss_gb"] for r in ranks), 2)
                figures["local_params"] = [r["local_params"] for r in ranks]
            print(json.dumps(figures), flush=True)
    return 1 if failed else 0


def _local(tensor):
    """A DTensor's local shard (FSDP2 parameters); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _host_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


if __name__ == "__main__":
    sys.exit(main())
