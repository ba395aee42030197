#!/usr/bin/env bash
# The design card's run on one GPU: ViT-B_16 trained from scratch on CIFAR-10 at 32x32 (a 2x2 grid of 16-px
# patches plus the CLS token) with the from-scratch recipe (configs/cifar10_scratch.py, the default): AdamW,
# lr 1e-3, weight decay 0.05, label smoothing 0.1, crop + flip, global batch 512, 100 epochs (9,700 steps), bf16.
#
# Needs: one CUDA GPU (about 4 GB of memory at batch 512: five tokens per image make ViT-B_16 cheap here);
#   the repository installed (pip install -e .); CIFAR-10 in ./data, or internet access to download it.
# How long: not measured yet. The figure comes from scripts/gpu_check.sh's report, whose speed table times this
#   model's training step (ViT-B_16 @32px, batch 512, bf16): the run is 9,700 such steps plus its evaluations.
# Output: runs/<name>/ with last.pt, best.pt, metrics.jsonl, config.json and TensorBoard events.
#   Extra arguments are passed on: scripts/train_cifar10.sh --name first_try --epochs 10
#   An interrupted run continues with the same command plus --resume runs/<name>.
set -euo pipefail
cd "$(dirname "$0")/.."

exec vit-train --model ViT-B_16 --dataset cifar10 --device cuda "$@"
