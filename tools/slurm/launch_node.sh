#!/usr/bin/env bash
# One Slurm task per node: start `composer` with this node's GPUs as its share of the job's ranks.
#
#   srun --ntasks-per-node=1 bash tools/slurm/launch_node.sh GPUS_PER_NODE RECIPE.yaml [dotted.key=value ...]
#
# From Slurm: the node count (SLURM_NNODES), this node's rank (SLURM_NODEID; SLURM_PROCID when absent, equal
# with one task per node) and the master = the job's first host (`scontrol show hostnames`). MASTER_ADDR and
# MASTER_PORT from the environment win; the default port is 10000 + job id % 20000 (below the ephemeral range,
# and two jobs sharing a node rarely collide). COMPOSER names the launcher (default: `composer` on PATH).
# Run from the repository root (train.py is relative).
set -euo pipefail

usage="usage: launch_node.sh GPUS_PER_NODE RECIPE.yaml [dotted.key=value ...] (one task per node, under srun)"
gpus=${1:?$usage}
shift
recipe=${1:?$usage}
shift
if [[ ! $gpus =~ ^[1-9][0-9]*$ ]]; then
    echo "launch_node.sh: GPUS_PER_NODE must be a positive integer, got '$gpus'" >&2
    exit 2
fi
nodes=${SLURM_NNODES:?launch_node.sh: SLURM_NNODES is not set: run it with srun inside an sbatch or salloc job}
node_rank=${SLURM_NODEID:-${SLURM_PROCID:?launch_node.sh: neither SLURM_NODEID nor SLURM_PROCID is set}}
if [[ -n ${SLURM_NTASKS:-} && $SLURM_NTASKS != "$nodes" ]]; then
    echo "launch_node.sh: needs exactly one task per node (srun --ntasks-per-node=1); got $SLURM_NTASKS" \
        "tasks on $nodes nodes" >&2
    exit 2
fi
if [[ -z ${MASTER_ADDR:-} ]]; then
    mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?launch_node.sh: SLURM_JOB_NODELIST is not set}")
    MASTER_ADDR=${hosts[0]:?launch_node.sh: scontrol listed no host for $SLURM_JOB_NODELIST}
fi
MASTER_PORT=${MASTER_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 20000))}

echo "launch_node.sh: node $node_rank of $nodes, $gpus GPUs, world size $((nodes * gpus)), master" \
    "$MASTER_ADDR:$MASTER_PORT" >&2
exec "${COMPOSER:-composer}" --world_size "$((nodes * gpus))" --node_rank "$node_rank" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -n "$gpus" train.py "$recipe" "$@"
