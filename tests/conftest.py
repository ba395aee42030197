"""Fixtures shared by the test files: the ../shared folder, a real CIFAR-10 subset, and fake CIFAR pickles; and the
skipping of tests marked `cuda` where there is no GPU."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: without one they are skipped, saying why (`pytest -m cuda` selects them)."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True, scope="session")
def own_cache(tmp_path_factory):
    """The weights and decoded-folder cache in a folder of the tests' own, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VIT_TRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder that is a real tmpfs of `size` ("256k", "1m"), unmounted after the test; the test is
    skipped where mounting is not allowed."""
    mounted = []

    def mount(size):
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the repository (read-only); tests that need it skip where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    return SHARED


@pytest.fixture(scope="session")
def cifar10_subset(shared_dir, tmp_path_factory) -> Path:
    """A data_dir holding cifar-10-batches-py/ with 50 real training and 20 test images per class."""
    dest = tmp_path_factory.mktemp("cifar10_subset")
    subprocess.run([sys.executable, str(shared_dir / "data" / "make_cifar10.py"), str(dest),
                    "--per-class-train", "50", "--per-class-test", "20"], check=True, capture_output=True)
    return dest


# name -> (folder, train files, test files, meta file, label key, class-names key, number of classes)
FAKE_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                "labels", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names", 100),
}


def write_fake_cifar(data_dir: Path, name: str = "cifar10", *, bytes_keys: bool = False,
                     per_file: int = 30, seed: int = 0) -> dict:
    """Write random images in CIFAR's official python layout under data_dir; return what was written.

    The layout is spelt out here rather than taken from vit_train.data, so tests check the reader against the
    format itself.

    bytes_keys=True writes bytes keys and class names, as a pickle made by Python 3 from Python 2's files reads.
    Returns {'train': (rows, labels), 'test': (rows, labels), 'class_names': [...]}, rows being the (N, 3072)
    uint8 'data' arrays concatenated in file order.
    """
    folder, train_files, test_files, meta_file, label_key, names_key, num_classes = FAKE_LAYOUTS[name]
    key = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    out = Path(data_dir) / folder
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, files in (("train", train_files), ("test", test_files)):
        rows, labels = [], []
        for file in files:
            data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            file_labels = [int(y) for y in rng.integers(0, num_classes, per_file)]
            with open(out / file, "wb") as f:
                pickle.dump({key("batch_label"): key(file), key(label_key): file_labels, key("data"): data,
                             key("filenames"): [key(f"{file}_{i}.png") for i in range(per_file)]}, f)
            rows.append(data)
            labels.extend(file_labels)
        written[split] = (np.concatenate(rows), np.array(labels))
    written["class_names"] = [f"{name}_class_{i}" for i in range(num_classes)]
    with open(out / meta_file, "wb") as f:
        pickle.dump({key(names_key): [key(n) for n in written["class_names"]]}, f)
    return written


@pytest.fixture
def fake_cifar():
    """The write_fake_cifar function: `fake_cifar(tmp_path, "cifar100", bytes_keys=True)`."""
    return write_fake_cifar
