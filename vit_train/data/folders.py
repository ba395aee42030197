"""Image folders (root/train/<class>/*, root/val/<class>/*).

A folder whose images, decoded at the run's image size, fit in IN_MEMORY_BYTES is decoded once into a uint8 array
per split, cached in the weights cache folder (cache_dir()/folders) and from then on takes CIFAR's path: held on
the device, augmented there per batch. Larger folders go through DataLoader workers, which decode and augment on
the host and hand uint8 batches to the device.

The cache is disposable. A split's file is named by the split folder and the image size, then by a key of its
contents: every file's path, label, size, modification and change time (ctime) and inode. A file rewritten in
place changes its ctime even when its size and mtime are set back, so it is decoded anew; publishing a new file
removes the older ones of the same folder and size. A file that does not read back as the array it should be (a
truncated or foreign file) is named in a warning and decoded again. Each file is a .npy written atomically under
a temporary name of its own, so two processes decoding one folder never mix their bytes, and is read with one
allocation the size of the decoded pixels, as it is decoded into one.
"""
from __future__ import annotations

import copy
import hashlib
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from vit_train.checkpoint import write_atomically
from vit_train.config import default_data_config
from vit_train.data.augment import AUGMENT_POLICIES
from vit_train.data.cifar import ImageArrays
from vit_train.errors import UserError, first_line, warn
from vit_train.hub import cache_dir

# Decoded pixels up to this size are held in memory (and on the device) rather than read by workers every epoch.
IN_MEMORY_BYTES = 4 * 2**30
FOLDER_CACHE_VERSION = 2  # part of the cache key: a change in how images are decoded or stored makes new files


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


def unreadable(path: str, error: Exception) -> UserError:
    """The one line for an image file that cannot be read, whichever path (in memory, workers) meets it."""
    why = "a broken symbolic link" if os.path.islink(path) and not os.path.exists(path) else \
        f"{type(error).__name__}: {error}"
    return UserError(f"cannot read image {path} ({why}); remove or replace it")


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise unreadable(path, err) from None


def image_folder(root: Path, transform, skipped: list) -> torchvision.datasets.ImageFolder:
    """torchvision's ImageFolder of `root`; the files it passes over (suffixes it does not read as images, such as
    .gif) are appended to `skipped`."""
    def is_image(path: str) -> bool:
        if has_file_allowed_extension(path, IMG_EXTENSIONS):
            return True
        skipped.append(path)
        return False

    try:
        return torchvision.datasets.ImageFolder(str(root), transform=transform, loader=load_rgb, is_valid_file=is_image)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise UserError(f"{root} is not an image folder ({err}); expected {root}/<class>/<image files>") from None


def folder_data(data_cfg, img_size: int, device: torch.device, with_train: bool = True,
                eval_split: str = "test") -> tuple:
    """(train, test, class names, how they were read) of root/train/<class>/* and root/val (or root/test)/<class>/*,
    the folders scanned once: ImageArrays decoded at img_size (decoded_split) when they fit in memory and
    data.folder_in_memory is on, else FolderSources for DataLoader workers (worker_transforms). Without
    `with_train` (evaluation) train is None and its images are never read, only its class folders listed.
    eval_split='train' (evaluation only): `test` holds the training images instead, read as the test split is."""
    root = Path(data_cfg.data_dir).expanduser()  # as torchvision's ImageFolder reads it
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise UserError(f"{root} needs train/<class>/* and val/<class>/* (or test/<class>/*) folders for "
                        "data.name=imagefolder; point data.data_dir at such a tree")
    skipped = []
    train, test = image_folder(root / "train", None, skipped), image_folder(test_dir, None, skipped)
    if test.classes != train.classes:
        raise UserError(f"{test_dir} and {root / 'train'} hold different class folders; give them the same ones")
    if skipped:
        suffixes = sorted({Path(path).suffix.lower() or Path(path).name for path in skipped})
        warn(f"skipped {len(skipped)} files in {root} that torchvision does not read as images ({', '.join(suffixes)}"
             f"; it reads {' '.join(IMG_EXTENSIONS)}), e.g. {skipped[0]}; convert them to train on them")
    # Whether the folder is held in memory depends on both splits, so evaluation sees its test split as training did.
    fits = (len(train) + len(test)) * 3 * img_size**2 <= IN_MEMORY_BYTES
    if eval_split == "train":  # the same listing, with a transform of its own: the test split's, set below
        test = copy.copy(train)
    if data_cfg.folder_in_memory and fits:
        if data_cfg.num_workers != default_data_config().num_workers:
            warn(f"data.num_workers is read only when an image folder is read by DataLoader workers "
                 f"(data.folder_in_memory=False, or over {IN_MEMORY_BYTES / 2**30:.0f} GiB decoded); this one is "
                 "decoded into memory, so it does nothing")
        started = time.perf_counter()
        decoded, notes = zip(*(decoded_split(dataset, img_size) if dataset else (None, None)
                               for dataset in (train if with_train else None, test)))
        done = [note for note in notes if note]
        return (*decoded, train.classes,
                f"{'; '.join(done)} ({time.perf_counter() - started:.0f} s; cache: {cache_dir() / 'folders'})")
    train.transform, test.transform = worker_transforms(data_cfg, img_size)
    workers = data_cfg.num_workers
    return (FolderSource(train, workers, device) if with_train else None, FolderSource(test, workers, device),
            train.classes, "read by DataLoader workers")


def cache_file(dataset: torchvision.datasets.ImageFolder, img_size: int) -> Path:
    """Where a split's decoded images are cached: <split folder key>-<img_size>px-<contents key>.npy."""
    root = Path(dataset.root).absolute()
    contents = hashlib.sha256(f"{FOLDER_CACHE_VERSION} {img_size}".encode())
    for path, label in dataset.samples:
        try:
            stat = os.stat(path)
        except OSError as err:  # a broken symbolic link, a file removed since the scan
            raise unreadable(path, err) from None
        contents.update(f"\n{path} {label} {stat.st_size} {stat.st_mtime_ns} {stat.st_ctime_ns} {stat.st_ino}"
                        .encode())
    folder = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return cache_dir() / "folders" / f"{folder}-{img_size}px-{contents.hexdigest()[:32]}.npy"


def cached_images(path: Path, shape: tuple) -> Optional[np.ndarray]:
    """The array cached at `path`, or None when there is none or it is damaged (said in a warning)."""
    try:
        images = np.load(path, allow_pickle=False)  # a .npy is read straight into one array of its size
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as error:  # truncated, garbage, or a pickle numpy refuses
        why = "not a .npy array" if "pickle" in str(error) else first_line(error)
    else:
        if images.shape == shape and images.dtype == np.uint8:
            return images
        why = f"it holds {images.dtype} {images.shape}, not uint8 {shape}"
    warn(f"the decoded-image cache {path} is damaged ({why}); decoding the folder again (the cache is disposable)")
    return None


def decoded_split(dataset: torchvision.datasets.ImageFolder, img_size: int) -> tuple[ImageArrays, str]:
    """(images, what was done, e.g. "train: 800 images decoded and cached"): the split's images decoded at
    img_size x img_size (the shorter side resized to img_size, the centre cropped), from the cache when it holds
    this split as it is now."""
    path = cache_file(dataset, img_size)
    labels = torch.tensor(dataset.targets, dtype=torch.int64)
    shape = (len(dataset), 3, img_size, img_size)
    what = f"{Path(dataset.root).name}: {len(dataset)} images"
    images = cached_images(path, shape)
    if images is not None:
        return ImageArrays(torch.from_numpy(images), labels), f"{what} from the cache"
    images = np.empty(shape, np.uint8)  # decoded into in place: the only copy of the pixels
    for i, (image_path, _) in enumerate(dataset.samples):
        square = ImageOps.fit(load_rgb(image_path), (img_size, img_size), Image.BICUBIC)
        images[i] = np.asarray(square).transpose(2, 0, 1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: np.lib.format.write_array(f, images, allow_pickle=False))
        for old in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.npy"):  # this folder at this size, as it was
            if old != path:
                old.unlink(missing_ok=True)
        for old in path.parent.glob("*.npz"):  # the format before .npy, never read again
            old.unlink(missing_ok=True)
        done = "decoded and cached"
    except (OSError, UserError) as error:  # an unwritable cache costs the next run a decode, nothing more
        done = f"decoded, not cached ({error})"
    return ImageArrays(torch.from_numpy(images), labels), f"{what} {done}"


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
