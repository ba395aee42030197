"""vit-train: train and evaluate Vision Transformers (Dosovitskiy et al. 2020) on CIFAR and image folders."""

__version__ = "0.1.0"
