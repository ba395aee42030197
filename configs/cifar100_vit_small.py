"""CIFAR-100 from scratch with the small plain ViT of configs/cifar10_vit_small.py (Lee et al. 2021's baseline):
the same model and training, 100 classes. `vit-train --config cifar100_vit_small`.

Published: 73.81% on CIFAR-100 after 100 epochs. Measured here: not yet; a GPU job, see cifar10_vit_small.py.
"""
from vit_train.config import load_recipe


def get_config():
    config = load_recipe("cifar10_vit_small")
    config.data.name = "cifar100"
    return config
