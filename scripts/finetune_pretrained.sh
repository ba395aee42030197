#!/usr/bin/env bash
# Fine-tune Google's ImageNet-21k ViT weights on CIFAR-10 (or CIFAR-100) at 224 or 384 px with the reference
# PyTorch port's recipe (configs/cifar10_finetune.py, the default with --pretrained): SGD momentum 0.9,
# lr 3e-2, no weight decay, global batch 512, 10,000 steps with 500 warm-up steps and cosine decay,
# gradient-norm clipping at 1.0, bf16. The reference port reached 99.08% (CIFAR-10) and 92.3% (CIFAR-100)
# with ViT-B_16 at 224 px.
#
# Needs: one CUDA GPU; batch 512 of ViT-B_16 at 224 px wants roughly 60 GB (estimated), so on smaller GPUs
#   set GRAD_ACCUM (2 for 40 GB, 4 for 24 GB; 384 px needs about 3x the memory); the repository installed;
#   CIFAR in ./data or internet access; the weights, e.g.
#     wget https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz
# How long: not measured yet. The figure comes from scripts/gpu_check.sh's report, whose speed table times
#   ViT-B_16's training step at 224 px (bf16): the run is 10,000 steps of 512 images at that rate, plus evaluations;
#   384 px has 2.9x the tokens. (The reference port reports 3 h and 12.5 h at 224 and 384 px on its older GPUs.)
#
# Settings (environment): WEIGHTS (default ViT-B_16.npz), MODEL (default ViT-B_16; must match the weights),
#   IMG_SIZE (224 or 384), DATASET (cifar10 or cifar100), GRAD_ACCUM (default 1). Extra arguments are passed on:
#   IMG_SIZE=384 GRAD_ACCUM=4 scripts/finetune_pretrained.sh --name vit_b16_384
# Interrupted? The same command plus --resume runs/<name> continues it.
set -euo pipefail
cd "$(dirname "$0")/.."

exec vit-train --pretrained "${WEIGHTS:-ViT-B_16.npz}" \
    --model "${MODEL:-ViT-B_16}" --dataset "${DATASET:-cifar10}" --img-size "${IMG_SIZE:-224}" \
    --grad-accum "${GRAD_ACCUM:-1}" --device cuda "$@"
