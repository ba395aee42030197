"""Image folders (root/train/<class>/*, root/val/<class>/*).

A folder whose images, decoded at the run's image size, fit in IN_MEMORY_BYTES is decoded once into uint8 arrays,
cached in the weights cache folder under a key of the folder's contents (every file's path, size and modification
time) and the image size, and from then on takes CIFAR's path: held on the device, augmented there per batch. A
changed folder has another key and is decoded anew. Larger folders go through DataLoader workers, which decode and
augment on the host and hand uint8 batches to the device.
"""
from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torchvision.transforms import v2

from vit_train.checkpoint import write_atomically
from vit_train.data.augment import AUGMENT_POLICIES
from vit_train.data.cifar import ImageArrays
from vit_train.errors import UserError
from vit_train.hub import cache_dir

# Decoded pixels up to this size are held in memory (and on the device) rather than read by workers every epoch.
IN_MEMORY_BYTES = 4 * 2**30
FOLDER_CACHE_VERSION = 1  # part of the cache key: a change in how images are decoded makes new files

class FolderSource:
    """An ImageFolder whose transform returns uint8 tensors; DataLoader workers decode and augment on the host."""

    def __init__(self, dataset: torchvision.datasets.ImageFolder, num_workers: int, device: torch.device):
        self.dataset, self.num_workers, self.device = dataset, num_workers, device

    def __len__(self) -> int:
        return len(self.dataset)

    def fetch(self, index_batches: list[np.ndarray], worker_seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches, loaded by workers whose random transforms are seeded from worker_seed."""
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=[indices.tolist() for indices in index_batches],
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(worker_seed))
        try:
            for images, labels in loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        except UserError as err:
            # A worker's exception comes back with its traceback folded into the message; keep our one line.
            prefix = f"{UserError.__module__}.{UserError.__qualname__}: "
            raise UserError(str(err).rstrip().splitlines()[-1].removeprefix(prefix)) from None


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path} ({type(err).__name__}: {err}); remove or replace it") from None


def image_folder(root: Path, transform) -> torchvision.datasets.ImageFolder:
    try:
        return torchvision.datasets.ImageFolder(str(root), transform=transform, loader=load_rgb)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise UserError(f"{root} is not an image folder ({err}); expected {root}/<class>/<image files>") from None


def folder_data(data_cfg, img_size: int, device: torch.device) -> tuple:
    """(train, test, class names, how they were read) of root/train/<class>/* and root/val (or root/test)/<class>/*,
    the folders scanned once: ImageArrays decoded at img_size (decoded_splits) when they fit in memory and
    data.folder_in_memory is on, else FolderSources for DataLoader workers (worker_transforms)."""
    root = Path(data_cfg.data_dir).expanduser()  # as torchvision's ImageFolder reads it
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise UserError(f"{root} needs train/<class>/* and val/<class>/* (or test/<class>/*) folders for "
                        "data.name=imagefolder; point data.data_dir at such a tree")
    train, test = image_folder(root / "train", None), image_folder(test_dir, None)
    if test.classes != train.classes:
        raise UserError(f"{test_dir} and {root / 'train'} hold different class folders; give them the same ones")
    fits = (len(train) + len(test)) * 3 * img_size**2 <= IN_MEMORY_BYTES
    if data_cfg.folder_in_memory and fits:
        decoded_train, decoded_test, note = decoded_splits(train, test, img_size)
        return decoded_train, decoded_test, train.classes, note
    train.transform, test.transform = worker_transforms(data_cfg, img_size)
    workers = data_cfg.num_workers
    return (FolderSource(train, workers, device), FolderSource(test, workers, device), train.classes,
            "read by DataLoader workers")


def decoded_splits(train, test, img_size: int) -> tuple[ImageArrays, ImageArrays, str]:
    """(train, test, what was done): the folders' images decoded at img_size x img_size (the shorter side resized
    to img_size, the centre cropped), from the cache when it holds these folders as they are now."""
    key = hashlib.sha256(f"{FOLDER_CACHE_VERSION} {img_size}".encode())
    for path, label in train.samples + test.samples:
        stat = Path(path).stat()
        key.update(f"\n{path} {label} {stat.st_size} {stat.st_mtime_ns}".encode())
    cached = cache_dir() / "folders" / f"{key.hexdigest()[:32]}.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as arrays:
            splits = [ImageArrays(*(torch.from_numpy(arrays[f"{split}_{part}"]) for part in ("images", "labels")))
                      for split in ("train", "test")]
        return (*splits, f"decoded images from {cached}")
    started = time.perf_counter()
    splits = [decode_split(dataset, img_size) for dataset in (train, test)]
    seconds = time.perf_counter() - started
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **{f"{name}_{part}": array.numpy() for name, split in zip(("train", "test"), splits)
                            for part, array in (("images", split.images), ("labels", split.labels))})
        write_atomically(cached, lambda f: f.write(buffer.getbuffer()))
        where = f"cached in {cached}"
    except (OSError, UserError) as error:  # an unwritable cache costs the next run a decode, nothing more
        where = f"not cached ({error})"
    return (*splits, f"decoded {len(train) + len(test)} images in {seconds:.0f} s, {where}")


def decode_split(dataset: torchvision.datasets.ImageFolder, img_size: int) -> ImageArrays:
    images = np.empty((len(dataset), 3, img_size, img_size), np.uint8)
    for i, (path, _) in enumerate(dataset.samples):
        square = ImageOps.fit(load_rgb(path), (img_size, img_size), Image.BICUBIC)
        images[i] = np.asarray(square).transpose(2, 0, 1)
    return ImageArrays(torch.from_numpy(images), torch.tensor(dataset.targets, dtype=torch.int64))


def worker_transforms(data_cfg, img_size: int) -> tuple:
    """The workers' per-image transforms to uint8 tensors: for training a random-resized crop and a flip (and the
    auto-augment policy); for evaluation a resize to img_size / 0.875 and a centre crop, the usual ImageNet
    evaluation."""
    train_steps = [v2.ToImage(), v2.RandomResizedCrop(img_size, antialias=True)]
    if data_cfg.hflip:
        train_steps.append(v2.RandomHorizontalFlip())
    if data_cfg.auto_augment != "none":
        train_steps.append(AUGMENT_POLICIES[data_cfg.auto_augment].per_image_transform())
    return v2.Compose(train_steps), v2.Compose([v2.ToImage(), v2.Resize(round(img_size / 0.875), antialias=True),
                                                v2.CenterCrop(img_size)])
