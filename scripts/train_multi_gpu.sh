#!/usr/bin/env bash
# The design card's run (scripts/train_cifar10.sh) with DistributedDataParallel on N GPUs, on one machine or
# several. The global batch stays 512 (512/N per GPU), so the result matches the one-GPU run up to float
# rounding; each process reads its own shard of every batch, and rank 0 alone logs and writes checkpoints.
#
# Needs: N CUDA GPUs on each machine with NCCL; the repository installed on every machine at the same path;
#   CIFAR-10 in ./data on each machine, or internet access (each machine's first process downloads it).
# How long: not measured yet; at best the one-GPU time (from scripts/gpu_check.sh's report, see
#   scripts/train_cifar10.sh) divided by N. At five tokens per image the per-GPU batch gets small quickly; for more
#   than 8 GPUs raise --batch-size with --lr.
#
# One machine:    GPUS=8 scripts/train_multi_gpu.sh [extra vit-train flags]
# Several machines: run the same command on each, with
#   NNODES       the number of machines                          (default 1)
#   NODE_RANK    this machine's index, 0 .. NNODES-1             (default 0)
#   MASTER_ADDR  the address of machine 0, reachable by all      (default 127.0.0.1)
#   MASTER_PORT  a free TCP port on machine 0                    (default 29500)
#   GPUS         GPUs per machine                                (default: all visible)
#   SHUTDOWN_TIMEOUT  seconds torchrun gives its processes to stop after SIGTERM before it kills them
#                (default 300; torchrun's own is 30, which a save of a large checkpoint can overrun)
# Interrupted (Ctrl-C, SIGTERM from a scheduler)? The processes agree to stop at the next log step (every
#   --set log_every steps; 50 by default), rank 0 saves last.pt; resume with the same command plus
#   --resume runs/<name>.
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS=${GPUS:-$(nvidia-smi --list-gpus | wc -l)}
SHUTDOWN=()  # where this torchrun has the flag (older ones stop their processes after 30 s)
if torchrun --help 2>/dev/null | grep -q -- '--shutdown[-_]timeout'; then
    SHUTDOWN=(--shutdown_timeout "${SHUTDOWN_TIMEOUT:-300}")
fi
exec torchrun ${SHUTDOWN[@]+"${SHUTDOWN[@]}"} \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m vit_train --model ViT-B_16 --dataset cifar10 "$@"
