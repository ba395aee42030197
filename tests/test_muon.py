"""Muon (vit_train.optim): the orthogonalisation against an fp64 reference and the band its iteration promises,
the step against torch.optim.Muon where both run bf16, q, k and v as three matrices, the precision chosen by what
the device runs in hardware, fp16 loss scaling handled on the device, and no hidden reduced precision in a run."""
import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vit_train.train
from vit_train.checkpoint import load_checkpoint
from vit_train.cli import train_main
from vit_train.config import base_config
from vit_train.models.configs import apply_overrides, get_config
from vit_train.models.vit import VisionTransformer
from vit_train.optim import NS_COEFFICIENTS, Muon, MuonAdamW, build_optimizer, muon_dtype, orthogonalize
from vit_train.resolve import resolve_config
from vit_train.runtime import describe_device, fast_bf16, resolve_precision
from vit_train.train import train

CPU = torch.device("cpu")
FIXTURES = Path(__file__).parent / "fixtures"


def matrices_with_singular_values(batch, m, n, singular_values, generator):
    """(batch, m, n) matrices U diag(s) V^T with random orthogonal U, V (fp64)."""
    u = torch.linalg.qr(torch.randn(batch, m, m, dtype=torch.float64, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(batch, n, m, dtype=torch.float64, generator=generator))[0]
    return u @ torch.diag_embed(singular_values) @ v.mT


def iterated_polynomial(x, steps):
    """What the iteration does to one singular value of the normalised matrix, in exact arithmetic."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_orthogonalize_is_the_fp64_iteration_and_lands_in_its_band(dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    # condition numbers up to 100: normalised by the Frobenius norm, singular values from about 1e-2 to 1
    s = torch.logspace(0, -2, 32, dtype=torch.float64).expand(3, 32) * torch.tensor([[1.0], [3.0], [0.1]]).double()
    g = matrices_with_singular_values(3, 32, 64, s, generator)
    ours = orthogonalize(g, 5, dtype).double()
    reference = orthogonalize(g, 5, torch.float64)
    assert ours.dtype == torch.float64
    assert torch.linalg.norm(ours - reference) / torch.linalg.norm(reference) < tolerance
    # singular vectors kept; each singular value s / ||G||_F moved by the scalar polynomial
    expected = iterated_polynomial(s / s.norm(dim=1, keepdim=True), 5)
    assert torch.allclose(torch.linalg.svdvals(reference), expected.sort(dim=1, descending=True).values, atol=1e-9)
    assert torch.allclose(torch.linalg.svdvals(ours), torch.linalg.svdvals(reference), atol=3 * tolerance)
    # the band five iterations promise for normalised singular values >= 1e-2: 0.68..1.21 (not exactly 1)
    values = torch.linalg.svdvals(ours)
    assert values.min() > 0.68 - 3 * tolerance and values.max() < 1.21 + 3 * tolerance
    # a tall matrix is its transpose's transpose; the batch is the matrices one by one
    alone = torch.stack([orthogonalize(x[None], 5, torch.float64)[0] for x in g])
    assert torch.allclose(alone, reference, atol=1e-12)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon came with torch 2.9")
def test_the_step_is_torch_muons_where_both_run_bf16():
    generator = torch.Generator().manual_seed(1)
    shapes = [(48, 32), (32, 48), (40, 40), (40, 40)]  # tall, wide, and two of one shape (batched together)
    start = [torch.randn(shape, generator=generator) * 0.1 for shape in shapes]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    theirs = [torch.nn.Parameter(p.clone()) for p in start]
    mine = Muon(ours, lr=0.02, weight_decay=0.1, dtype=torch.bfloat16)
    reference = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grads = [torch.randn(shape, generator=generator) for shape in shapes]
        for params, optimizer in ((ours, mine), (theirs, reference)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b, p0 in zip(ours, theirs, start):
        moved = b.detach() - p0
        assert torch.linalg.norm(a.detach() - b.detach()) / torch.linalg.norm(moved) < 2e-2
    # their checkpoints load into ours: the same state and group keys
    mine.load_state_dict(reference.state_dict())
    assert torch.equal(mine.state[ours[0]]["momentum_buffer"], reference.state[theirs[0]]["momentum_buffer"])


def tiny_vit(width=32, layers=2):
    model = apply_overrides(get_config("testing"), hidden_size=width, num_layers=layers, mlp_dim=2 * width,
                            num_heads=2, dropout_rate=0.0, attention_dropout_rate=0.0)
    return VisionTransformer(model, 16, 10)


def optim_config(**changes):
    optim = base_config().optim
    optim.update({"name": "muon", "lr": 1e-3, "weight_decay": 0.05, **changes})
    return optim


def test_query_key_and_value_are_three_matrices_to_muon():
    torch.manual_seed(0)
    model = tiny_vit()
    optimizer = build_optimizer(model, optim_config(muon_precision="fp32"), CPU)
    qkv = model.blocks[0].attn.qkv.weight
    before = qkv.detach().clone()
    qkv.grad = torch.randn_like(qkv)
    for p in model.parameters():
        if p.grad is None and p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    change = (qkv.detach() - before * (1 - 1e-3 * 0.05)).view(3, 32, 32)
    lr_32 = 1e-3 * 0.2 * 32**0.5  # each block scaled as a 32x32 matrix, not as the 96x32 whole
    for block, grad in zip(change, qkv.grad.view(3, 32, 32)):
        expected = -lr_32 * orthogonalize((grad * (1 - 0.95**2))[None], 5, torch.float32)[0]  # first Nesterov step
        assert torch.allclose(block, expected, atol=1e-7)


def test_muon_orthogonalises_in_bf16_only_where_the_device_runs_it_in_hardware():
    assert muon_dtype("auto", CPU) == (torch.bfloat16 if fast_bf16(CPU) else torch.float32)
    assert (muon_dtype("fp32", CPU), muon_dtype("bf16", CPU)) == (torch.float32, torch.bfloat16)
    # oneDNN held to AVX2 (what an AVX2-only processor runs): bf16 is emulated there, so fp32
    probe = ("import torch; from vit_train.optim import muon_dtype; from vit_train.runtime import describe_device;"
             "print(muon_dtype('auto', torch.device('cpu')), describe_device(torch.device('cpu')))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    said = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert said.startswith("torch.float32 cpu AVX2, ") and "bf16" not in said


def test_fp16_loss_scaling_is_unscaled_and_an_overflow_skips_the_step_on_the_device():
    torch.manual_seed(0)
    plain, scaled = tiny_vit(), tiny_vit()
    scaled.load_state_dict(plain.state_dict())
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    optimizers = [build_optimizer(m, optim_config(muon_precision="fp32"), CPU) for m in (plain, scaled)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    torch.nn.functional.cross_entropy(plain(images), labels).backward()
    optimizers[0].step()
    scaler.scale(torch.nn.functional.cross_entropy(scaled(images), labels)).backward()
    scaler.step(optimizers[1])
    scaler.update()
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # Muon unscaled for itself (GradScaler left its gradients scaled): no overflow flag read on the host
    fc1 = scaled.blocks[0].mlp.fc1.weight.grad, plain.blocks[0].mlp.fc1.weight.grad
    assert torch.allclose(fc1[0], 2.0**10 * fc1[1], rtol=1e-4)
    # an overflow: nothing moves, neither weights nor momentum nor AdamW's moments; the scale halves
    before = {k: v.clone() for k, v in scaled.state_dict().items()}
    state = json.dumps({k: str(v) for k, v in optimizers[1].state_dict()["muon"]["state"].items()})
    optimizers[1].zero_grad()
    loss = torch.nn.functional.cross_entropy(scaled(images), labels)
    scaler.scale(loss).backward()
    scaled.blocks[0].mlp.fc1.weight.grad[0, 0] = float("inf")
    scaler.step(optimizers[1])
    scaler.update()
    assert all(torch.equal(before[k], v) for k, v in scaled.state_dict().items())
    assert json.dumps({k: str(v) for k, v in optimizers[1].state_dict()["muon"]["state"].items()}) == state
    assert scaler.get_scale() == 2.0**9


# A few real steps of the CPU recipe under a dispatch mode that records the dtype of every matrix product.
COUNT_PRODUCTS = """
import collections, json, sys, tempfile
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from vit_train.resolve import resolve_config
from vit_train.train import train

PRODUCTS = ("mm", "bmm", "addmm", "baddbmm", "linear", "matmul", "convolution")

class Products(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[1]
        if name in PRODUCTS or "scaled_dot_product" in name or name.startswith("mkldnn"):
            self.dtypes[f"{name} {args[0].dtype}"] += 1
        return func(*args, **(kwargs or {}))

config = resolve_config({"data.name": "synthetic", "data.synthetic_train_size": 256, "data.synthetic_test_size": 64,
                         "schedule.steps": 3, "output_dir": tempfile.mkdtemp(), "quiet": True,
                         "device": "cpu", "precision": sys.argv[1]}, recipe="cifar10_cpu")
with Products() as products:
    train(config)
print(json.dumps(products.dtypes))
"""


def count_products(isa, precision):
    env = {**os.environ, **({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"} if isa == "AVX2" else {})}
    done = subprocess.run([sys.executable, "-c", COUNT_PRODUCTS, precision], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("isa", ["this CPU", "AVX2"])
def test_an_fp32_run_of_the_cpu_recipe_multiplies_in_fp32_except_muon_where_bf16_is_native(isa):
    counts = count_products(isa, "fp32")
    dtypes = {key.split()[1] for key in counts}
    by_op = {key.split()[0] for key in counts}
    assert {"addmm", "bmm"} <= by_op and any("scaled_dot_product" in op for op in by_op)  # the products were seen
    native = isa == "this CPU" and fast_bf16(CPU)
    assert dtypes == ({"torch.float32", "torch.bfloat16"} if native else {"torch.float32"}), counts
    if native:  # bf16 in Muon's orthogonalisation only: 3 batched products per iteration, per shape, per step
        bf16 = sum(n for key, n in counts.items() if key.endswith("bfloat16"))
        assert bf16 == 3 * 5 * 2 * 3, counts


@pytest.mark.parametrize("isa", ["this CPU", "AVX2"])
def test_the_cpu_recipe_in_auto_precision_multiplies_in_bf16_exactly_where_the_cpu_has_bf16_instructions(isa):
    counts = count_products(isa, "auto")
    native = isa == "this CPU" and fast_bf16(CPU)
    linear = {key.split()[1]: n for key, n in counts.items() if key.split()[0] == "addmm"}  # the layers' forward
    if native:  # the steps and evaluations in bf16; fp32 only in one forward, the attention picture TensorBoard shows
        assert linear["torch.bfloat16"] > 3 * linear.get("torch.float32", 0), counts
    else:
        assert set(linear) == {"torch.float32"}, counts
    # In bf16 the attention is written out as products (torch's fused CPU kernel is slower there than in fp32).
    assert any("scaled_dot_product" in key for key in counts) == (not native), counts


def resumable_fixture(tmp_path):
    """tests/fixtures/round3_muon_step3.pt: step 3 of a 6-step Muon run (testing model, synthetic data), written by
    the MuonAdamW built on torch.optim.Muon (a fused 96x32 qkv, bf16 always), in a run folder of its own."""
    run_dir = tmp_path / "m"
    run_dir.mkdir()
    shutil.copy(FIXTURES / "round3_muon_step3.pt", run_dir / "last.pt")
    return run_dir


def test_a_checkpoint_of_the_torch_muon_resumes_with_the_settings_its_resume_asks_for(tmp_path, monkeypatch):
    run_dir = resumable_fixture(tmp_path)
    saved = load_checkpoint(run_dir / "last.pt")["optimizer"]
    loaded = []
    real_build_run = vit_train.train.build_run

    def keep_optimizer(*args):
        run = real_build_run(*args)
        optimizer = run.state.optimizer
        loaded.append(([dict(g) for g in optimizer.param_groups], copy.deepcopy(optimizer.muon.state_dict())))
        return run

    monkeypatch.setattr(vit_train.train, "build_run", keep_optimizer)
    final = train(resolve_config({"resume": str(run_dir), "optim.weight_decay": 0.5, "optim.betas": (0.8, 0.99)}))
    assert final["step"] == 6 and math.isfinite(final["eval_loss"])
    groups, muon_state = loaded[0]
    # the momentum the old run built up, and the new settings on the optimizer itself, not only in config.json
    assert all(torch.equal(muon_state["state"][i]["momentum_buffer"], saved["muon"]["state"][i]["momentum_buffer"])
               for i in saved["muon"]["state"])
    assert [g["weight_decay"] for g in groups] == [0.5, 0.5, 0.0]  # Muon's matrices, AdamW's decayed, the rest
    assert [g["betas"] for g in groups[1:]] == [(0.8, 0.99)] * 2
    assert json.loads((run_dir / "config.json").read_text())["optim"]["weight_decay"] == 0.5


def test_a_resume_that_changes_the_optimizer_is_refused_before_anything_is_written(tmp_path, capsys):
    run_dir = resumable_fixture(tmp_path)
    before = sorted(p.name for p in run_dir.iterdir())
    for name in ("adamw", "sgd"):
        assert train_main(["--resume", str(run_dir), "--set", f"optim.name={name}"]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"optim.name cannot change when resuming ('muon' in" in error
    assert sorted(p.name for p in run_dir.iterdir()) == before  # no config.json written to say sgd


def test_every_figure_names_its_device_and_bf16_muon_where_it_is_emulated_is_warned_about(tmp_path, capsys):
    settings = {"model_name": "testing", "data.name": "synthetic", "data.synthetic_train_size": 64,
                "data.synthetic_test_size": 32, "batch_size": 16, "optim.name": "muon", "optim.lr": 1e-3,
                "schedule.steps": 2, "output_dir": str(tmp_path), "quiet": True, "device": "cpu"}
    train(resolve_config({**settings, "name": "auto"}))
    said = capsys.readouterr().out
    device = describe_device(CPU)
    assert f"; {device}, {resolve_precision('auto', CPU)}; run dir" in said and "warning" not in said
    record = json.loads((tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["device"] == device and device.startswith(f"cpu {torch.backends.cpu.get_cpu_capability()}")
    # bf16 asked for where it is emulated (oneDNN held to AVX2, as on an AVX2-only processor): said, and run
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-m", "vit_train", "--model", "testing", "--dataset", "synthetic",
                           "--steps", "1", "--batch-size", "16", "--quiet", "--device", "cpu", "--output-dir",
                           str(tmp_path), "--name", "bf16", "--set", "optim.name=muon", "--set",
                           "optim.muon_precision=bf16", "--set", "data.synthetic_train_size=32", "--set",
                           "data.synthetic_test_size=16"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "cpu AVX2, " in done.stdout and "warning: optim.muon_precision=bf16 on cpu AVX2" in done.stdout
