"""The work of `python -m vit_train.bench.time_to_accuracy` (vit_train/bench/time_to_accuracy.py parses its flags
and holds the peer's settings): our run and the peer's, one after the other, each in a process of its own.

The peer is timm's VisionTransformer fed by torchvision's CIFAR10, its transforms and a DataLoader, as their
documentation has them used. Its length comes from its own measured speed: its steps are timed, then as many
planned as fit the budget. Both are evaluated on the full test split at their end.
"""
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
from vit_train.errors import UserError
from vit_train.optim import warmup_cosine
from vit_train.runtime import describe_device


def run(command: list, who: str):
    """Run `command`, a benchmark's own process; its failure (which it has explained) is one line here."""
    if code := subprocess.run(command).returncode:
        raise UserError(f"{who} stopped with exit status {code}; what it said is above")


def run_ours(budget, data_dir, out_dir, sets: list) -> dict:
    """`vit-train --config cifar10_cpu --time-budget BUDGET` with `sets` (KEY=VALUE) on top: its figures."""
    started = time.perf_counter()
    run([sys.executable, "-m", "vit_train", "--config", "cifar10_cpu", "--time-budget", budget, "--data-dir",
         data_dir, "--no-download", "--output-dir", out_dir, "--name", "ours", "--quiet",
         *(arg for item in sets for arg in ("--set", item))], "our run (vit-train)")
    seconds = time.perf_counter() - started
    last = json.loads((Path(out_dir) / "ours" / "metrics.jsonl").read_text().splitlines()[-1])
    batch = json.loads((Path(out_dir) / "ours" / "config.json").read_text())["batch_size"]
    # every image trained on over the whole command (start-up, timing and evaluation in it): the last window's
    # rate would be that of its last phase alone, which ends the recipe on every patch at a third of the speed
    return {"accuracy": last["eval_accuracy"], "seconds": seconds, "images_per_sec": last["step"] * batch / seconds,
            "steps": last["step"]}


def run_peer(budget, data_dir, out_file, peer_sets: list) -> dict:
    """The peer in a process of its own (time_to_accuracy --peer), with `peer_sets` (KEY=VALUE): its figures."""
    started = time.perf_counter()
    run([sys.executable, "-m", "vit_train.bench.time_to_accuracy", "--peer", "--time-budget", budget, "--data-dir",
         data_dir, "--result", out_file, *(arg for item in peer_sets for arg in ("--peer-set", item))],
        "the peer's run")
    return {**json.loads(Path(out_file).read_text()), "seconds": time.perf_counter() - started}


def peer_main(budget, data_dir, result, architecture: dict, recipe: dict):
    """The peer, start to end, in this process: timm.create_model(**architecture) trained with `recipe` (batch_size, lr,
    weight_decay, label_smoothing, warmup_share, workers); its figures written to `result` as JSON."""
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
    classes, smoothing = architecture["num_classes"], recipe["label_smoothing"]
    lr, batch = recipe["lr"], recipe["batch_size"]
    train_tf = v2.Compose([v2.ToImage(), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                           v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(mean, std), v2.RandomErasing(0.25)])
    test_tf = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    train = CIFAR10(data_dir, train=True, transform=train_tf)
    test = CIFAR10(data_dir, train=False, transform=test_tf)
    workers = recipe["workers"]
    loader = torch.utils.data.DataLoader(train, batch_size=recipe["batch_size"], shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    mixing = v2.RandomChoice([v2.MixUp(alpha=0.8, num_classes=classes), v2.CutMix(alpha=1.0, num_classes=classes)])
    model = timm.create_model("vit_tiny_patch16_224", **architecture)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])

    def batches():
        while True:
            yield from loader

    def step(images, labels, rate):
        for group in optimizer.param_groups:
            group["lr"] = rate
        images, targets = mixing(images, labels)
        targets = targets * (1 - smoothing) + smoothing / classes
        loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    model.train()
    stream = batches()
    for _ in range(3):  # workers start, caches warm; these steps count as training
        step(*next(stream), lr * 1e-3)
    timed, tic = 10, time.perf_counter()
    for _ in range(timed):
        step(*next(stream), lr * 1e-3)
    step_seconds = (time.perf_counter() - tic) / timed
    eval_seconds = step_seconds * len(test) / batch / 3  # a forward pass is about a third of a step
    left = seconds - (time.perf_counter() - started) - eval_seconds - 15  # 15 s: the interpreter's start, the end
    steps = max(1, int(0.95 * left / step_seconds))
    warmup = max(1, round(recipe["warmup_share"] * steps))
    train_started = time.perf_counter()
    for i in range(steps):
        step(*next(stream), lr * warmup_cosine(i, warmup, steps))
    images_per_sec = steps * batch / (time.perf_counter() - train_started)
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(test, batch_size=500, num_workers=workers):
            correct += (model(images).argmax(1) == labels).sum().item()
    Path(result).write_text(json.dumps({"accuracy": correct / len(test), "seconds": time.perf_counter() - started,
                                        "images_per_sec": images_per_sec, "steps": steps + timed + 3}))


def compare(budget, data_dir, sets: list, peer_sets: list) -> dict:
    """{run: its figures (steps, accuracy, seconds, images_per_sec)} of our run, then the peer's, in one budget."""
    with tempfile.TemporaryDirectory() as out:
        return {"vit-train --config cifar10_cpu": run_ours(budget, data_dir, out, sets),
                "timm ViT + torchvision CIFAR10 + DataLoader (Lee et al. 2021 recipe)":
                    run_peer(budget, data_dir, str(Path(out) / "peer.json"), peer_sets)}


def markdown_table(budget, rows: dict) -> str:
    """The figures docs/results.md quotes, one row a run."""
    processor = describe_device(torch.device("cpu"))  # both ran here, each on torch's default threads
    lines = [f"\n| run ({budget}) | processor | steps | test accuracy | wall time | train images/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {processor} | {row['steps']} | {row['accuracy']:.2%} | {row['seconds'] / 60:.1f} min | "
              f"{row['images_per_sec']:.0f} |" for name, row in rows.items()]
    return "\n".join(lines)
