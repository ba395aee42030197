"""Images/s of the device-resident CIFAR-10 path against torchvision's CIFAR10 + PIL transforms + DataLoader.

    python scripts/bench_data.py [--data-dir DIR] [--device cpu] [--threads 1] [--batch-size 512] [--batches 20]
                                 [--repeats 3]

Both pipelines do the same work per image at 32 px: random crop after 4-pixel reflect padding, horizontal flip,
normalisation with the dataset's mean and std. Each repeat times --batches batches of each pipeline in turn, so all
see the same machine load, after a warm-up batch (worker start-up is not throughput); the table gives the median
over repeats and the ratio. Further rows time the fast path with RandAugment, TrivialAugment and a resize to
224 px, the numbers quoted in vit_train/data/augment.py. Without --data-dir the script first writes the full CIFAR-10
(JPEG copy) from ../shared/data into a temporary folder (about 10 s).

--threads sets torch's intra-op threads in the benchmark's own process, where the fast path runs (DataLoader
workers always use one). The default, 1, is the conservative comparison (one core against two worker processes)
and the steady one on a small shared machine, where a busy second core makes every 2-thread op wait on a
descheduled thread.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

from vit_train.data import build_loaders, default_data_config, normalization

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


def fast_path_epochs(data_dir: str, batch_size: int, device: torch.device, img_size: int = 32, **fields):
    """A function that starts an epoch of the device-resident path, the data already on the device."""
    cfg = default_data_config()
    cfg.update(data_dir=data_dir, download=False, **fields)
    train = build_loaders(cfg, img_size=img_size, batch_size=batch_size, eval_batch_size=batch_size,
                          device=device, seed=0).train
    return lambda: train.batches(epoch=0)


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
            "fast path + RandAugment (2 ops, magnitude 9)": fast_path_epochs(
                data_dir, args.batch_size, device, auto_augment="randaugment"),
            "fast path + TrivialAugmentWide": fast_path_epochs(
                data_dir, args.batch_size, device, auto_augment="trivialaugment"),
            "fast path + resize to 224 px": fast_path_epochs(data_dir, args.batch_size, device, img_size=224),
        }
        rates = {name: [] for name in pipelines}
        for _ in range(args.repeats):
            for name, start_epoch in pipelines.items():
                rates[name].append(images_per_second(start_epoch, args.batches, args.batch_size, device))

    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{args.batches} batches x {args.repeats} repeats, median images/s:")
    for name, measured in rates.items():
        repeats = ", ".join(f"{r:,.0f}" for r in measured)
        print(f"  {statistics.median(measured):>10,.0f}  {name}   (repeats: {repeats})")
    print(f"fast path / DataLoader = {statistics.median(rates[FAST_PATH]) / statistics.median(rates[BASELINE]):.1f}x")


if __name__ == "__main__":
    main()
