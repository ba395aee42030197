"""CIFAR-100 from scratch: `vit-train --config cifar100_scratch`.

The CIFAR-10 from-scratch recipe (configs/cifar10_scratch.py: AdamW, lr 1e-3, weight decay 0.05, label
smoothing 0.1, AutoAugment, mixup/cutmix, random erasing, stochastic depth 0.1, warm-up + cosine, batch 512)
with what 100 classes of 500 images each need: a model that sees the image at a finer grain, ViT-S_4 (an 8x8
grid of 4-pixel patches plus CLS, 22M parameters), and twice the epochs (200, 19,400 steps).

What to expect: not measured here (no GPU was available while this recipe was written). The smaller plain ViT
of configs/cifar100_vit_small.py is published at 73.81% after 100 epochs. For the best accuracy, fine-tune
ImageNet-21k weights instead: `vit-train --pretrained ViT-B_16-i21k --dataset cifar100` (reference port: 92.3%
at 224 px).
"""
from vit_train.config import load_recipe, recipe_model


def get_config():
    config = load_recipe("cifar10_scratch")
    config.model_name = "ViT-S_4"
    config.model = recipe_model("ViT-S_4", dropout_rate=0.0, drop_path_rate=0.1)
    config.data.name = "cifar100"
    config.schedule.epochs = 200
    return config
