#!/usr/bin/env python
"""Write an sbatch script that trains a recipe on N nodes x G GPUs with the `composer` launcher.

Example (the 9B recipe's 64 GPUs; overrides as for train.py, quoted once as you would type them):
    python tools/slurm/render_sbatch.py --nodes 8 --gpus-per-node 8 --recipe yamls/openflamingo-9b.yaml \\
        --setup 'source .venv/bin/activate' --out openflamingo-9b.sbatch \\
        'variables.laion_shards=pipe:aws s3 cp s3://bucket/laion/{000000..231349}.tar -'
    sbatch openflamingo-9b.sbatch        # from the repository root (or pass --workdir)

The script asks Slurm for one task per node and runs tools/slurm/launch_node.sh there with srun; that script
reads the node count, node rank and master host from Slurm and starts `composer -n G` with the world size,
node rank, master address and port. `autoresume: true` (all recipes) makes a resubmitted job continue.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

LAUNCH_NODE = "tools/slurm/launch_node.sh"  # relative to the repository root, where the job runs


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=_positive, required=True, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=_positive, required=True, help="GPUs (= ranks) per node")
    parser.add_argument("--recipe", required=True, help="recipe YAML, relative to the repository root")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides passed to train.py")
    parser.add_argument("--job-name", help="Slurm job name (default: the recipe's file name)")
    parser.add_argument("--time", help="time limit, e.g. 48:00:00")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--cpus-per-task", type=_positive, help="CPU cores per node (the task runs all its ranks)")
    parser.add_argument("--workdir", help="repository root on the cluster (default: where sbatch is run)")
    parser.add_argument("--output", default="%x-%j.out", help="Slurm output file (default: %(default)s)")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="extra sbatch option, e.g. --sbatch=--exclusive (repeatable)")
    parser.add_argument("--setup", action="append", default=[], metavar="COMMAND",
                        help="shell line run before srun, e.g. 'source .venv/bin/activate' (repeatable)")
    parser.add_argument("--out", help="write the script here (default: stdout)")
    return parser.parse_args(argv)


def _without_out(argv: list[str]) -> list[str]:
    """The render arguments minus --out (the script records how to render it again)."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--out":
            skip = True
        elif not word.startswith("--out="):
            kept.append(word)
    return kept


def render(args: argparse.Namespace, argv: list[str]) -> str:
    """The sbatch script's text; `argv` (the render arguments) is recorded in its header."""
    job_name = args.job_name or Path(args.recipe).stem
    options = [
        f"--job-name={job_name}",
        f"--nodes={args.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={args.gpus_per_node}",
        f"--output={args.output}",
    ]
    for flag in ("time", "partition", "account", "cpus_per_task", "workdir"):
        value = getattr(args, flag)
        if value is not None:
            options.append(f"--{'chdir' if flag == 'workdir' else flag.replace('_', '-')}={value}")
    options += args.sbatch
    command = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", LAUNCH_NODE,
               str(args.gpus_per_node), args.recipe, *args.overrides]  # fmt: skip
    ranks = args.nodes * args.gpus_per_node
    lines = [
        "#!/bin/bash",
        f"# Rendered by tools/slurm/render_sbatch.py: {args.nodes} nodes x {args.gpus_per_node} GPUs = {ranks}"
        f" ranks of `composer train.py {args.recipe}`.",
        "# Submit from the repository root (or render with --workdir): sbatch <this file>. Made by:",
        f"#   python tools/slurm/render_sbatch.py {shlex.join(_without_out(argv))}",
        *(f"#SBATCH {option}" for option in options),
        "",
        "set -euo pipefail",
        *args.setup,
        " ".join(shlex.quote(word) for word in command),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not Path(args.recipe).is_file():
        print(f"render_sbatch.py: --recipe: {args.recipe} is not a file (it is relative to the repository root, "
              "where the job runs: render from there)", file=sys.stderr)  # fmt: skip
        return 2
    text = render(args, argv)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
