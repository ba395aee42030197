"""What only a GPU can show: mixed precision trains, the device-resident loaders give the CPU's batches, a compiled
model trains, an interrupted run resumes bit for bit, and two NCCL processes train as one.

Every test is marked `cuda`: tests/conftest.py skips them where torch.cuda.is_available() is False, and
scripts/gpu_check.sh runs them on a GPU with `pytest -m cuda`. The runs are test_train.py's: the tiny `testing`
model on the synthetic set for a few dozen steps.
"""
import json
import math
import os
import signal
import subprocess
import sys
from itertools import islice

import pytest
import torch

from test_train import NO_DROPOUT, assert_same_weights, cli_sets, eval_records, run, torchrun
from vit_train.checkpoint import load_checkpoint
from vit_train.config import default_data_config
from vit_train.data import build_loaders

pytestmark = pytest.mark.cuda
GPU = "cuda"


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_learned(run_dir, final):
    """Finite losses at every evaluation, falling as on the CPU (test_train.py's synthetic run)."""
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [20, 40, 60]
    assert all(math.isfinite(r[key]) for r in records for key in ("train_loss", "eval_loss")), records
    assert records[-1]["train_loss"] < records[0]["train_loss"], records
    assert records[-1]["eval_loss"] < records[0]["eval_loss"] - 0.2, records
    assert final["eval_accuracy"] > 0.5


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_a_finite_falling_loss(precision, tmp_path):
    final = run(tmp_path, precision, device=GPU, precision=precision, schedule__steps=60, eval_every=20, save_every=0)
    assert_learned(tmp_path / precision, final)
    scaler = load_checkpoint(tmp_path / precision)["scaler"]
    if precision == "fp16":  # the loss is scaled, and the scale survives in the checkpoint
        assert 0 < scaler["scale"] < math.inf
    else:  # bf16 has fp32's range: no scaling
        assert not scaler


# ---- the device-resident loaders ---------------------------------------------------------------------------------

# Crop + flip alone, then with each policy or with label mixing.
LOADER_CASES = {
    "crop+flip": {},
    "randaugment": {"auto_augment": "randaugment"},
    "trivialaugment": {"auto_augment": "trivialaugment"},
    "autoaugment": {"auto_augment": "autoaugment"},
    "mixup+cutmix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0},
}


def loader_batches(data_cfg, device):
    """Three training batches of epoch 0, one from the middle of epoch 1 and every test batch, on the CPU."""
    loaders = build_loaders(data_cfg, img_size=32, batch_size=64, eval_batch_size=128, device=torch.device(device),
                            seed=0)
    batches = [*islice(loaders.train.batches(0), 3), *islice(loaders.train.batches(1, start=5), 1),
               *loaders.test.batches()]
    return [(images.cpu(), targets.cpu()) for images, targets in batches]


@pytest.fixture
def tf32_as_in_training():
    """float32 matmuls in TF32, as vit_train.train.train sets them, so the batches are compared as training makes
    them; the previous setting is restored after the test."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("case", LOADER_CASES)
def test_the_device_resident_loaders_give_the_cpus_batches(case, tf32_as_in_training):
    data_cfg = default_data_config()
    data_cfg.update({"name": "synthetic", "synthetic_train_size": 512, "synthetic_test_size": 128,
                     **LOADER_CASES[case]})
    on_cpu, on_gpu = loader_batches(data_cfg, "cpu"), loader_batches(data_cfg, GPU)
    assert len(on_cpu) == len(on_gpu) == 5
    for (cpu_images, cpu_targets), (gpu_images, gpu_targets) in zip(on_cpu, on_gpu):
        if case == "mixup+cutmix":
            # Mixing blends floats, x * lam + partner * (1 - lam): CUDA may fuse the multiply-add that the CPU
            # rounds twice, so the values agree to a unit or two in the last place.
            torch.testing.assert_close(gpu_images, cpu_images, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(gpu_targets, cpu_targets, rtol=1e-6, atol=1e-6)
            continue
        assert torch.equal(gpu_targets, cpu_targets)
        if case == "crop+flip":  # integer gathers, then float32 normalisation, exact on both
            assert torch.equal(gpu_images, cpu_images)
        else:
            # The geometric ops' sampling grid is one float32 matmul, which CUDA runs in TF32 when training (as it
            # does torchvision's): a nearest-neighbour pick close to a pixel boundary can take the neighbour.
            # Emulated on the CPU (inputs truncated to TF32), that changed at most 0.22% of the values of a
            # RandAugment batch of CIFAR images. A real fault, an op that computes otherwise on the GPU, changes
            # every image drawn for it: about one in seven.
            differing = (gpu_images != cpu_images).float().mean().item()
            assert differing <= 0.01, f"{differing:.3%} of the values differ"


# ---- torch.compile -------------------------------------------------------------------------------------------

def test_a_compiled_model_trains(tmp_path):
    final = run(tmp_path, "compiled", device=GPU, compile=True, schedule__steps=60, eval_every=20, save_every=0)
    assert_learned(tmp_path / "compiled", final)
    weights = load_checkpoint(tmp_path / "compiled")["model"]
    assert not any(key.startswith("_orig_mod.") for key in weights)  # the model's names, not the compiled wrapper's


# ---- resuming ------------------------------------------------------------------------------------------------

# vit-train with deterministic kernels. By default the GPU's result is not a pure function of the inputs: flash
# attention's backward pass adds into dQ with atomics in whatever order the blocks finish, and cuBLAS may split
# reductions differently. torch.use_deterministic_algorithms(True) selects orders that never change (cuBLAS asks
# for CUBLAS_WORKSPACE_CONFIG as well, read when its first handle is made, hence a process of its own), so the
# resumed run must equal the uninterrupted one bit for bit, as on the CPU, rather than to a tolerance.
DETERMINISTIC_VIT_TRAIN = ("import sys, torch; torch.use_deterministic_algorithms(True); "
                           "from vit_train.cli import train_main; sys.exit(train_main())")
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def deterministic_vit_train(*args):
    return subprocess.Popen([sys.executable, "-c", DETERMINISTIC_VIT_TRAIN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **DETERMINISTIC_ENV})


def test_an_interrupted_run_resumes_bit_for_bit_on_the_gpu(tmp_path):
    sets = cli_sets(schedule__steps=300, eval_every=100, save_every=100, device=GPU)
    straight = deterministic_vit_train("--output-dir", str(tmp_path), "--name", "straight", *sets)
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err

    interrupted = deterministic_vit_train("--output-dir", str(tmp_path), "--name", "interrupted", *sets)
    for line in interrupted.stdout:
        if line.startswith("step 10/"):
            interrupted.send_signal(signal.SIGTERM)  # finishes its step, saves last.pt, exits
            break
    _, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 128 + signal.SIGTERM, err
    assert 10 <= load_checkpoint(tmp_path / "interrupted")["step"] < 300

    resumed = deterministic_vit_train("--resume", str(tmp_path / "interrupted"))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert eval_records(tmp_path / "interrupted") == eval_records(tmp_path / "straight")
    assert_same_weights(tmp_path / "interrupted", tmp_path / "straight")


# ---- several GPUs --------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: torch.cuda.device_count() < 2")
def test_two_nccl_processes_train_as_one(tmp_path):
    common = dict(schedule__steps=20, device=GPU, precision="fp32", **NO_DROPOUT)
    single = run(tmp_path, "single", **common)
    double = torchrun("--output-dir", str(tmp_path), "--name", "double", *cli_sets(**common))
    _, err = double.communicate(timeout=300)
    assert double.returncode == 0, err
    final = eval_records(tmp_path / "double")[-1]
    assert final["step"] == 20
    # The same global batch, but the matmuls of half batches in TF32 round otherwise than those of the whole one:
    # close rather than equal (gloo on the CPU, in full fp32, agrees to 1e-4: test_train.py).
    assert final["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-2)
    rngs = load_checkpoint(tmp_path / "double")["rng"]
    assert len(rngs) == 2 and all(state["cuda"] is not None for state in rngs)  # two processes, each on a GPU
