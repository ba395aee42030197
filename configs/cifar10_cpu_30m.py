"""CIFAR-10 on a CPU in 30 minutes: `vit-train --config cifar10_cpu_30m`.

The model and training of configs/cifar10_cpu.py (the 10-minute recipe), with the random crop put back: images
padded by 4 pixels and cropped, in every step. In 10 minutes the network under-fits and a crop costs accuracy; in
30 it sees each image about 60 times, and on every patch at the end it fits the training images fast, so the crop
pays (docs/results.md, "Thirty minutes: the crop put back").
"""
from vit_train.config import load_recipe


def get_config():
    config = load_recipe("cifar10_cpu")
    config.data.crop_padding = 4
    config.time_budget = "30m"
    return config
