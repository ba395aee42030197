"""Image folders (root/train/<class>/*, root/val/<class>/*): too large for memory, so DataLoader workers decode
and augment them on the host and hand uint8 batches to the device."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

from vit_train.data.augment import AUGMENT_POLICIES
from vit_train.errors import UserError

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


def folder_sources(data_cfg, img_size: int, device: torch.device) -> tuple[FolderSource, FolderSource, list[str]]:
    """root/train/<class>/* for training and root/val (or root/test)/<class>/* for evaluation, as uint8 tensors.

    Training images get a random-resized crop and a flip (and the auto-augment policy, per image); evaluation
    images are resized to img_size / 0.875 and centre-cropped, the usual ImageNet evaluation.
    """
    root = Path(data_cfg.data_dir)
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise UserError(f"{root} needs train/<class>/* and val/<class>/* (or test/<class>/*) folders for "
                        "data.name=imagefolder; point data.data_dir at such a tree")
    train_steps = [v2.ToImage(), v2.RandomResizedCrop(img_size, antialias=True)]
    if data_cfg.hflip:
        train_steps.append(v2.RandomHorizontalFlip())
    if data_cfg.auto_augment != "none":
        train_steps.append(AUGMENT_POLICIES[data_cfg.auto_augment].per_image_transform())
    train = image_folder(root / "train", v2.Compose(train_steps))
    test = image_folder(test_dir, v2.Compose([v2.ToImage(), v2.Resize(round(img_size / 0.875), antialias=True),
                                              v2.CenterCrop(img_size)]))
    if test.classes != train.classes:
        raise UserError(f"{test_dir} and {root / 'train'} hold different class folders; give them the same ones")
    workers = data_cfg.num_workers
    return FolderSource(train, workers, device), FolderSource(test, workers, device), train.classes


