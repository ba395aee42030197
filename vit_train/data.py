"""Datasets -> batches on the training device: CIFAR-10/100, image folders and a synthetic set.

At 32x32 a ViT sees a handful of tokens per image, so the model is cheap and a PIL + DataLoader pipeline would
starve it. In-memory datasets (CIFAR, synthetic) therefore live on the device as one uint8 tensor per split, and
each step gathers its batch by index and augments it there, per sample, in a few batched tensor operations:

    uint8 split on device --index--> random_crop_flip --> apply_policy_ops --> preprocess_images --> LabelMixing
                                     (one gather)         (grouped by op)      (float, normalise,     (mixup /
                                                                                resize)                cutmix)

Image folders cannot live in memory; they go through torchvision's ImageFolder and DataLoader workers, which
decode and crop on the host and hand uint8 batches to the same `preprocess_images` and mixing on the device.

Reproducibility: every random choice is drawn on the host from a numpy Generator keyed by (seed, stream, epoch,
batch), never from a global RNG. The epoch's permutation depends on (seed, epoch) only and each global batch's
augmentation parameters on (seed, epoch, batch) only, so a resumed run that calls `batches(epoch, start=k)` sees
exactly the batches the uninterrupted run saw from batch k on, and N ranks with per-rank batch G/N see, between
them, the same samples with the same augmentation as one process with batch G. (numpy rather than
torch.Generator because mixup needs Beta samples, which torch cannot draw from an explicit generator.)
"""
from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.datasets.utils import download_and_extract_archive, extract_archive
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vit_train.errors import UserError

DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")
PADDING_MODES = ("reflect", "zeros")
NORMALIZATIONS = ("dataset", "inception")

# Per-channel mean and std of each dataset's training images, on the 0..1 scale. Image folders get ImageNet's, the
# usual guess for photographs of unknown origin; the synthetic set's are those of its uniform colours plus noise.
DATASET_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.3, 0.3, 0.3)),
}
# Google's pretrained ViT weights were trained on inputs scaled to [-1, 1].
INCEPTION_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` section of a training config; users override fields with `--set data.X=...`."""
    return ml_collections.ConfigDict({
        "name": "cifar10",            # one of DATASETS
        "data_dir": "./data",         # holds cifar-10-batches-py/, cifar-100-python/, or an image folder tree
        "download": True,             # fetch CIFAR (checksum-verified) when its folder is missing
        "crop_padding": 4,            # random crop after padding by this many pixels; 0 disables the crop
        "padding_mode": "reflect",    # 'reflect' | 'zeros'
        "hflip": True,
        "auto_augment": "none",       # 'none' | 'randaugment' | 'trivialaugment'
        "mixup_alpha": 0.0,           # > 0 enables mixup; with cutmix too, each batch picks one of them 50/50
        "cutmix_alpha": 0.0,
        "normalize": "dataset",       # 'dataset' (its mean/std) | 'inception' (mean = std = 0.5)
        "num_workers": 2,             # DataLoader workers, imagefolder only
        "synthetic_train_size": 2048,
        "synthetic_test_size": 512,
        "synthetic_num_classes": 10,
    })


# --------------------------------------------------------------------------------------------------------------
# Normalisation and resizing: what every model input goes through, in training, evaluation and prediction.

def normalization(data_cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel on the 0..1 scale for this data config."""
    if data_cfg.normalize == "inception":
        return INCEPTION_STATS
    return DATASET_STATS[data_cfg.name]


def preprocess_images(images: torch.Tensor, data_cfg, img_size: int) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float32 (B, 3, img_size, img_size), normalised; resized bilinearly if needed."""
    mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) * 255 for v in normalization(data_cfg))
    x = images.to(torch.float32, copy=True).sub_(mean).div_(std)  # the copy keeps a float input from changing
    if x.shape[-2:] != (img_size, img_size):
        # Normalising first is exact (bilinear weights sum to 1) and cheaper when upsampling 32 px to 224 or 384.
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
    return x


# --------------------------------------------------------------------------------------------------------------
# CIFAR in its official python layout.

@dataclass(frozen=True)
class CifarLayout:
    files: type          # torchvision's dataset class: its folder and file names, download URL and checksum
    label_key: str
    num_classes: int


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(torchvision.datasets.CIFAR10, "labels", 10),
    "cifar100": CifarLayout(torchvision.datasets.CIFAR100, "fine_labels", 100),
}


@dataclass
class ImageArrays:
    """One split held in memory."""
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64


def load_cifar(name: str, data_dir: str, download: bool) -> tuple[ImageArrays, ImageArrays, list[str]]:
    """(train, test, class names) of CIFAR-10 or CIFAR-100 under data_dir, fetching it first if allowed."""
    layout = CIFAR_LAYOUTS[name]
    folder = Path(data_dir) / layout.files.base_folder
    if not folder.is_dir():
        fetch_cifar(layout, Path(data_dir), download)
    train = read_cifar_split(folder, [f for f, _md5 in layout.files.train_list], layout)
    test = read_cifar_split(folder, [f for f, _md5 in layout.files.test_list], layout)
    return train, test, read_cifar_class_names(folder, layout)


def fetch_cifar(layout: CifarLayout, data_dir: Path, download: bool) -> None:
    """Make data_dir/<base_folder> exist: extract an archive the user put there, else download and extract one."""
    archive = data_dir / layout.files.filename
    where = f"put {layout.files.filename} or the extracted {layout.files.base_folder}/ folder in {data_dir}"
    if archive.is_file():
        try:
            extract_archive(str(archive), str(data_dir))
        except Exception as err:  # tarfile and gzip raise several unrelated types for a damaged archive
            raise UserError(f"cannot extract {archive} ({type(err).__name__}: {err}); {where}") from None
        return
    if not download:
        raise UserError(f"no {layout.files.base_folder}/ folder in {data_dir} and downloading is off; {where}")
    created = not data_dir.exists()
    try:
        download_and_extract_archive(layout.files.url, str(data_dir), filename=layout.files.filename,
                                     md5=layout.files.tgz_md5)
    except (OSError, RuntimeError) as err:  # offline (URLError is an OSError) or a checksum mismatch
        # Leave nothing half-written: a partial archive would be mistaken for the user's own next time.
        archive.unlink(missing_ok=True)
        if created and not any(data_dir.iterdir()):
            data_dir.rmdir()
        raise UserError(f"downloading {layout.files.url} failed ({type(err).__name__}: {err}); {where}") from None


def read_pickle_dict(path: Path) -> dict:
    """The dict in a CIFAR pickle, with str keys whether it was written with str or bytes keys."""
    if not path.is_file():
        raise UserError(f"missing {path}; delete {path.parent} to download it again, or restore the file")
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="latin1")
    except Exception as err:  # a damaged pickle can raise almost anything: EOFError, UnpicklingError, ValueError...
        raise bad_cifar_file(path, f"unreadable pickle: {type(err).__name__}: {err}") from None
    if not isinstance(content, dict):
        raise bad_cifar_file(path, f"holds a {type(content).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def bad_cifar_file(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a valid CIFAR file ({why}); replace it, or delete {path.parent} to "
                     "download the dataset again")


def read_cifar_batch(path: Path, layout: CifarLayout) -> ImageArrays:
    """One batch file: rows of 3072 bytes (the R, G then B plane, each 32x32 row-major) and their labels."""
    content = read_pickle_dict(path)
    for key in ("data", layout.label_key):
        if key not in content:
            raise bad_cifar_file(path, f"no '{key}' entry")
    data = np.asarray(content["data"])
    labels = np.asarray(content[layout.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise bad_cifar_file(path, f"'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise bad_cifar_file(path, f"{labels.shape} labels for {len(data)} images")
    if len(labels) and not 0 <= labels.min() <= labels.max() < layout.num_classes:
        raise bad_cifar_file(path, f"labels outside 0..{layout.num_classes - 1}")
    return ImageArrays(torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels.astype(np.int64)))


def read_cifar_split(folder: Path, files: list[str], layout: CifarLayout) -> ImageArrays:
    batches = [read_cifar_batch(folder / f, layout) for f in files]
    return ImageArrays(torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]))


def read_cifar_class_names(folder: Path, layout: CifarLayout) -> list[str]:
    """Names from the meta file when it is there (a user's own copy may lack it), else the class numbers."""
    path = folder / layout.files.meta["filename"]
    if not path.is_file():
        return [str(i) for i in range(layout.num_classes)]
    names = read_pickle_dict(path).get(layout.files.meta["key"])
    if names is None or len(names) != layout.num_classes:
        raise bad_cifar_file(path, f"no list of {layout.num_classes} '{layout.files.meta['key']}'")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


# --------------------------------------------------------------------------------------------------------------
# Synthetic: learnable, deterministic, no files.

def make_synthetic(data_cfg) -> tuple[ImageArrays, ImageArrays, list[str]]:
    """Each class is a fixed 4x4 grid of random colours blown up to 32x32; each image adds Gaussian pixel noise.

    A nearest-class-mean rule fitted on the training split scores over 90% on the test split
    (tests/test_data.py), so any model that learns at all leaves chance behind quickly. Fixed seeds make every
    machine build the same images.
    """
    num_classes = data_cfg.synthetic_num_classes
    colours = torch.randint(0, 256, (num_classes, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    prototypes = colours.float().repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)

    def split(size: int, seed: int) -> ImageArrays:
        labels = torch.arange(size) % num_classes
        noise = torch.randn((size, 3, 32, 32), generator=torch.Generator().manual_seed(seed)) * 40
        return ImageArrays((prototypes[labels] + noise).round().clamp(0, 255).to(torch.uint8), labels)

    return (split(data_cfg.synthetic_train_size, 1), split(data_cfg.synthetic_test_size, 2),
            [f"class_{i}" for i in range(num_classes)])


# --------------------------------------------------------------------------------------------------------------
# Seeded randomness: a Generator per (seed, stream, epoch[, batch]), so no state carries over between steps.

SHUFFLE, AUGMENT, WORKERS = range(3)


def keyed_rng(*key: int) -> np.random.Generator:
    """A generator determined by the whole key (numpy's SeedSequence hashes every element)."""
    return np.random.default_rng(key)


# --------------------------------------------------------------------------------------------------------------
# Augmentation on the device. Parameters are drawn on the host for the whole global batch, so every rank draws
# the same ones and takes its slice; the ops then run batched on the device.

def random_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int,
                     padding_mode: str) -> torch.Tensor:
    """Crop image i at offsets[i] (top, left) from itself padded by `padding`, mirrored where flips[i].

    One gather does it all: the padded image is never built. Each output pixel's source row and column are
    computed, mirrored back inside the image ('reflect') or marked as padding ('zeros'), and a flip only reverses
    the order of the columns. Offsets lie in [0, 2 * padding], so a crop stays within the padded image.
    """
    n, c, h, w = images.shape
    rows = offsets[:, :1] - padding + torch.arange(h, device=images.device)  # (n, h), in [-padding, h-1+padding]
    cols = offsets[:, 1:] - padding + torch.arange(w, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    if padding_mode == "reflect":  # -1 -> 1, h -> h-2: the edge pixel is not repeated
        rows = (h - 1) - ((h - 1) - rows.abs()).abs()
        cols = (w - 1) - ((w - 1) - cols.abs()).abs()
    else:
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    pixel = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    out = images.reshape(n, c, h * w).gather(2, pixel).view(n, c, h, w)
    return out if padding_mode == "reflect" else torch.where(inside[:, None], out, 0)


# The ops of RandAugment and TrivialAugmentWide as torchvision applies them to uint8 images (nearest-neighbour
# resampling, zero fill), each taking a batch and one magnitude. `signed` ops get a random sign per sample.
# Posterize's magnitude is the number of bits dropped; Solarize's, the fraction of the range it inverts.
AUGMENT_OPS: dict[str, tuple[bool, Callable[[torch.Tensor, float], torch.Tensor]]] = {
    "Identity": (False, lambda x, m: x),
    "ShearX": (True, lambda x, m: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
                                            shear=[math.degrees(math.atan(m)), 0.0], center=[0, 0])),
    "ShearY": (True, lambda x, m: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
                                            shear=[0.0, math.degrees(math.atan(m))], center=[0, 0])),
    "TranslateX": (True, lambda x, m: TF.affine(x, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0])),
    "TranslateY": (True, lambda x, m: TF.affine(x, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0])),
    "Rotate": (True, lambda x, m: TF.rotate(x, m)),
    "Brightness": (True, lambda x, m: TF.adjust_brightness(x, 1.0 + m)),
    "Color": (True, lambda x, m: TF.adjust_saturation(x, 1.0 + m)),
    "Contrast": (True, lambda x, m: TF.adjust_contrast(x, 1.0 + m)),
    "Sharpness": (True, lambda x, m: TF.adjust_sharpness(x, 1.0 + m)),
    "Posterize": (False, lambda x, m: TF.posterize(x, 8 - round(m))),
    "Solarize": (False, lambda x, m: TF.solarize(x, 255.0 * (1.0 - m))),
    "AutoContrast": (False, lambda x, m: TF.autocontrast(x)),
    "Equalize": (False, lambda x, m: TF.equalize(x)),
}
OP_NAMES = list(AUGMENT_OPS)
OP_SIGNED = np.array([signed for signed, _ in AUGMENT_OPS.values()])
NUM_BINS = 31  # magnitudes come in 31 steps from 0 to the op's maximum, as in torchvision


@dataclass(frozen=True)
class AugmentPolicy:
    """A search space in the RandAugment family: each sample gets `num_ops` ops, each drawn uniformly."""
    num_ops: int
    magnitude_bin: Optional[int]  # a fixed bin of NUM_BINS, or None for a uniformly random bin per op
    max_magnitudes: dict          # op name -> magnitude of the top bin; translation as a fraction of the width
    per_image_transform: type     # the same policy as torchvision's per-image transform, for image folders


def magnitude_space(shear: float, translate: float, rotate: float, enhance: float, posterize: float) -> dict:
    return {"ShearX": shear, "ShearY": shear, "TranslateX": translate, "TranslateY": translate, "Rotate": rotate,
            "Brightness": enhance, "Color": enhance, "Contrast": enhance, "Sharpness": enhance,
            "Posterize": posterize, "Solarize": 1.0}


AUGMENT_POLICIES = {
    # Cubuk et al. 2019 as torchvision implements it: two ops at magnitude 9 of 31.
    "randaugment": AugmentPolicy(2, 9, magnitude_space(0.3, 150 / 331, 30.0, 0.9, 4), v2.RandAugment),
    # Mueller & Hutter 2021, the "wide" space: one op at a random magnitude (translation up to 32 px = the width).
    "trivialaugment": AugmentPolicy(1, None, magnitude_space(0.99, 1.0, 135.0, 0.99, 6), v2.TrivialAugmentWide),
}


def draw_policy_ops(policy: AugmentPolicy, rng: np.random.Generator, n: int, width: int):
    """(ops, magnitudes), each (n, num_ops): which op every sample gets in each round, and how strong."""
    shape = (n, policy.num_ops)
    ops = rng.integers(0, len(OP_NAMES), shape)
    if policy.magnitude_bin is None:
        bins = rng.integers(0, NUM_BINS, shape)
    else:
        bins = np.full(shape, policy.magnitude_bin)
    signs = np.where(OP_SIGNED[ops] & (rng.random(shape) < 0.5), -1.0, 1.0)
    top = np.array([policy.max_magnitudes.get(name, 0.0) for name in OP_NAMES])
    top[[OP_NAMES.index("TranslateX"), OP_NAMES.index("TranslateY")]] *= width
    return ops, bins / (NUM_BINS - 1) * top[ops] * signs


def apply_policy_ops(images: torch.Tensor, ops: np.ndarray, magnitudes: np.ndarray) -> torch.Tensor:
    """Give image i op ops[i, k] at magnitudes[i, k], round k after round k-1.

    torchvision's ops take one magnitude per call, so the samples that share (op, magnitude) in a round go
    through one batched call: RandAugment's fixed magnitude makes that at most 22 calls a round whatever the
    batch size; TrivialAugment's random magnitudes make it a few hundred for a batch of 512, close to one call
    per sample. On one CPU thread of a shared 2-core machine at 32 px and batch 512 (scripts/bench_data.py), the
    fast path measured about 110k images/s without a policy, 23k with RandAugment and 13k with TrivialAugment,
    each varying up to 2x with the machine's load; on a GPU the calls are small kernel launches. Changes `images`
    in place.
    """
    identity = OP_NAMES.index("Identity")
    for k in range(ops.shape[1]):
        groups, group_of = np.unique(np.stack([ops[:, k], magnitudes[:, k]], axis=1), axis=0, return_inverse=True)
        for g, (op, magnitude) in enumerate(groups):
            if op != identity:
                rows = torch.from_numpy(np.flatnonzero(group_of == g)).to(images.device)
                images[rows] = AUGMENT_OPS[OP_NAMES[int(op)]][1](images[rows], float(magnitude))
    return images


@dataclass
class SampleAugmentation:
    """Per-sample augmentation parameters of a batch, drawn on the host."""
    offsets: np.ndarray     # (n, 2) top-left corner of the crop in the padded image
    flips: np.ndarray       # (n,) bool
    ops: np.ndarray         # (n, num_ops) indices into OP_NAMES
    magnitudes: np.ndarray  # (n, num_ops)

    def __getitem__(self, rows: slice) -> "SampleAugmentation":
        return SampleAugmentation(self.offsets[rows], self.flips[rows], self.ops[rows], self.magnitudes[rows])


class DeviceAugmentation:
    """Random crop, horizontal flip and an optional auto-augment policy, for uint8 batches on the device."""

    def __init__(self, data_cfg, image_size: int):
        if data_cfg.crop_padding >= image_size:
            raise UserError(f"data.crop_padding={data_cfg.crop_padding} is too large for {image_size}-pixel "
                            f"images; use a value below {image_size} (4 is usual)")
        self.padding = data_cfg.crop_padding
        self.padding_mode = data_cfg.padding_mode
        self.hflip = data_cfg.hflip
        self.policy = AUGMENT_POLICIES.get(data_cfg.auto_augment)
        self.image_size = image_size

    def draw(self, rng: np.random.Generator, n: int) -> SampleAugmentation:
        offsets = rng.integers(0, 2 * self.padding + 1, (n, 2))
        flips = (rng.random(n) < 0.5) & self.hflip
        if self.policy is None:
            return SampleAugmentation(offsets, flips, np.zeros((n, 0), np.int64), np.zeros((n, 0)))
        return SampleAugmentation(offsets, flips, *draw_policy_ops(self.policy, rng, n, self.image_size))

    def __call__(self, images: torch.Tensor, params: SampleAugmentation) -> torch.Tensor:
        if self.padding or self.hflip:
            to_device = lambda a: torch.from_numpy(a).to(images.device, non_blocking=True)
            images = random_crop_flip(images, to_device(params.offsets), to_device(params.flips), self.padding,
                                      self.padding_mode)
        return apply_policy_ops(images, params.ops, params.magnitudes)


class LabelMixing:
    """Mixup and cutmix with soft targets, one of them per batch (50/50 when both are on), as timm does.

    Each image is mixed with its mirror in the (per-rank) batch, image i with image n-1-i. The returned targets
    are class probabilities, so `F.cross_entropy(logits, targets)` is the label-mixing loss.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int):
        self.alphas = [(mode, alpha) for mode, alpha in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if alpha > 0]
        self.num_classes = num_classes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        mode, alpha = self.alphas[rng.integers(len(self.alphas))]
        lam = float(rng.beta(alpha, alpha))
        partner = images.flip(0)
        if mode == "mixup":
            images = images.mul(lam).add_(partner, alpha=1.0 - lam)
        else:
            (top, bottom), (left, right) = cutmix_box(rng, lam, images.shape[-2:])
            images = images.clone()
            images[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
        one_hot = F.one_hot(labels, self.num_classes).float()
        return images, one_hot.mul(lam).add_(one_hot.flip(0), alpha=1.0 - lam)


def cutmix_box(rng: np.random.Generator, lam: float, size) -> list[tuple[int, int]]:
    """[(top, bottom), (left, right)] of a box covering about 1 - lam of the image, centred uniformly, clipped."""
    side = math.sqrt(1.0 - lam)
    spans = []
    for length in size:
        half, centre = int(length * side) // 2, int(rng.integers(length))
        spans.append((max(centre - half, 0), min(centre + half, length)))
    return spans


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
            rows = torch.from_numpy(indices).to(self.labels.device, non_blocking=True)
            yield self.images[rows], self.labels[rows]


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


# --------------------------------------------------------------------------------------------------------------
# Loaders: what the trainer and evaluator iterate.

class TrainLoader:
    """The training batches of one rank: seeded per-epoch shuffle, drop_last, augmentation, optional mixing.

    Global batch b of an epoch is perm[b*G:(b+1)*G] with G = batch_size * world_size and perm seeded by
    (seed, epoch); rank r takes the r-th contiguous slice of it. For image folders the crop, flip and policy run
    in DataLoader workers, seeded per epoch: a resumed run gets the same images but not bit-identical crops.
    """

    def __init__(self, source, data_cfg, *, img_size: int, batch_size: int, seed: int, rank: int, world_size: int,
                 augmentation: Optional[DeviceAugmentation], mixing: Optional[LabelMixing]):
        self.source, self.data_cfg, self.img_size = source, data_cfg, img_size
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.global_batch = batch_size * world_size
        self.augmentation, self.mixing = augmentation, mixing

    def __len__(self) -> int:
        return len(self.source) // self.global_batch

    def batch_indices(self, epoch: int, start: int = 0) -> list[np.ndarray]:
        """This rank's sample indices for each batch of the epoch from batch `start` on."""
        perm = keyed_rng(self.seed, SHUFFLE, epoch).permutation(len(self.source))
        firsts = (b * self.global_batch + self.rank * self.batch_size for b in range(start, len(self)))
        return [perm[first:first + self.batch_size] for first in firsts]

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, targets) for each batch of the epoch from batch `start` on; see the class docstring."""
        worker_seed = int(keyed_rng(self.seed, WORKERS, epoch).integers(2 ** 62))
        fetched = self.source.fetch(self.batch_indices(epoch, start), worker_seed)
        for b, (images, labels) in enumerate(fetched, start):
            rng = keyed_rng(self.seed, AUGMENT, epoch, b)
            if self.augmentation is not None:
                mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
                images = self.augmentation(images, self.augmentation.draw(rng, self.global_batch)[mine])
            x = preprocess_images(images, self.data_cfg, self.img_size)
            yield self.mixing(x, labels, rng) if self.mixing is not None else (x, labels)


class EvalLoader:
    """Every sample of a split exactly once across ranks: rank r gets the r-th contiguous part, unaugmented."""

    def __init__(self, source, data_cfg, *, img_size: int, batch_size: int, rank: int, world_size: int):
        self.source, self.data_cfg, self.img_size, self.batch_size = source, data_cfg, img_size, batch_size
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
    """What build_loaders returns: this rank's loaders and the dataset's classes."""
    train: TrainLoader
    test: EvalLoader
    num_classes: int
    class_names: list[str]


def check_data_config(data_cfg) -> None:
    """Raise UserError for a data config that cannot work, naming the field as `--set data.X` spells it."""
    choices = {"name": DATASETS, "padding_mode": PADDING_MODES, "auto_augment": ("none", *AUGMENT_POLICIES),
               "normalize": NORMALIZATIONS}
    for field, allowed in choices.items():
        if data_cfg[field] not in allowed:
            raise UserError(f"unknown data.{field} {data_cfg[field]!r}; choose one of {', '.join(allowed)}")
    for field in ("crop_padding", "mixup_alpha", "cutmix_alpha", "num_workers"):
        if data_cfg[field] < 0:
            raise UserError(f"data.{field} must be >= 0, got {data_cfg[field]}")
    for field in ("synthetic_train_size", "synthetic_test_size", "synthetic_num_classes"):
        if data_cfg[field] < 1:
            raise UserError(f"data.{field} must be >= 1, got {data_cfg[field]}")


def load_in_memory(data_cfg) -> tuple[ImageArrays, ImageArrays, list[str]]:
    if data_cfg.name == "synthetic":
        return make_synthetic(data_cfg)
    return load_cifar(data_cfg.name, data_cfg.data_dir, data_cfg.download)


def build_loaders(data_cfg, *, img_size: int, batch_size: int, eval_batch_size: int, device: torch.device,
                  seed: int, rank: int = 0, world_size: int = 1) -> Loaders:
    """Train and test loaders for this rank; batch_size is the per-rank step batch (global / world_size)."""
    check_data_config(data_cfg)
    if min(img_size, batch_size, eval_batch_size) < 1 or seed < 0 or not 0 <= rank < world_size:
        raise UserError(f"need img_size, batch sizes >= 1, seed >= 0 and 0 <= rank < world_size; got {img_size}, "
                        f"{batch_size}, {eval_batch_size}, {seed}, {rank}, {world_size}")
    device = torch.device(device)
    if data_cfg.name == "imagefolder":
        train_source, test_source, class_names = folder_sources(data_cfg, img_size, device)
        augmentation = None  # done per image by the workers
    else:
        train, test, class_names = load_in_memory(data_cfg)
        train_source, test_source = TensorSource(train, device), TensorSource(test, device)
        augmentation = DeviceAugmentation(data_cfg, image_size=train.images.shape[-1])
    mixing = None
    if data_cfg.mixup_alpha > 0 or data_cfg.cutmix_alpha > 0:
        mixing = LabelMixing(data_cfg.mixup_alpha, data_cfg.cutmix_alpha, len(class_names))
    loaders = Loaders(
        train=TrainLoader(train_source, data_cfg, img_size=img_size, batch_size=batch_size, seed=seed, rank=rank,
                          world_size=world_size, augmentation=augmentation, mixing=mixing),
        test=EvalLoader(test_source, data_cfg, img_size=img_size, batch_size=eval_batch_size, rank=rank,
                        world_size=world_size),
        num_classes=len(class_names), class_names=class_names)
    if len(loaders.train) == 0:
        raise UserError(f"a global batch of {batch_size * world_size} (batch size {batch_size} x {world_size} "
                        f"ranks) is larger than the {len(train_source)} training images; lower the batch size")
    return loaders
