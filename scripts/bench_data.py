"""Images/s of the device-resident CIFAR-10 path against torchvision's CIFAR10 + PIL transforms + DataLoader, and
of each augmentation policy batched against the same policy applied by torchvision in groups.

    python scripts/bench_data.py [--data-dir DIR] [--device cpu] [--threads 1] [--batch-size 512] [--batches 20]
                                 [--repeats 3]

The first two pipelines do the same work per image at 32 px: random crop after 4-pixel reflect padding, horizontal
flip, normalisation with the dataset's mean and std. A further row adds a resize to 224 px. The augmentation table
times the device path with each policy (and random erasing, mixup/cutmix) twice: as vit-train runs it, every op
once per round on all the images drawn for it, and as it ran before (`grouped_policy_ops` below, kept here as the
baseline): torchvision's op called once per group of images that share (op, magnitude) in a round, which for
TrivialAugment's random magnitudes is close to once per image. Each repeat times --batches batches of every
pipeline in turn, so all see the same machine load, after a warm-up batch (worker start-up is not throughput);
the tables give the median over repeats. Without --data-dir the script first writes the full CIFAR-10 (JPEG copy)
from ../shared/data into a temporary folder (about 10 s).

--threads sets torch's intra-op threads in the benchmark's own process, where the fast path runs (DataLoader
workers always use one). The default, 1, is the conservative comparison (one core against two worker processes)
and the steady one on a small shared machine, where a busy second core makes every 2-thread op wait on a
descheduled thread.
"""
import argparse
import dataclasses
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision import transforms
from torchvision.transforms.v2 import functional as TF

from vit_train.config import default_data_config
from vit_train.data import build_loaders, normalization
from vit_train.data.augment import IDENTITY, OP_NAMES, DeviceAugmentation

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BASELINE = "DataLoader: torchvision CIFAR10 + PIL crop/flip/normalise, 2 workers"
FAST_PATH = "fast path: crop + flip + normalise"


class UncheckedCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10 without its per-file md5s (None skips the check), which the JPEG copy cannot match."""
    train_list = [[name, None] for name, _md5 in torchvision.datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _md5 in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}


def dataloader_epochs(data_dir: str, batch_size: int):
    """A function that starts an epoch of the classic pipeline: fresh workers, reshuffled."""
    mean, std = normalization(default_data_config())
    pil_pipeline = transforms.Compose([
        transforms.RandomCrop(32, padding=4, padding_mode="reflect"), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(
        UncheckedCIFAR10(data_dir, train=True, transform=pil_pipeline), batch_size=batch_size, shuffle=True,
        num_workers=2, drop_last=True)
    return lambda: iter(loader)


def fast_path_epochs(data_dir: str, batch_size: int, device: torch.device, img_size: int = 32, grouped=False,
                     **fields):
    """A function that starts an epoch of the device-resident path, the data already on the device; with
    grouped=True the policy runs as before batching (GroupedAugmentation)."""
    cfg = default_data_config()
    cfg.update(data_dir=data_dir, download=False, **fields)
    train = build_loaders(cfg, img_size=img_size, batch_size=batch_size, eval_batch_size=batch_size,
                          device=device, seed=0).train
    if grouped:
        train.augmentation = GroupedAugmentation(cfg, image_size=32)
    return lambda: train.batches(epoch=0)


# The baseline: the policies as vit-train applied them before they were batched, with torchvision's uint8 ops
# (nearest-neighbour resampling, zero fill) taking one magnitude per call.
TORCHVISION_OPS = {
    "ShearX": lambda x, m: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
                                     shear=[math.degrees(math.atan(m)), 0.0], center=[0, 0]),
    "ShearY": lambda x, m: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
                                     shear=[0.0, math.degrees(math.atan(m))], center=[0, 0]),
    "TranslateX": lambda x, m: TF.affine(x, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0]),
    "TranslateY": lambda x, m: TF.affine(x, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0]),
    "Rotate": lambda x, m: TF.rotate(x, m),
    "Brightness": lambda x, m: TF.adjust_brightness(x, 1.0 + m),
    "Color": lambda x, m: TF.adjust_saturation(x, 1.0 + m),
    "Contrast": lambda x, m: TF.adjust_contrast(x, 1.0 + m),
    "Sharpness": lambda x, m: TF.adjust_sharpness(x, 1.0 + m),
    "Posterize": lambda x, m: TF.posterize(x, 8 - round(m)),
    "Solarize": lambda x, m: TF.solarize(x, 255.0 * (1.0 - m)),
    "AutoContrast": lambda x, m: TF.autocontrast(x),
    "Equalize": lambda x, m: TF.equalize(x),
    "Invert": lambda x, m: TF.invert(x),
}


def grouped_policy_ops(images: torch.Tensor, ops: np.ndarray, magnitudes: np.ndarray) -> torch.Tensor:
    """Image i gets op ops[i, k] at magnitudes[i, k], round after round: one torchvision call per (op, magnitude)
    group of a round, so RandAugment makes up to 22 calls a round and TrivialAugment a few hundred a batch."""
    for k in range(ops.shape[1]):
        groups, group_of = np.unique(np.stack([ops[:, k], magnitudes[:, k]], axis=1), axis=0, return_inverse=True)
        for g, (op, magnitude) in enumerate(groups):
            if op != IDENTITY:
                rows = torch.from_numpy(np.flatnonzero(group_of.ravel() == g)).to(images.device)
                images[rows] = TORCHVISION_OPS[OP_NAMES[int(op)]](images[rows], float(magnitude))
    return images


class GroupedAugmentation(DeviceAugmentation):
    """vit-train's crop and flip, then the policy by grouped_policy_ops."""

    def __call__(self, images, params):
        no_policy = dataclasses.replace(params, ops=params.ops[:, :0], magnitudes=params.magnitudes[:, :0])
        return grouped_policy_ops(super().__call__(images, no_policy), params.ops, params.magnitudes)


# Augmentation rows: (name, data config fields, whether the grouped baseline differs)
AUGMENTATIONS = [
    ("crop + flip", {}, False),
    ("+ RandAugment (2 ops, magnitude 9)", {"auto_augment": "randaugment"}, True),
    ("+ TrivialAugmentWide", {"auto_augment": "trivialaugment"}, True),
    ("+ AutoAugment (CIFAR-10 policy)", {"auto_augment": "autoaugment"}, True),
    ("+ random erasing 0.25", {"random_erasing": 0.25}, False),
    ("+ mixup 0.8 / cutmix 1.0", {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}, False),
    ("+ AutoAugment, erasing 0.25, mixup/cutmix (Lee et al.)",
     {"auto_augment": "autoaugment", "random_erasing": 0.25, "mixup_alpha": 0.8, "cutmix_alpha": 1.0}, True),
]


def images_per_second(start_epoch, num_batches: int, batch_size: int, device: torch.device) -> float:
    """Time num_batches after a warm-up batch. The epoch's iterator, and with it any worker, ends on return, so
    one pipeline's workers never run while another is timed."""
    batches = start_epoch()
    next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
        images, _targets = next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return num_batches * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="a folder holding cifar-10-batches-py/")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the fast path")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per pipeline and repeat, "
                        "fewer than an epoch holds")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir
        if data_dir is None:
            subprocess.run([sys.executable, str(SHARED_DATA / "make_cifar10.py"), scratch], check=True)
            data_dir = scratch
        pipelines = {
            BASELINE: dataloader_epochs(data_dir, args.batch_size),
            FAST_PATH: fast_path_epochs(data_dir, args.batch_size, device),
            "fast path + resize to 224 px": fast_path_epochs(data_dir, args.batch_size, device, img_size=224),
        }
        for name, fields, grouped in AUGMENTATIONS:
            pipelines[("batched", name)] = fast_path_epochs(data_dir, args.batch_size, device, **fields)
            if grouped:
                pipelines[("grouped", name)] = fast_path_epochs(data_dir, args.batch_size, device, grouped=True,
                                                                **fields)
        rates = {name: [] for name in pipelines}
        for _ in range(args.repeats):
            for name, start_epoch in pipelines.items():
                rates[name].append(images_per_second(start_epoch, args.batches, args.batch_size, device))

    median = {name: statistics.median(measured) for name, measured in rates.items()}
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{args.batches} batches x {args.repeats} repeats, median images/s:")
    for name in (BASELINE, FAST_PATH, "fast path + resize to 224 px"):
        print(f"  {median[name]:>10,.0f}  {name}   (repeats: {', '.join(f'{r:,.0f}' for r in rates[name])})")
    print(f"fast path / DataLoader = {median[FAST_PATH] / median[BASELINE]:.1f}x")
    print("\nfast path with augmentation, median images/s: batched (each op once a round) | grouped (torchvision "
          "per (op, magnitude), the old way) | batched / grouped")
    for name, _, grouped in AUGMENTATIONS:
        batched = median[("batched", name)]
        old = f"{median[('grouped', name)]:>10,.0f} | {batched / median[('grouped', name)]:5.1f}x" if grouped else ""
        print(f"  {batched:>10,.0f} | {old:>20}  {name}")


if __name__ == "__main__":
    main()
