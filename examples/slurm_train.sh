#!/bin/bash
# Train across nodes with Slurm: one torchrun per node, joined by a c10d rendezvous on the first node.
# autopar plans tensor parallelism inside a node (torchrun's LOCAL_WORLD_SIZE = --nproc_per_node) and data or
# pipeline parallelism across nodes. Submit with:  sbatch examples/slurm_train.sh
#SBATCH --job-name=autopar
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun launcher per node; it starts the node's ranks
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=01:00:00

set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

srun torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" --rdzv-id "$SLURM_JOB_ID" \
    examples/train.py --model hf:./my-model --batch 64 --seq 2048 --steps 100 --fix mbs=2 "$@"
