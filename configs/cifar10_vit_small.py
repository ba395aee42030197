"""CIFAR-10 from scratch with a small plain ViT: the baseline of "Vision Transformer for Small-Size Datasets"
(Lee et al. 2021), as faithfully as the paper states it. `vit-train --config cifar10_vit_small`.

Model: 4x4-pixel patches (an 8x8 grid + CLS, 65 tokens), width 192, 9 layers, MLP 384, 12 heads, no dropout,
stochastic depth rising to 0.1: 2.7M parameters, the plain ViT of equations 1-4 (no convolutional tokenizer).
Training: AdamW, lr 1e-3 at batch 128, weight decay 0.05, 10 warm-up epochs then cosine to zero, 100 epochs;
AutoAugment (CIFAR-10 policy) after crop + flip, mixup 0.8 and cutmix 1.0 (one of them per batch), label
smoothing 0.1, random erasing 0.25, repeated augmentation (3 copies, as DeiT).

Published: 93.58% on CIFAR-10 (73.81% on CIFAR-100 with configs/cifar100_vit_small.py), 100 epochs.
Measured here: not yet. The 100 epochs (39,000 steps of batch 128, about 6 PFLOP) are a GPU job; no GPU was
lent while this recipe was written, so its accuracy and time on one wait for a GPU (scripts/gpu_check.sh runs it).
On a 2-core CPU use configs/cifar10_cpu.py instead.
"""
from vit_train.config import base_config, recipe_model


def get_config():
    config = base_config()
    config.model_name = "ViT-Ti_4"
    config.model = recipe_model("ViT-Ti_4", hidden_size=192, num_layers=9, mlp_dim=384, num_heads=12,
                                dropout_rate=0.0, drop_path_rate=0.1)
    config.data.name = "cifar10"
    config.data.crop_padding = 4
    config.data.hflip = True
    config.data.auto_augment = "autoaugment"
    config.data.mixup_alpha = 0.8
    config.data.cutmix_alpha = 1.0
    config.data.random_erasing = 0.25
    config.data.repeated_augmentation = 3
    config.img_size = 32
    config.batch_size = 128
    config.optim.name = "adamw"
    config.optim.lr = 1e-3
    config.optim.weight_decay = 0.05
    config.optim.label_smoothing = 0.1
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_fraction = 0.1  # 10 of 100 epochs
    config.schedule.epochs = 100
    config.eval_every = 1950  # every 5 epochs
    config.save_every = 1950
    return config
