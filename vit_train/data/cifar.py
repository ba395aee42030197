"""CIFAR-10 and CIFAR-100 in their official python layout: download (checksum-verified), extraction, reading.

A split is read into an `ImageArrays`: uint8 images (N, 3, 32, 32) and int64 labels, the form every in-memory
dataset takes (the synthetic set too) before it moves to the training device.
"""
from __future__ import annotations

import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.datasets.utils import download_url, extract_archive

from vit_train.checkpoint import folder_creation_error
from vit_train.errors import UserError, first_line

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
    data_dir = Path(data_dir).expanduser()  # as torchvision's download reads it
    folder = data_dir / layout.files.base_folder
    if not folder.is_dir():
        fetch_cifar(layout, data_dir, download)
    train = read_cifar_split(folder, [f for f, _md5 in layout.files.train_list], layout)
    test = read_cifar_split(folder, [f for f, _md5 in layout.files.test_list], layout)
    return train, test, read_cifar_class_names(folder, layout)


def fetch_cifar(layout: CifarLayout, data_dir: Path, download: bool) -> None:
    """Make data_dir/<base_folder> exist: extract an archive the user put there, else download and extract one."""
    archive = data_dir / layout.files.filename
    where = f"put {layout.files.filename} or the extracted {layout.files.base_folder}/ folder in {data_dir}"
    if not archive.is_file():
        if not download:
            raise UserError(f"no {layout.files.base_folder}/ folder in {data_dir} and downloading is off; {where}")
        if why := folder_creation_error(data_dir):  # checked first: torchvision's failure would name another path
            raise UserError(f"cannot download into {data_dir}: {why}; {where}")
        created = not data_dir.exists()
        try:
            download_url(layout.files.url, str(data_dir), filename=layout.files.filename, md5=layout.files.tgz_md5)
        except Exception as err:  # offline (URLError), cut off (IncompleteRead), a checksum mismatch (RuntimeError)
            # Leave nothing half-written: a partial archive would be mistaken for the user's own next time.
            archive.unlink(missing_ok=True)
            if created and data_dir.is_dir() and not any(data_dir.iterdir()):
                data_dir.rmdir()
            raise UserError(f"downloading {layout.files.url} failed ({type(err).__name__}: {first_line(err)}); "
                            f"{where}") from None
    extract_into_place(archive, data_dir / layout.files.base_folder, where)


def extract_into_place(archive: Path, folder: Path, where: str) -> None:
    """Extract `archive`, which holds `folder.name`/, into a temporary folder beside `folder`, and rename it into
    place once complete: an extraction cut short (a truncated archive, a full disk) leaves no half-filled folder
    that the next run would read as the dataset."""
    try:
        with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as staging:
            extract_archive(str(archive), staging)
            extracted = Path(staging) / folder.name
            if not extracted.is_dir():
                raise UserError(f"{archive} holds no {folder.name}/ folder; {where}")
            extracted.rename(folder)
    except UserError:
        raise
    except Exception as err:  # tarfile, gzip and the disk raise several unrelated types
        raise UserError(f"cannot extract {archive} ({type(err).__name__}: {first_line(err)}); {where}") from None


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


