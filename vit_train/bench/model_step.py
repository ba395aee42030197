"""Training-step speed of our ViT against timm's and HF's, same network, same batch, same run.

    python -m vit_train.bench.model_step                       # the two standard cases below
    python -m vit_train.bench.model_step --model ViT-S_4 --override num_layers=6 --batch-size 128 --precision bf16

One step is forward + backward + AdamW update (fused, as the training loop runs it). The three implementations
are timed in turn, round-robin, `--repeats` times, so that a noisy machine slows all of them alike; the medians
are reported with their ratio.
The hardware limit is measured in the same run: the machine's dense GEMM rate (square matmuls). The model's
FLOPs per step are counted by `torch.utils.flop_counter`, so "fraction of the GEMM roofline" is achieved
FLOP/s ÷ GEMM FLOP/s. On CUDA the same figure against the GPU's dense peak is MFU.
"""
import argparse
import ast
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vit_train.bench.peers import hf_logits, hf_vit, timm_vit
from vit_train.models import apply_overrides, get_config
from vit_train.models.vit import VisionTransformer

# (label, model name, overrides, batch size): the design-card model and a tiny small-patch model.
STANDARD_CASES = [
    ("ViT-B_16 @32px", "ViT-B_16", {}, 64),
    ("tiny ViT 4x4 patches @32px", "ViT-Ti_4", dict(hidden_size=128, num_layers=4, mlp_dim=512, num_heads=4), 128),
]


def gemm_flops_per_second(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The dense matmul rate this machine reaches: the roofline a transformer step can at best approach.
    The best of the repeats, since other load can only make a matmul slower, never faster."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        rates.append(2 * size**3 / (time.perf_counter() - start))
    return max(rates)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, forward, images, labels, precision):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as vit-train's loop runs it
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            loss = F.cross_entropy(forward(model, images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def step_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def time_steps(step, steps: int, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - start


def run_case(label, name, overrides, batch_size, args, device):
    config = apply_overrides(get_config(name), **overrides)
    torch.manual_seed(0)
    ours = VisionTransformer(config, args.img_size, 10).to(device).train()
    timm = timm_vit(config, args.img_size, 10).to(device).train()
    hf = hf_vit(config, args.img_size, 10).to(device).train()
    images = torch.randn(batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    steps = {
        "ours": make_step(ours, lambda m, x: m(x), images, labels, args.precision),
        "timm": make_step(timm, lambda m, x: m(x), images, labels, args.precision),
        "hf": make_step(hf, hf_logits, images, labels, args.precision),
    }
    flops = step_flops(steps["ours"])
    for step in steps.values():  # warm-up: allocator, kernel selection, lazy optimizer state
        time_steps(step, args.warmup, device)
    seconds = {impl: [] for impl in steps}
    gemm_rate = 0.0
    for _ in range(args.repeats):
        for impl, step in steps.items():
            seconds[impl].append(time_steps(step, args.steps, device) / args.steps)
        gemm_rate = max(gemm_rate, gemm_flops_per_second(device, args.gemm_dtype, repeats=2))
    rate = {impl: batch_size / statistics.median(s) for impl, s in seconds.items()}
    best_peer = max(("timm", "hf"), key=rate.get)
    params = sum(p.numel() for p in ours.parameters())
    achieved = flops * rate["ours"] / batch_size
    print(f"\n{label}: {name} {overrides or ''} {params / 1e6:.2f}M params, batch {batch_size}, "
          f"{args.precision}, {ours.pos_embed.shape[1]} tokens")
    for impl in steps:
        spread = [batch_size / s for s in seconds[impl]]
        print(f"  {impl:5s} {rate[impl]:9.1f} img/s   (min {min(spread):.1f}, max {max(spread):.1f})")
    print(f"  ours / best peer ({best_peer}): {rate['ours'] / rate[best_peer]:.3f}x")
    print(f"  {flops / batch_size / 1e9:.3f} GFLOP per image per step; ours achieves {achieved / 1e9:.1f} GFLOP/s "
          f"= {achieved / gemm_rate:.1%} of the {gemm_rate / 1e9:.1f} GFLOP/s GEMM roofline")
    return rate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="one model name instead of the standard cases (e.g. ViT-S_4)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="model setting for --model, e.g. --override hidden_size=128 (repeatable)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per implementation (median)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    args.gemm_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    overrides = {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in args.override)}
    cases = [(args.model, args.model, overrides, args.batch_size)] if args.model else STANDARD_CASES
    for case in cases:
        run_case(*case, args, device)


if __name__ == "__main__":
    main()
