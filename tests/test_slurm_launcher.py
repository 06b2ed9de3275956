"""tools/slurm: the rendered sbatch script starts, on every node, the `composer` command line Composer's own
launcher reads as that node's share of the job (world size, node rank, master address and port from Slurm)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from composer.cli.launcher import _get_parser as composer_parser
from train_helpers import REPO_ROOT

RENDER = REPO_ROOT / "tools" / "slurm" / "render_sbatch.py"
EXAMPLE = REPO_ROOT / "tools" / "slurm" / "openflamingo-9b.sbatch"
OVERRIDES = [
    "variables.laion_shards=pipe:aws s3 cp s3://bucket/laion/{000000..000009}.tar -",  # spaces and braces
    "variables.save_root=s3://bucket/it's $HOME",  # a quote and a dollar sign reach train.py as typed
    "max_duration=10ba",
]

# Stand-ins for Slurm's srun (one task per node, in turn), scontrol and the composer launcher (records argv).
STUBS = {
    "srun": """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node SLURM_PROCID=$node "$@" || exit $?; done
""",
    "scontrol": """#!/usr/bin/env bash
[[ "$1 $2 $3" == "show hostnames gpu-node-[07-08]" ]] || { echo "unexpected: scontrol $*" >&2; exit 1; }
printf 'gpu-node-07\\ngpu-node-08\\n'
""",
    "composer": """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$RECORD/node-$SLURM_NODEID"
""",
}


def _render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RENDER), *args], cwd=REPO_ROOT, capture_output=True, text=True)


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "record").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", RECORD=str(tmp_path / "record"), SLURM_NNODES="2",
               SLURM_NTASKS="2", SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_JOB_ID="123456", **extra)  # fmt: skip
    return env


def test_rendered_script_starts_composer_on_both_nodes(tmp_path):
    rendered = _render("--nodes", "2", "--gpus-per-node", "8", "--recipe", "yamls/openflamingo-9b.yaml", *OVERRIDES)
    assert rendered.returncode == 0, rendered.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(rendered.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    directives = [line.split(None, 1)[1] for line in rendered.stdout.splitlines() if line.startswith("#SBATCH")]
    assert {"--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--job-name=openflamingo-9b"} <= set(directives)

    job = subprocess.run(["bash", str(script)], cwd=REPO_ROOT, env=_slurm_env(tmp_path), capture_output=True,
                         text=True)  # fmt: skip
    assert job.returncode == 0, job.stderr
    for node in (0, 1):
        argv = (tmp_path / "record" / f"node-{node}").read_text().split("\0")[:-1]
        assert argv == [
            "--world_size", "16", "--node_rank", str(node), "--master_addr", "gpu-node-07",
            "--master_port", str(10000 + 123456 % 20000), "-n", "8", "train.py", "yamls/openflamingo-9b.yaml",
            *OVERRIDES,
        ]  # fmt: skip
        parsed = composer_parser().parse_args(argv)  # what Composer's launcher makes of it
        assert (parsed.world_size, parsed.node_rank, parsed.nproc) == (16, node, 8)
        assert (parsed.master_addr, parsed.master_port) == ("gpu-node-07", 13456)
        assert parsed.training_script == "train.py"
        assert parsed.training_script_args == ["yamls/openflamingo-9b.yaml", *OVERRIDES]


def test_master_from_the_environment_wins_and_bad_layouts_are_refused(tmp_path):
    launch = ["bash", "tools/slurm/launch_node.sh", "4", "yamls/run.yaml"]
    env = _slurm_env(tmp_path, SLURM_NODEID="1", MASTER_ADDR="10.0.0.5", MASTER_PORT="29400")
    assert subprocess.run(launch, cwd=REPO_ROOT, env=env, capture_output=True).returncode == 0
    argv = (tmp_path / "record" / "node-1").read_text().split("\0")[:-1]
    assert argv[:10] == ["--world_size", "8", "--node_rank", "1", "--master_addr", "10.0.0.5", "--master_port",
                         "29400", "-n", "4"]  # fmt: skip

    several = subprocess.run(launch, cwd=REPO_ROOT, env={**env, "SLURM_NTASKS": "8"}, capture_output=True, text=True)
    assert several.returncode == 2 and "one task per node" in several.stderr
    no_slurm = {k: v for k, v in env.items() if k != "SLURM_NNODES"}
    outside = subprocess.run(launch, cwd=REPO_ROOT, env=no_slurm, capture_output=True, text=True)
    assert outside.returncode != 0 and "SLURM_NNODES is not set" in outside.stderr


def test_renderer_names_a_missing_recipe_and_a_bad_node_count():
    missing = _render("--nodes", "2", "--gpus-per-node", "8", "--recipe", "yamls/nope.yaml")
    assert missing.returncode == 2 and "--recipe: yamls/nope.yaml is not a file" in missing.stderr
    zero = _render("--nodes", "0", "--gpus-per-node", "8", "--recipe", "yamls/run.yaml")
    assert zero.returncode == 2 and "--nodes" in zero.stderr and "must be >= 1" in zero.stderr


def test_checked_in_example_is_what_the_renderer_makes():
    text = EXAMPLE.read_text()
    made_by = next(line for line in text.splitlines() if line.startswith("#   python tools/slurm/render_sbatch.py"))
    rendered = _render(*shlex.split(made_by)[3:])
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout == text, "tools/slurm/openflamingo-9b.sbatch is stale: render it again"

