"""Our CPU recipe against what a user would otherwise run, in the same time budget, on the same machine.

    python -m vit_train.bench.time_to_accuracy --time-budget 10m --data-dir data

One after the other, each in a process of its own: `vit-train --config cifar10_cpu --time-budget B`, then the usual
alternative, timm's VisionTransformer fed by torchvision's CIFAR10, its transforms and a DataLoader, with the
published recipe of the plain-ViT baseline of Lee et al. 2021 ("Vision Transformer for Small-Size Datasets",
../shared/ANCHORS.md): 4-px patches, width 192, 9 blocks, MLP 384, 12 heads, stochastic depth 0.1; AdamW lr 1e-3,
weight decay 0.05, batch 128, warm-up a tenth of the run (their 10 of 100 epochs), cosine to zero; random crop
(padding 4), flip, AutoAugment (CIFAR-10 policy), random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1.
Left out: their repeated augmentation, a sampler that torchvision does not have. The peer's length comes from its
own measured speed: its steps are timed, then as many planned as fit the budget. Both are evaluated on the full
test split at their end; the table gives test accuracy, wall time and training images/s.
"""
import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vit_train.budget import budget_seconds
from vit_train.data.normalize import DATASET_STATS
from vit_train.optim import warmup_cosine

PEER = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 9, "num_heads": 12, "mlp_ratio": 2.0,
        "num_classes": 10, "drop_path_rate": 0.1}
BATCH, LR, WEIGHT_DECAY, LABEL_SMOOTHING, WARMUP_SHARE = 128, 1e-3, 0.05, 0.1, 0.1


def run_ours(budget, data_dir, out_dir) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vit_train", "--config", "cifar10_cpu", "--time-budget", budget,
                    "--data-dir", data_dir, "--no-download", "--output-dir", out_dir, "--name", "ours", "--quiet"],
                   check=True)
    last = json.loads((Path(out_dir) / "ours" / "metrics.jsonl").read_text().splitlines()[-1])
    return {"accuracy": last["eval_accuracy"], "seconds": time.perf_counter() - started,
            "images_per_sec": last["images_per_sec"], "steps": last["step"]}


def run_peer(budget, data_dir, out_file):
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vit_train.bench.time_to_accuracy", "--peer", "--time-budget", budget,
                    "--data-dir", data_dir, "--result", out_file], check=True)
    return {**json.loads(Path(out_file).read_text()), "seconds": time.perf_counter() - started}


def peer_main(budget, data_dir, result):
    """The peer, start to end, in this process: timm + torchvision as their documentation has them used."""
    import timm
    import torchvision
    from torchvision.transforms import v2

    started = time.perf_counter()
    seconds = budget_seconds(budget)

    class CIFAR10(torchvision.datasets.CIFAR10):
        """The official layout, read without checking the official files' md5 sums, which the project's JPEG copy
        does not have (its pixels went through JPEG)."""
        def _check_integrity(self):
            return True

        def _load_meta(self):
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    mean, std = DATASET_STATS["cifar10"]
    train_tf = v2.Compose([v2.ToImage(), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                           v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(mean, std), v2.RandomErasing(0.25)])
    test_tf = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    train = CIFAR10(data_dir, train=True, transform=train_tf)
    test = CIFAR10(data_dir, train=False, transform=test_tf)
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True, num_workers=2, drop_last=True,
                                         persistent_workers=True)
    mixing = v2.RandomChoice([v2.MixUp(alpha=0.8, num_classes=10), v2.CutMix(alpha=1.0, num_classes=10)])
    model = timm.create_model("vit_tiny_patch16_224", **PEER)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def batches():
        while True:
            yield from loader

    def step(images, labels, lr):
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = mixing(images, labels)
        targets = targets * (1 - LABEL_SMOOTHING) + LABEL_SMOOTHING / 10
        loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    model.train()
    stream = batches()
    for _ in range(3):  # workers start, caches warm; these steps count as training
        step(*next(stream), LR * 1e-3)
    timed, tic = 10, time.perf_counter()
    for _ in range(timed):
        step(*next(stream), LR * 1e-3)
    step_seconds = (time.perf_counter() - tic) / timed
    eval_seconds = step_seconds * len(test) / BATCH / 3  # a forward pass is about a third of a step
    left = seconds - (time.perf_counter() - started) - eval_seconds - 15  # 15 s: the interpreter's start, the end
    steps = max(1, int(0.95 * left / step_seconds))
    warmup = max(1, round(WARMUP_SHARE * steps))
    train_started = time.perf_counter()
    for i in range(steps):
        step(*next(stream), LR * warmup_cosine(i, warmup, steps))
    images_per_sec = steps * BATCH / (time.perf_counter() - train_started)
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(test, batch_size=500, num_workers=2):
            correct += (model(images).argmax(1) == labels).sum().item()
    Path(result).write_text(json.dumps({"accuracy": correct / len(test), "seconds": time.perf_counter() - started,
                                        "images_per_sec": images_per_sec, "steps": steps + timed + 3}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-budget", default="10m")
    parser.add_argument("--data-dir", default="data", help="holds cifar-10-batches-py/ (real CIFAR-10)")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)  # the peer's own process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:
        return peer_main(args.time_budget, args.data_dir, args.result)
    with tempfile.TemporaryDirectory() as out:
        rows = {"vit-train --config cifar10_cpu": run_ours(args.time_budget, args.data_dir, out),
                "timm ViT + torchvision CIFAR10 + DataLoader (Lee et al. 2021 recipe)":
                    run_peer(args.time_budget, args.data_dir, str(Path(out) / "peer.json"))}
    print(f"\n| run ({args.time_budget}, {torch.get_num_threads()} threads) | steps | test accuracy | wall time | "
          "train images/s |\n| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['steps']} | {row['accuracy']:.2%} | {row['seconds'] / 60:.1f} min | "
              f"{row['images_per_sec']:.0f} |")


if __name__ == "__main__":
    main()
