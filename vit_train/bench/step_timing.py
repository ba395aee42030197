"""The work of `python -m vit_train.bench.model_step` (vit_train/bench/model_step.py parses its flags and picks
the cases): each case's training step, ours and timm's and HF's, timed round-robin, with the machine's GEMM rate
and, on a GPU, the MFU.

One step is forward + backward + AdamW update (fused, as the training loop runs it). The implementations are timed
in turn, round-robin, so that a noisy machine slows all of them alike; the medians are reported with their ratio.
The model's FLOPs per step are counted by `torch.utils.flop_counter`, so "fraction of the GEMM roofline" is
achieved FLOP/s ÷ the dense GEMM rate measured in the same run. On CUDA the same FLOP/s over the GPU's dense bf16
peak is the MFU: the peak from NVIDIA's datasheet for the GPUs in DENSE_BF16_PEAKS, the measured bf16 GEMM rate
for any other. timm and transformers come with the `test` extra; where one is missing, its implementation is
skipped.

Also the work of `python -m vit_train.bench.muon_step` (time_muon_step): the optimizer steps against forward +
backward, timed round-robin the same way.
"""
import json
import statistics
import time
from pathlib import Path

import ml_collections
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vit_train.bench.peers import hf_logits, hf_vit, timm_vit
from vit_train.models.vit import VisionTransformer
from vit_train.optim import MuonAdamW, muon_dtype, orthogonalize, param_groups
from vit_train.runtime import describe_device, resolve_precision


# Dense bf16 tensor-core peaks in FLOP/s, by words of torch.cuda.get_device_name(): the first entry whose words all
# occur in the upper-cased name counts, so the PCIe and NVL boards come before the plain names (an H100 SXM is
# "NVIDIA H100 80GB HBM3"). NVIDIA's datasheets give bf16 with 2:4 sparsity and dense as half of it (rounded down):
#   H100 SXM 1,979, PCIe 1,513, NVL 1,671 TFLOPS    https://www.nvidia.com/en-us/data-center/h100/
#   H200 SXM 1,979, NVL 1,671 TFLOPS                https://www.nvidia.com/en-us/data-center/h200/
#   A100 SXM and PCIe: 312 TFLOPS dense             https://www.nvidia.com/en-us/data-center/a100/
DENSE_BF16_PEAKS = [
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),
    (("A100",), 312e12),
]


def dense_bf16_peak(device: torch.device) -> tuple[float, str]:
    """The GPU's dense bf16 peak in FLOP/s, and what it is: the datasheet's, else the bf16 GEMM rate measured here."""
    name = torch.cuda.get_device_name(device)
    for words, peak in DENSE_BF16_PEAKS:
        if all(word in name.upper() for word in words):
            return peak, f"{peak / 1e12:.0f} TFLOP/s, the {name}'s dense bf16 peak (NVIDIA datasheet)"
    peak = gemm_flops_per_second(device, torch.bfloat16)
    return peak, f"{peak / 1e12:.0f} TFLOP/s, the bf16 GEMM rate measured on the {name} (no datasheet figure here)"


def gemm_flops_per_second(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """The dense matmul rate this machine reaches: the roofline a transformer step can at best approach.
    The best of the repeats, since other load can only make a matmul slower, never faster. A GPU needs a large
    product (8192³, about a millisecond on an H100) for the launch and the timer to vanish against it."""
    size = 8192 if device.type == "cuda" else 2048
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


def call_model(model, images):
    return model(images)


def peer_models(config: ml_collections.ConfigDict, img_size: int) -> dict:
    """{implementation: (model, forward)} for timm's and HF's ViT of `config`, leaving out any not installed."""
    peers = {}
    for impl, build, forward in (("timm", timm_vit, call_model), ("hf", hf_vit, hf_logits)):
        try:
            peers[impl] = build(config, img_size, 10), forward
        except ModuleNotFoundError as missing:
            print(f"  {impl}: skipped, {missing.name} is not installed (pip install -e \".[test]\")")
    return peers


def run_case(case, batch_size: int, args, device: torch.device, peak) -> dict:
    """Time one case, print its figures, and return them as a row for `markdown_table`.
    peak: (FLOP/s, what it is) of the GPU, or None on the CPU, where the GEMM rate of the run serves."""
    config = case.model_config()
    torch.manual_seed(0)
    ours = VisionTransformer(config, case.img_size, 10)
    print(f"\n{case.label}: {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M params, batch {batch_size}, "
          f"{args.precision}, {ours.pos_embed.shape[1]} tokens")
    models = {"ours": (ours, call_model), **peer_models(config, case.img_size)}
    images = torch.randn(batch_size, 3, case.img_size, case.img_size, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    steps = {impl: make_step(model.to(device).train(), forward, images, labels, args.precision)
             for impl, (model, forward) in models.items()}
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
    achieved = {impl: flops * r / batch_size for impl, r in rate.items()}
    peak_rate, peak_text = peak or (gemm_rate, f"{gemm_rate / 1e9:.1f} GFLOP/s, the GEMM rate measured in the run")
    for impl in steps:
        spread = [batch_size / s for s in seconds[impl]]
        mfu = f"   MFU {achieved[impl] / peak_rate:.1%}" if peak else ""
        print(f"  {impl:5s} {rate[impl]:9.1f} img/s   (min {min(spread):.1f}, max {max(spread):.1f}){mfu}")
    peers = [impl for impl in rate if impl != "ours"]
    best_peer = max(peers, key=rate.get) if peers else None
    if best_peer:
        print(f"  ours / best peer ({best_peer}): {rate['ours'] / rate[best_peer]:.3f}x")
    print(f"  {flops / batch_size / 1e9:.3f} GFLOP per image per step; ours achieves {achieved['ours'] / 1e9:.1f} "
          f"GFLOP/s = {achieved['ours'] / gemm_rate:.1%} of the {gemm_rate / 1e9:.1f} GFLOP/s GEMM roofline")
    if peak:
        print(f"  MFU: achieved FLOP/s over {peak_text}")
    return {"case": case.label, "batch": batch_size, "precision": args.precision, "rate": rate,
            "ratio": f"{rate['ours'] / rate[best_peer]:.2f}x ({best_peer})" if best_peer else "-",
            "mfu": {impl: achieved[impl] / peak_rate for impl in rate}, "peak": peak_text}


def loop_mfu(run_dir, device: torch.device, peak) -> str:
    """One Markdown line for a finished vit-train run: the images/s of its last logged window (the real loop: data
    gathered and augmented on the device, logging, EMA) and its MFU, with the FLOPs per training image counted on
    one step of its own model in training mode (patch dropout and all), in its precision."""
    run_dir = Path(run_dir)
    config = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    model = VisionTransformer(config.model, config.img_size, config.num_classes).to(device).train()
    images = torch.randn(8, 3, config.img_size, config.img_size, device=device)
    labels = torch.randint(0, config.num_classes, (8,), device=device)
    precision = "fp32" if resolve_precision(config.precision, device) == "fp32" else "bf16"
    flops_per_image = step_flops(make_step(model, call_model, images, labels, precision)) / 8
    achieved = last["images_per_sec"] * flops_per_image
    return (f"- the real training loop (step {last['step']}): {last['images_per_sec']:,.0f} img/s, "
            f"{flops_per_image / 1e9:.3f} GFLOP per image, {achieved / 1e12:.2f} TFLOP/s = MFU {achieved / peak[0]:.1%}"
            f" of {peak[1]}")


def markdown_table(rows: list) -> str:
    """The figures of the cases run, one row each; a peer that was not installed shows as '-'."""
    def cell(row, key, impl, spec):
        return format(row[key][impl], spec) if impl in row[key] else "-"

    lines = ["| case | batch | precision | ours img/s | timm img/s | HF img/s | ours / best peer "
             "| MFU ours / timm / HF | MFU against |", "|" + " --- |" * 9]
    for row in rows:
        rates = [cell(row, "rate", impl, ",.0f") for impl in ("ours", "timm", "hf")]
        mfus = " / ".join(cell(row, "mfu", impl, ".1%") for impl in ("ours", "timm", "hf"))
        lines.append(f"| {row['case']} | {row['batch']} | {row['precision']} | {' | '.join(rates)} | {row['ratio']} "
                     f"| {mfus} | {row['peak']} |")
    return "\n".join(lines)


def run(cases: list, args, device: torch.device):
    """Time each case (a model_step.Case) on `device` with the settings in `args` (model_step's flags), printing
    its figures as it goes; or, with args.run, the loop MFU of a finished run."""
    args.precision = args.precision or ("fp32" if resolve_precision("auto", device) == "fp32" else "bf16")
    args.gemm_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = dense_bf16_peak(device)
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    print(f"device {describe_device(device)}, torch {torch.__version__}{cuda}")
    if args.run:
        print(loop_mfu(args.run, device, peak or (gemm_flops_per_second(device, args.gemm_dtype),
                                                  "the GEMM rate measured here")))
        return
    rows = [run_case(case, args.batch_size or case.batch_size[device.type], args, device, peak) for case in cases]
    if args.markdown:
        print("\n" + markdown_table(rows))


def time_muon_step(config: ml_collections.ConfigDict, batch_size: int, repeats: int, device: torch.device):
    """python -m vit_train.bench.muon_step: each optimizer variant steps from the same real gradients (one forward
    + backward of a random batch), round-robin with the forward + backward itself; prints the medians."""
    torch.manual_seed(0)
    model = VisionTransformer(config.model, config.img_size, 10).to(device).train()
    images = torch.randn(batch_size, 3, config.img_size, config.img_size, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()

    forward_backward()
    grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}  # not the fixed embeddings
    optim, groups = config.optim, param_groups(model, config.optim.weight_decay)
    auto = muon_dtype("auto", device)
    ours = {dtype: MuonAdamW(model, groups, optim, dtype) for dtype in (torch.bfloat16, torch.float32)}
    matrices = ours[torch.float32].muon.param_groups[0]["params"]
    others = [p for p in grads if all(p is not m for m in matrices)]
    torch_muon = torch.optim.Muon(matrices, lr=optim.lr, weight_decay=optim.weight_decay,
                                  momentum=optim.muon_momentum, ns_steps=optim.muon_ns_steps,
                                  adjust_lr_fn="match_rms_adamw")
    adamw_rest = torch.optim.AdamW(others, lr=optim.lr, fused=True)
    adamw_all = torch.optim.AdamW(list(grads), lr=optim.lr, fused=True)
    # The matrices as ours orthogonalises them: fused q, k, v as three, tall ones turned wide, stacked by shape.
    by_shape = ours[torch.float32].muon.by_shape(matrices, [p.detach() for p in matrices])
    stacks = [torch.stack([wide for _, wide, _ in pieces]) for pieces in by_shape.values()]

    def optimizer_step(*optimizers):
        def step():
            for p, grad in grads.items():
                p.grad = grad.clone()
            for optimizer in optimizers:
                optimizer.step()
        return step

    def newton_schulz(dtype, batched):
        def step():
            for stack in stacks:
                for matrices in ([stack] if batched else stack.split(1)):
                    orthogonalize(matrices, optim.muon_ns_steps, dtype)
        return step

    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}
    variants = {"forward + backward": forward_backward,
                **{f"ours, Muon in {name[d]}{' (auto)' if d == auto else ''} + fused AdamW": optimizer_step(o)
                   for d, o in ours.items()},
                "torch.optim.Muon (bf16) + fused AdamW": optimizer_step(torch_muon, adamw_rest),
                "fused AdamW alone, every parameter": optimizer_step(adamw_all),
                **{f"Newton-Schulz, {name[d]}, {how}": newton_schulz(d, how == "batched by shape")
                   for d in (torch.bfloat16, torch.float32) for how in ("batched by shape", "one matrix at a time")}}
    for step in variants.values():  # first calls allocate state and warm caches
        step()
    seconds = {label: [] for label in variants}
    for _ in range(repeats):
        for label, step in variants.items():
            seconds[label].append(time_steps(step, 1, device))
    median = {label: statistics.median(s) for label, s in seconds.items()}
    shapes = ", ".join(f"{len(s)} of {s.shape[1]}x{s.shape[2]}" for s in stacks)
    print(f"device {describe_device(device)}, torch {torch.__version__}; {config.model_name} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), batch {batch_size}, "
          f"Muon's matrices: {shapes}; medians of {repeats}")
    for label, value in median.items():
        print(f"  {label:<52} {value * 1e3:9.2f} ms  {value / median['forward + backward']:6.2f}x forward + backward")
