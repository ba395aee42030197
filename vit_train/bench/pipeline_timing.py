"""The work of `python -m vit_train.bench.pipeline_overhead` (vit_train/bench/pipeline_overhead.py parses its
flags): vit-train's images/s against its bare step, alternating in one process.

End to end is `vit_train.train.train` on a small config: data gathered and augmented each step, loss read back,
progress and TensorBoard logging (its reported images/s excludes start-up, evaluation and saving). The bare
step is the same `train_step` on one fixed batch already on the device, with nothing else around it. The two
alternate for `--rounds` rounds in one process; the medians give the overhead, 1 - end-to-end / bare.
"""
import statistics
import tempfile
import time

import torch

from vit_train.resolve import resolve_config
from vit_train.models.vit import VisionTransformer
from vit_train.runtime import describe_device, resolve_device
from vit_train.optim import build_optimizer
from vit_train.train import train, train_step

# A small ViT with 8-px patches (16 patches + CLS), the kind of model a CPU trains in minutes.
SMALL_MODEL = {"model_name": "ViT-Ti_8", "model.transformer.num_layers": 6, "model.transformer.mlp_dim": 384}
# Crop and flip only, as when the figures in docs/results.md were measured (the default recipe now adds more).
SETTINGS = {"optim.lr": 1e-3, "eval_every": 0, "save_every": 0, "quiet": True,
            "data.auto_augment": "none", "data.mixup_alpha": 0.0, "data.cutmix_alpha": 0.0, "data.random_erasing": 0.0}


def end_to_end(settings, output_dir, name) -> float:
    final = train(resolve_config({**settings, "output_dir": output_dir, "name": name}))
    return final["images_per_sec"]  # of the last logging window: start-up is not throughput


def bare_step(settings, output_dir, steps) -> float:
    config = resolve_config({**settings, "output_dir": output_dir, "name": "bare"})
    device = resolve_device(config.device)
    model = VisionTransformer(config.model, config.img_size, 10).to(device).train()
    optimizer = build_optimizer(model, config.optim, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    images = torch.randn(config.batch_size, 3, config.img_size, config.img_size, device=device)
    targets = torch.randint(0, 10, (config.batch_size,), device=device)

    def step():
        return train_step(model, optimizer, scaler, images, targets, config, "fp32")

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()  # wait for the device
    return steps * config.batch_size / (time.perf_counter() - start)


def run(args):
    """Alternate the two for args.rounds rounds (pipeline_overhead's flags), print each round and the medians."""
    window = min(50, args.steps)
    model = {"model_name": args.model} if args.model else SMALL_MODEL
    data = {"data.data_dir": args.data_dir, "data.download": False} if args.dataset == "cifar10" else {}
    settings = {**SETTINGS, **model, **data, "batch_size": args.batch_size, "data.name": args.dataset,
                "schedule.steps": args.steps, "schedule.warmup_steps": min(10, args.steps - 1), "log_every": window,
                "device": args.device}
    rates = {"end to end": [], "bare step": []}
    print(f"device {describe_device(resolve_device(args.device))}")
    with tempfile.TemporaryDirectory() as output_dir:
        for i in range(args.rounds):
            rates["end to end"].append(end_to_end(settings, output_dir, f"round{i}"))
            rates["bare step"].append(bare_step(settings, output_dir, window))
            print(f"round {i}: end to end {rates['end to end'][-1]:.1f} img/s, "
                  f"bare step {rates['bare step'][-1]:.1f} img/s", flush=True)
    e2e, bare = (statistics.median(r) for r in rates.values())
    print(f"median: end to end {e2e:.1f} img/s, bare step {bare:.1f} img/s, pipeline overhead {1 - e2e / bare:.1%}")

