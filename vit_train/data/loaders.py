"""How batches are drawn: the data config, seeded shuffling and augmentation draws, sharding over ranks, and the
loaders the trainer and evaluator iterate.

At 32x32 a ViT sees a handful of tokens per image, so the model is cheap and a PIL + DataLoader pipeline would
starve it. In-memory datasets (CIFAR, synthetic) therefore live on the device as one uint8 tensor per split, and
each step gathers its batch by index and augments it there, per sample, in a fixed number of batched tensor
operations whatever the batch size:

    uint8 split --index--> random_crop_flip --> apply_policy_ops --> preprocess_images --> RandomErasing --> LabelMixing
    on device              (one gather)         (each op once a      (float, normalise,    (boxes of noise)  (mixup /
                                                 round, batched)      resize)                                 cutmix)

Image folders cannot live in memory; they go through torchvision's ImageFolder and DataLoader workers, which
decode and crop on the host and hand uint8 batches to the same `preprocess_images`, erasing and mixing on the
device.

Reproducibility: every random choice is drawn on the host from a numpy Generator keyed by (seed, stream, epoch,
batch), never from a global RNG. The epoch's permutation depends on (seed, epoch) only and each global batch's
augmentation parameters on (seed, epoch, batch) only (an alternating flip on (seed, image, epoch)), so a resumed
run that calls `batches(epoch, start=k)` sees exactly the batches the uninterrupted run saw from batch k on, and N
ranks with per-rank batch G/N see, between them, the same samples with the same augmentation as one process with
batch G (random erasing's boxes and noise too). Mixup and cutmix pair images within each rank's batch, as timm
and DeiT do. (numpy rather than torch.Generator because mixup needs Beta samples, which torch cannot draw from an
explicit generator.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import ml_collections
import numpy as np
import torch

from vit_train.config import DATASETS, EVAL_SPLITS, NORMALIZATIONS, default_data_config
from vit_train.data.augment import AUGMENT_POLICIES, PADDING_MODES, DeviceAugmentation, RandomErasing
from vit_train.data.cifar import ImageArrays, load_cifar
from vit_train.data.folders import folder_data
from vit_train.data.mixing import LabelMixing
from vit_train.data.normalize import preprocess_images
from vit_train.data.synthetic import make_synthetic
from vit_train.errors import UserError
from vit_train.runtime import to_device

# --------------------------------------------------------------------------------------------------------------
# Seeded randomness: a Generator per (seed, stream, epoch[, batch]), so no state carries over between steps.

SHUFFLE, AUGMENT, WORKERS, FIRST_FLIPS = range(4)


def keyed_rng(*key: int) -> np.random.Generator:
    """A generator determined by the whole key (numpy's SeedSequence hashes every element)."""
    return np.random.default_rng(key)


# --------------------------------------------------------------------------------------------------------------
# Where batches come from: a uint8 tensor on the device, or an image folder read by DataLoader workers.

class TensorSource:
    """A split held on the device."""

    def __init__(self, split: ImageArrays, device: torch.device):
        self.images, self.labels = split.images.to(device), split.labels.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def fetch(self, index_batches: list[np.ndarray], worker_seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches' images and labels, gathered on the device (worker_seed: nothing here is random)."""
        for indices in index_batches:
            rows = to_device(indices, self.labels.device)
            yield self.images[rows], self.labels[rows]


# --------------------------------------------------------------------------------------------------------------
# Loaders: what the trainer and evaluator iterate.

class TrainLoader:
    """The training batches of one rank: seeded per-epoch shuffle, drop_last, augmentation, optional mixing.

    Global batch b of an epoch is perm[b*G:(b+1)*G] with G = batch_size * world_size and perm seeded by
    (seed, epoch); rank r takes the r-th contiguous slice of it. For image folders the crop, flip and policy run
    in DataLoader workers, seeded per epoch: a resumed run gets the same images but not bit-identical crops.
    """

    def __init__(self, source, data_cfg, *, img_size: int, batch_size: int, seed: int, rank: int, world_size: int,
                 augmentation: Optional[DeviceAugmentation], mixing: Optional[LabelMixing],
                 erasing: Optional[RandomErasing] = None):
        self.source, self.data_cfg, self.img_size = source, data_cfg, img_size
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.global_batch = batch_size * world_size
        self.augmentation, self.mixing, self.erasing = augmentation, mixing, erasing
        # Set by the trainer before it draws each batch: whether the step it is for trains on every patch, so that
        # the batch is cropped as those steps are (data.all_patches_crop_padding). Batches are drawn one at a
        # time, as the steps ask for them, so it always applies to the next one.
        self.every_patch = False
        # Alternating flips (Jordan 2024, airbench): image i is flipped in epoch e when first_flips[i] differs
        # from e's parity, so over any two epochs it is seen once each way, where coins repeat a side half the time.
        self.first_flips = None
        if data_cfg.alternate_flips:
            self.first_flips = keyed_rng(seed, FIRST_FLIPS).random(len(source)) < 0.5

    def __len__(self) -> int:
        return len(self.source) // self.global_batch

    def batch_indices(self, epoch: int, start: int = 0) -> list[np.ndarray]:
        """This rank's sample indices for each batch of the epoch from batch `start` on.

        With repeated augmentation R > 1 (Hoffer et al. 2020, as DeiT trains ViTs), each image of the permutation
        is repeated R times in a row and the epoch keeps its length: it sees 1/R of the images, R times each, every
        copy with its own crop, flip and policy draws. Ranks take disjoint parts of the global batch as always, so
        the R processes of DDP see between them exactly what one process sees; copies mostly share a rank, where
        DeiT's sampler spreads them, which changes nothing for a ViT (no batch statistics) as the gradient is the
        global batch's mean either way.
        """
        perm = keyed_rng(self.seed, SHUFFLE, epoch).permutation(len(self.source))
        repeats = self.data_cfg.repeated_augmentation
        if repeats > 1:
            perm = np.repeat(perm, repeats)[:len(self.source)]
        firsts = (b * self.global_batch + self.rank * self.batch_size for b in range(start, len(self)))
        return [perm[first:first + self.batch_size] for first in firsts]

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, targets) for each batch of the epoch from batch `start` on; see the class docstring."""
        worker_seed = int(keyed_rng(self.seed, WORKERS, epoch).integers(2 ** 62))
        index_batches = self.batch_indices(epoch, start)
        fetched = self.source.fetch(index_batches, worker_seed)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for b, indices, (images, labels) in zip(range(start, len(self)), index_batches, fetched):
            rng = keyed_rng(self.seed, AUGMENT, epoch, b)
            if self.augmentation is not None:
                params = self.augmentation.draw(rng, self.global_batch, self.every_patch)[mine]
                if self.first_flips is not None:
                    params.flips = self.first_flips[indices] ^ bool(epoch % 2)
                images = self.augmentation(images, params)
            x = preprocess_images(images, self.data_cfg, self.img_size)
            if self.erasing is not None:
                x = self.erasing(x, self.erasing.draw(rng, self.global_batch, *x.shape[-2:])[mine])
            yield self.mixing(x, labels, rng) if self.mixing is not None else (x, labels)


class EvalLoader:
    """Every sample of a split exactly once across ranks: rank r gets the r-th contiguous part, unaugmented.
    `split` names it ('test', or 'train' for vit-eval --split train)."""

    def __init__(self, source, data_cfg, *, img_size: int, batch_size: int, rank: int, world_size: int,
                 split: str = "test"):
        self.source, self.data_cfg, self.img_size, self.batch_size = source, data_cfg, img_size, batch_size
        self.split = split
        n = len(source)
        self.indices = np.arange(n * rank // world_size, n * (rank + 1) // world_size)
        self.num_samples = len(self.indices)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same batches for every epoch; `epoch` is accepted so both loaders are called alike."""
        firsts = range(start * self.batch_size, self.num_samples, self.batch_size)
        chunks = [self.indices[first:first + self.batch_size] for first in firsts]
        for images, labels in self.source.fetch(chunks, worker_seed=0):
            yield preprocess_images(images, self.data_cfg, self.img_size), labels


@dataclass
class Loaders:
    """What build_loaders returns: this rank's loaders (train None when not asked for) and the dataset's classes."""
    train: Optional[TrainLoader]
    test: EvalLoader
    num_classes: int
    class_names: list[str]
    note: str = ""  # how the images were read, where that is worth saying (image folders)
    resumes_exactly: bool = True  # False for DataLoader workers: their random crops are drawn anew (TrainLoader)


# Keys added after configs were first saved whose default is not what a config saved without them did: such a
# config (a checkpoint's) gets the old behaviour, so a resumed or evaluated run reads its data as it was trained.
BEHAVIOUR_BEFORE_KEY = {"folder_in_memory": False}


def saved_data_config(saved: dict) -> ml_collections.ConfigDict:
    """The data config of a saved (checkpoint) config: every key it lacks takes its default, or its old behaviour."""
    data_cfg = default_data_config()
    data_cfg.update({key: value for key, value in BEHAVIOUR_BEFORE_KEY.items() if key not in saved})
    data_cfg.update(saved)
    return data_cfg


def check_data_config(data_cfg) -> None:
    """Raise UserError for a data config that cannot work, naming the field as `--set data.X` spells it."""
    choices = {"name": DATASETS, "padding_mode": PADDING_MODES, "auto_augment": ("none", *AUGMENT_POLICIES),
               "normalize": NORMALIZATIONS}
    for field, allowed in choices.items():
        if data_cfg[field] not in allowed:
            raise UserError(f"unknown data.{field} {data_cfg[field]!r}; choose one of {', '.join(allowed)}")
    for field in ("crop_padding", "all_patches_crop_padding", "mixup_alpha", "cutmix_alpha", "num_workers",
                  "repeated_augmentation"):
        value = data_cfg.get(field)
        if value is None and field == "all_patches_crop_padding":
            continue  # unset: the steps on every patch crop by crop_padding
        if value is None or value < 0:
            raise UserError(f"data.{field} must be >= 0, got {value}")
    if not 0 <= data_cfg.random_erasing <= 1:
        raise UserError(f"data.random_erasing is a probability, in [0, 1]; got {data_cfg.random_erasing}")
    if data_cfg.alternate_flips and not data_cfg.hflip:
        raise UserError("data.alternate_flips orders the flips data.hflip draws, and data.hflip is off; "
                        "drop --set data.alternate_flips or turn data.hflip on")
    if data_cfg.alternate_flips and data_cfg.repeated_augmentation > 1:
        raise UserError("data.alternate_flips gives an image one flip per epoch, so the copies data."
                        "repeated_augmentation makes would all share it; use one of the two")
    for field in ("synthetic_train_size", "synthetic_test_size", "synthetic_num_classes"):
        if data_cfg[field] < 1:
            raise UserError(f"data.{field} must be >= 1, got {data_cfg[field]}")


def load_in_memory(data_cfg) -> tuple[ImageArrays, ImageArrays, list[str]]:
    if data_cfg.name == "synthetic":
        return make_synthetic(data_cfg)
    return load_cifar(data_cfg.name, data_cfg.data_dir, data_cfg.download)


def build_loaders(data_cfg, *, img_size: int, batch_size: int, eval_batch_size: int, device: torch.device,
                  seed: int, rank: int = 0, world_size: int = 1, with_train: bool = True,
                  eval_split: str = "test") -> Loaders:
    """Train and test loaders for this rank; batch_size is the per-rank step batch (global / world_size). Without
    `with_train` (evaluation) only the evaluated split is read, and Loaders.train is None. `eval_split` is the
    split Loaders.test reads: 'test', or (evaluation only) 'train': the training images unaugmented, seen as
    the test split is, for how well a model fits them."""
    check_data_config(data_cfg)
    if eval_split not in EVAL_SPLITS or (with_train and eval_split != "test"):
        raise ValueError(f"eval_split {eval_split!r}: one of {EVAL_SPLITS}, and 'test' when training")
    if min(img_size, batch_size, eval_batch_size) < 1 or seed < 0 or not 0 <= rank < world_size:
        raise UserError(f"need img_size, batch sizes >= 1, seed >= 0 and 0 <= rank < world_size; got {img_size}, "
                        f"{batch_size}, {eval_batch_size}, {seed}, {rank}, {world_size}")
    device = torch.device(device)
    if data_cfg.name == "imagefolder":
        train, test, class_names, note = folder_data(data_cfg, img_size, device, with_train, eval_split)
    else:
        train, test, class_names, note = (*load_in_memory(data_cfg), "")
        if eval_split == "train":
            test = train
    on_device = isinstance(test, ImageArrays)  # held on the device, augmented there a batch at a time
    test_loader = EvalLoader(TensorSource(test, device) if on_device else test, data_cfg, img_size=img_size,
                             batch_size=eval_batch_size, rank=rank, world_size=world_size, split=eval_split)
    if not with_train:
        return Loaders(None, test_loader, len(class_names), class_names, note)
    if on_device:
        train_source = TensorSource(train, device)
        augmentation = DeviceAugmentation(data_cfg, image_size=train.images.shape[-1])
    else:  # decoded and augmented per image by the workers
        if data_cfg.alternate_flips:
            raise UserError("data.alternate_flips needs the images in memory, and this image folder is read by "
                            "DataLoader workers, which flip each image by a coin; drop --set data.alternate_flips")
        train_source, augmentation = train, None
    mixing = None
    if data_cfg.mixup_alpha > 0 or data_cfg.cutmix_alpha > 0:
        mixing = LabelMixing(data_cfg.mixup_alpha, data_cfg.cutmix_alpha, len(class_names))
    erasing = RandomErasing(data_cfg.random_erasing) if data_cfg.random_erasing > 0 else None
    loaders = Loaders(
        train=TrainLoader(train_source, data_cfg, img_size=img_size, batch_size=batch_size, seed=seed, rank=rank,
                          world_size=world_size, augmentation=augmentation, mixing=mixing, erasing=erasing),
        test=test_loader,
        num_classes=len(class_names), class_names=class_names, note=note, resumes_exactly=on_device)
    if len(loaders.train) == 0:
        raise UserError(f"a global batch of {batch_size * world_size} (batch size {batch_size} x {world_size} "
                        f"ranks) is larger than the {len(train_source)} training images; lower the batch size")
    return loaders
