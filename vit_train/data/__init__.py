"""Datasets -> batches on the training device. The modules, in the order a batch meets them:

    cifar.py, synthetic.py, folders.py   where images come from
    augment.py, mixing.py                what happens to a batch: crop, flip, auto-augment; mixup, cutmix
    normalize.py                         uint8 -> the model's normalised float input
    loaders.py                           how batches are drawn: the data config's checks, seeding, sharding, the
                                         loaders (the data config's keys and defaults: vit_train/config.py)
"""
from vit_train.data.cifar import ImageArrays, load_cifar
from vit_train.data.folders import load_rgb
from vit_train.data.loaders import (EvalLoader, Loaders, TrainLoader, build_loaders, check_data_config,
                                    saved_data_config)
from vit_train.data.normalize import normalization, preprocess_images, resize_images

__all__ = ["EvalLoader", "ImageArrays", "Loaders", "TrainLoader", "build_loaders", "check_data_config", "load_cifar",
           "load_rgb", "normalization", "preprocess_images", "resize_images", "saved_data_config"]
