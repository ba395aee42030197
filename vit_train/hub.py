"""Google's released ViT weights by name: where each file is, and a cache that downloads it once.

    vit-train --pretrained ViT-B_16-i21k
        -> <cache>/ViT-B_16-i21k.npz, downloaded on first use from
           https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz

The cache is $VIT_TRAIN_CACHE, else $XDG_CACHE_HOME/vit-train, else ~/.cache/vit-train. A download goes to
NAME.npz.part and resumes, with an HTTP Range request, from wherever an earlier attempt stopped; the file takes
its final name only when it is complete and checked, so a half file is never taken for a good one. One process
at a time works in the cache (a lock on the folder), so the processes of a torchrun job share one download.

What a file is checked against:
- its size, against the size Google lists (`gsutil ls -lh` in vit_jax.ipynb, or the AugReg table of the
  vision_transformer README), to the precision listed: an error page or another model's file is refused;
- its SHA-256, against the checksum stated here, and where none is stated (Google publishes none) against the
  one recorded beside the file (NAME.npz.sha256) by its first download; a file put in the cache by hand has its
  checksum recorded on first use;
- before a checksum is recorded, its layout: every array's CRC, and the shapes of its patch embedding, position
  embeddings and head as the release's model, resolution and classes give them. A damaged or truncated file, or
  a stale .part resumed to the listed size, is never recorded (a resumed part that fails starts over once), so it
  cannot lock the genuine file out.
"""
import contextlib
import fcntl
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from vit_train.errors import UserError, first_line
from vit_train.models.configs import get_config, patch_stride


@dataclass(frozen=True)
class Release:
    model: str                    # the vit-train model name whose weights these are
    trained_on: str
    url: str
    classes: int                  # outputs of its head: 21843 for ImageNet-21k, 1000 for ImageNet-1k
    resolution: int               # the image side it was trained at, which sets its position embeddings
    size: Optional[str] = None    # as Google lists it, e.g. "393.69 MiB"; None where Google lists none
    sha256: Optional[str] = None  # None: none published; the first download records it


BUCKET = "https://storage.googleapis.com/vit_models/"
I21K, I1K = "ImageNet-21k", "then ImageNet-1k at {} px"
I21K_CLASSES, I1K_CLASSES = 21843, 1000
AUGREG = "ImageNet-21k (AugReg)"  # Steiner et al. 2021, "How to train your ViT?"


def original(model, file, size, fine_tuned_px=None):
    """A release of the paper: gs://vit_models/imagenet21k/, or imagenet21k+imagenet2012/ when fine-tuned."""
    folder = "imagenet21k%2Bimagenet2012" if fine_tuned_px else "imagenet21k"  # %2B: the '+' of the folder name
    trained_on = f"{I21K}, {I1K.format(fine_tuned_px)}" if fine_tuned_px else I21K
    return Release(model, trained_on, f"{BUCKET}{folder}/{file.replace('+', '%2B')}.npz",
                   I1K_CLASSES if fine_tuned_px else I21K_CLASSES, fine_tuned_px or 224, size)


# The releases whose layout our models load. Not listed: R26+ViT-B_32, R50+ViT-L_32 and the AugReg hybrids
# (stems vit-train does not build), the fine-tuned ViT-B_8 (its resolution is not published), and the SAM,
# GSAM and AugReg files beyond the README's recommended ones.
RELEASES = {
    "ViT-B_16-i21k": original("ViT-B_16", "ViT-B_16", "393.69 MiB"),
    "ViT-B_32-i21k": original("ViT-B_32", "ViT-B_32", "400.01 MiB"),
    "ViT-B_8-i21k": original("ViT-B_8", "ViT-B_8", "393.72 MiB"),
    "ViT-L_16-i21k": original("ViT-L_16", "ViT-L_16", "1.22 GiB"),
    "ViT-L_32-i21k": original("ViT-L_32", "ViT-L_32", "1.23 GiB"),
    "ViT-H_14-i21k": original("ViT-H_14", "ViT-H_14", "2.46 GiB"),
    "R50-ViT-B_16-i21k": original("R50-ViT-B_16", "R50+ViT-B_16", "439.85 MiB"),
    "ViT-B_16-i21k-i1k-384": original("ViT-B_16", "ViT-B_16", "331.4 MiB", 384),
    "ViT-B_16-i21k-i1k-224": original("ViT-B_16", "ViT-B_16-224", "330.29 MiB", 224),
    "ViT-B_32-i21k-i1k-384": original("ViT-B_32", "ViT-B_32", "336.89 MiB", 384),
    "ViT-L_16-i21k-i1k-384": original("ViT-L_16", "ViT-L_16", "1.14 GiB", 384),
    "ViT-L_16-i21k-i1k-224": original("ViT-L_16", "ViT-L_16-224", "1.13 GiB", 224),
    "ViT-L_32-i21k-i1k-384": original("ViT-L_32", "ViT-L_32", "1.14 GiB", 384),
    "R50-ViT-B_16-i21k-i1k-384": original("R50-ViT-B_16", "R50+ViT-B_16", "377.57 MiB", 384),
}


def augreg_releases(recommended) -> dict:
    """NAME-augreg-i21k and NAME-augreg-i21k-i1k-384 for each (model, pre-trained file in gs://vit_models/augreg/,
    its size, the learning rate in the name of its ImageNet-1k fine-tuning at 384 px)."""
    releases = {}
    for model, file, size, fine_tune_lr in recommended:
        releases[f"{model}-augreg-i21k"] = Release(model, AUGREG, f"{BUCKET}augreg/{file}.npz", I21K_CLASSES, 224,
                                                   size)
        releases[f"{model}-augreg-i21k-i1k-384"] = Release(
            model, f"{AUGREG}, {I1K.format(384)}",
            f"{BUCKET}augreg/{file}--imagenet2012-steps_20k-{fine_tune_lr}-res_384.npz", I1K_CLASSES, 384)
    return releases


# The AugReg checkpoints the vision_transformer README recommends ("the best pre-training metrics").
RELEASES.update(augreg_releases([
    ("ViT-Ti_16", "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0", "37 MiB", "lr_0.03"),
    ("ViT-S_16", "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", "115 MiB", "lr_0.03"),
    ("ViT-S_32", "S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0", "118 MiB", "lr_0.01"),
    ("ViT-B_16", "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", "391 MiB", "lr_0.03"),
    ("ViT-B_32", "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0", "398 MiB", "lr_0.01"),
    ("ViT-L_16", "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0", "1243 MiB", "lr_0.01"),
]))

LIST_HINT = "vit-train --list-pretrained lists the released names"
READ_TIMEOUT_S = 60  # seconds without a byte before a connection counts as broken


def cache_dir() -> Path:
    if os.environ.get("VIT_TRAIN_CACHE"):
        return Path(os.environ["VIT_TRAIN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vit-train"


def check_weights_source(source, model_name=None):
    """Refuse, before anything heavy starts, weights that are neither a file nor a released name, and a released
    name whose weights are another model's than `model_name`."""
    if Path(source).is_file():
        return
    if source not in RELEASES:
        raise UserError(f"pretrained weights {source} are neither a file nor a released name; give a .npz, .pth or "
                        f".safetensors file, or a name ({LIST_HINT})")
    if model_name is not None and RELEASES[source].model != model_name:
        raise UserError(f"{source} holds {RELEASES[source].model} weights and the model is {model_name}; "
                        f"add --model {RELEASES[source].model}")


def weights_file(source) -> Path:
    """The file to read for --pretrained SOURCE: a path as it is, a released name's file in the cache, downloaded
    first if it is not there yet."""
    check_weights_source(source)
    return Path(source) if Path(source).is_file() else fetch(source, RELEASES[source], cache_dir())


def check_release_head(source, num_classes):
    """Refuse, before any download, a released name whose head cannot give `num_classes` outputs (evaluating
    weights as they are needs one output per class of the dataset)."""
    release = RELEASES.get(source)
    if release is not None and not Path(source).is_file() and release.classes != num_classes:
        raise UserError(f"{source} has a head of {release.classes} classes and the dataset {num_classes}; evaluate "
                        "weights fine-tuned on this dataset, or fine-tune these with vit-train --pretrained")


def fetch(name, release: Release, directory: Path) -> Path:
    """directory/NAME.npz, checked; downloaded from release.url first when it is not there. A file is trusted,
    and its checksum recorded, only once it loads as the release it claims (check_layout)."""
    target = directory / f"{name}.npz"
    part, recorded_path = target.with_name(f"{target.name}.part"), target.with_name(f"{target.name}.sha256")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with cache_lock(directory):
            recorded = recorded_path.read_text().strip() if recorded_path.exists() else None
            expected = release.sha256 or recorded
            if target.exists():
                problem, digest = check(target, release, expected)
                if problem:
                    target.unlink()  # the recorded checksum stays: the next download must match it
                    raise UserError(f"the cached {target} {problem}, so it was removed; run the same command again "
                                    f"to download it anew")
            else:
                problem, digest = download_checked(name, release, part, target, expected)
                if problem:
                    part.unlink()
                    hint = (f"; if Google replaced the file, delete {recorded_path} and run again"
                            if digest and not release.sha256 else "")  # a mismatch with the recorded checksum
                    raise UserError(f"the download of {release.url} {problem}; nothing was kept{hint}")
                with open(part, "rb") as written:
                    os.fsync(written.fileno())  # on disk before the name says the file is complete
                os.replace(part, target)
            if expected is None:  # the first download, or a file put in the cache by hand
                recorded_path.write_text(digest + "\n")
    except OSError as error:
        raise UserError(f"cannot use the weights cache {directory}: {error.strerror or error}; set VIT_TRAIN_CACHE "
                        f"to a writable folder") from None
    return target


def download_checked(name, release, part: Path, target: Path, expected_sha256) -> tuple:
    """Download into `part` and check it: (what is wrong or None, its SHA-256). A part left by an earlier attempt
    is resumed; when the whole then fails its checks (the earlier bytes were another file's), it starts over once
    from nothing."""
    resumed = part.exists() and part.stat().st_size > 0
    download(name, release.url, part, target)
    problem, digest = check(part, release, expected_sha256)
    if problem and resumed:
        print(f"{name}: the resumed download {problem}; starting it over", file=sys.stderr, flush=True)
        part.unlink()
        download(name, release.url, part, target)
        problem, digest = check(part, release, expected_sha256)
    return problem, digest


@contextlib.contextmanager
def cache_lock(directory: Path):
    """Hold the cache folder to ourselves: other processes wait here, then find the file downloaded."""
    folder = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process using {directory}", file=sys.stderr, flush=True)
            fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # releases the lock


def download(name, url, part: Path, target: Path):
    """Fill `part` with the file at `url`, resuming from what an earlier attempt left in it. A transfer that
    breaks is resumed as long as each attempt adds bytes; then it stops, keeping the part for the next run."""
    while True:
        had = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={had}-"} if had else {})
        try:
            response = urllib.request.urlopen(request, timeout=READ_TIMEOUT_S)
        except urllib.error.HTTPError as error:
            if error.code == 416 and had:  # the part is longer than the file: it is not a start of it
                part.unlink()
                continue
            raise UserError(f"{url} answered {error.code} {error.reason}; download it by other means to {target}, "
                            f"or give --pretrained a file") from None
        except (OSError, http.client.HTTPException) as error:  # offline, refused, timed out, no HTTP answer
            reason = getattr(error, "reason", error)
            raise UserError(f"cannot download {name} from {url} ({reason}); download it by other means to "
                            f"{target}, or give --pretrained a file") from None
        with response:
            offset, total = resumed_range(response, had, part)
            with open(part, "ab" if offset else "wb") as out, \
                    tqdm(total=total, initial=offset, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                         mininterval=0.5 if sys.stderr.isatty() else 30) as bar:  # a log gets few lines
                try:
                    while block := response.read(1 << 20):
                        out.write(block)
                        bar.update(len(block))
                except (OSError, http.client.HTTPException):
                    pass  # the connection broke: what arrived is kept, and the rest asked for below
        now = part.stat().st_size
        if total is None or now == total:
            return
        if now <= had:
            raise UserError(f"the download of {url} stopped at {now:,} of {total:,} bytes; run the same command "
                            f"again to resume it from {part}")
        print(f"{name}: the transfer stopped at {now:,} of {total:,} bytes; resuming", file=sys.stderr, flush=True)


def resumed_range(response, had, part) -> tuple:
    """(the byte the response starts at, the file's total size or None). A server that ignores the Range
    request sends the whole file (200), and the part starts over."""
    length = response.headers.get("Content-Length")
    if response.status != 206:
        return 0, int(length) if length else None
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    if not match or int(match[1]) != had:
        raise UserError(f"{response.url} answered a range request with the range "
                        f"{response.headers.get('Content-Range')!r}, not bytes {had}-; delete {part} and run again")
    return had, int(match[2]) if match[2] != "*" else None


UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def check(path: Path, release: Release, expected_sha256) -> tuple:
    """(what is wrong with the file or None, its SHA-256): its size as listed, its checksum as published or
    recorded, and where there is no checksum yet, its layout as the release's (check_layout)."""
    size = path.stat().st_size
    if release.size and not size_matches(size, release.size):
        return f"is {size:,} bytes, not the {release.size} Google lists", None
    if expected_sha256 is None and (problem := check_layout(path, release)):
        return problem, None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    digest = digest.hexdigest()
    if expected_sha256 and digest != expected_sha256:
        source = "published" if expected_sha256 == release.sha256 else "recorded at its first download"
        return f"has SHA-256 {digest}, not the {expected_sha256} {source}", digest
    return None, digest


def check_layout(path: Path, release: Release) -> Optional[str]:
    """What shows that the file is not the release's weights, or None: it must be a .npz of arrays whose patch
    embedding, position embeddings and head have the shapes the release's model, resolution and classes give.
    Every array's CRC is checked, and three small arrays read; from then on its checksum stands for it all."""
    config = get_config(release.model)
    width, patch = config.hidden_size, config.patches.size[0]
    tokens = 1 + (release.resolution // patch_stride(config)) ** 2
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # every array's CRC: bytes of another file resumed into this one show here
        if damaged:
            return f"is damaged ({damaged} fails its CRC)"
        with np.load(path, allow_pickle=False) as npz:
            shapes = {key: npz[key].shape for key in ("embedding/kernel", "Transformer/posembed_input/pos_embedding",
                                                      "head/bias")}
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as error:
        return f"is not {release.model}'s weights (not a .npz of its arrays: {first_line(error)[:80]})"
    expected = {"Transformer/posembed_input/pos_embedding": (1, tokens, width), "head/bias": (release.classes,)}
    kernel = shapes["embedding/kernel"]
    if len(kernel) != 4 or kernel[-1] != width or (config.resnet is None and kernel[:2] != (patch, patch)):
        return f"is not {release.model}'s weights (a patch embedding of shape {kernel})"
    for key, shape in expected.items():
        if shapes[key] != shape:
            return f"is not {release.model}'s weights ({key} has shape {shapes[key]}, not {shape})"
    return None


def size_matches(size, listed) -> bool:
    """Whether `size` bytes is what a listing such as "393.69 MiB" says, to one unit of its last digit."""
    number, unit = listed.split()
    return abs(size / UNITS[unit] - float(number)) <= 10.0 ** -len(number.partition(".")[2])


def format_releases() -> str:
    """The --list-pretrained table: name, model, training data, size, whether cached, URL."""
    directory = cache_dir()
    rows = [("name", "model", "trained on", "size", "cached", "url")]
    for name, release in RELEASES.items():
        cached = "yes" if (directory / f"{name}.npz").exists() else "no"
        rows.append((name, release.model, release.trained_on, release.size or "-", cached, release.url))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(lines + [f"cache: {directory} (set VIT_TRAIN_CACHE to move it); sizes as Google lists them; "
                              f"Google publishes no checksums: each file's SHA-256 is recorded by its first download "
                              f"and checked at every use"])
