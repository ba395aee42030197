"""A training step the GPU never waits on: steady steps (no log, evaluation or save due) make no call that makes
the host wait for the device and build no device tensor from Python data. Counted on the CPU with a
TorchFunctionMode over whole runs: a run of twice the steady steps makes exactly as many such calls."""
import collections
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from vit_train.checkpoint import load_checkpoint
from vit_train.resolve import resolve_config
from vit_train.train import build_run, train, train_batches

# Calls that make the host wait for the device (reading a value) or copy Python data to it.
HOST_WAITS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}
FROM_PYTHON = {"tensor", "as_tensor"}
EVERYTHING_ON = {"model_name": "testing", "data.name": "synthetic", "data.synthetic_train_size": 512,
                 "data.synthetic_test_size": 64, "batch_size": 32, "optim.lr": 1e-3,
                 "data.auto_augment": "randaugment", "data.random_erasing": 0.5, "data.mixup_alpha": 0.8,
                 "data.cutmix_alpha": 1.0, "optim.ema_decay": 0.9, "model.patch_dropout": 0.5,
                 "model.transformer.drop_path_rate": 0.1, "optim.grad_clip": 1.0, "optim.label_smoothing": 0.1,
                 "eval_every": 0, "save_every": 0, "quiet": True}


class CountingMode(TorchFunctionMode):
    """Counts the torch calls named in HOST_WAITS | FROM_PYTHON made while it is active."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_WAITS | FROM_PYTHON:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def counted_run(tmp_path, steps, **settings):
    """The calls counted over a whole `steps`-step run that logs only at its end."""
    config = resolve_config({**EVERYTHING_ON, "schedule.steps": steps, "log_every": steps,
                             "output_dir": str(tmp_path), "name": f"run{steps}", **settings})
    with CountingMode() as mode:
        train(config)
    return mode.counts


@pytest.mark.parametrize("settings", [{}, {"schedule.low_res_size": 16, "schedule.low_res_fraction": 0.5}],
                         ids=["augmentation, mixing, erasing, EMA", "with progressive resizing"])
def test_steady_steps_make_no_host_wait_and_copy_no_python_data(tmp_path, settings):
    torch.set_num_threads(1)
    counted_run(tmp_path, 30, **settings)  # makes the constants each device keeps (runtime.device_constant)
    short, long = counted_run(tmp_path, 12, **settings), counted_run(tmp_path, 24, **settings)
    assert sum(short.values()) > 0  # the counting works: the ends of runs do read values
    assert long == short, f"calls that grow with the steps: {long - short}"


@pytest.mark.cuda
@pytest.mark.parametrize("settings", [{}, {"optim.name": "muon", "precision": "fp16"}],
                         ids=["auto precision", "Muon under fp16 loss scaling"])
def test_steady_steps_on_a_gpu_never_synchronise(tmp_path, settings):
    """The steady part of the loop on the GPU, under CUDA's own detector of synchronising calls. With fp16, the
    loss scaler's overflow check stays on the device only if the optimizer unscales and skips for itself."""
    device = torch.device("cuda")
    config = resolve_config({**EVERYTHING_ON, "schedule.steps": 20, "device": "cuda", "output_dir": str(tmp_path),
                             "name": "gpu", **settings})
    run = build_run(config, tmp_path / "gpu", rank=0, world_size=1, device=device)
    batches = train_batches(run.loaders.train, 0)
    for _ in range(3):  # first steps allocate and warm caches
        run.state.set_learning_rate()
        run.step(*next(batches))
        run.state.step += 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            run.state.set_learning_rate()
            loss = run.step(*next(batches), *run.state.plan.phase(run.state.step))
            run.state.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------------------
# Several machines, memory, compilation, the GPU check script

TINY_SETS = ["--model", "testing", "--dataset", "synthetic", "--batch-size", "32", "--quiet",
             "--set", "data.auto_augment=none", "--set", "data.mixup_alpha=0", "--set", "data.cutmix_alpha=0",
             "--set", "data.random_erasing=0", "--set", "model.transformer.dropout_rate=0"]
REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 7 * 2**30  # of address space: torch and the run fit, a batch of 32768 in one piece does not


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args):
    """`torchrun --nnodes 2` as two node processes on this machine (one process each, gloo on the CPU)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                              "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                              "-m", "vit_train", *TINY_SETS, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]


def finish(nodes, stopped=False):
    """Wait for the nodes; they must succeed unless `stopped` (torchrun itself exits 1 after passing on SIGTERM)."""
    for node in nodes:
        out, err = node.communicate(timeout=300)
        assert stopped or node.returncode == 0, err


def test_two_nodes_train_save_once_and_resume_exactly(tmp_path):
    # enough steps that the signal, sent on reading step 4's line, lands before the end on a fast machine too
    finish(two_nodes("--steps", "48", "--set", "log_every=4", "--save-every", "48", "--output-dir", str(tmp_path),
                     "--name", "straight"))
    interrupted = two_nodes("--steps", "48", "--set", "log_every=4", "--save-every", "48", "--output-dir",
                            str(tmp_path), "--name", "stopped")
    for line in interrupted[0].stdout:  # node 0 holds rank 0, which logs
        if line.startswith("step 4/"):
            for node in interrupted:  # as a scheduler stops a job: every node's torchrun gets SIGTERM
                node.send_signal(signal.SIGTERM)
            break
    finish(interrupted, stopped=True)
    saved = load_checkpoint(tmp_path / "stopped")
    # agreed at a log step after the signal, before the end; one save, both generators
    assert saved["step"] % 4 == 0 and 4 < saved["step"] < 48 and len(saved["rng"]) == 2, saved["step"]
    finish(two_nodes("--resume", str(tmp_path / "stopped")))
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "stopped")
    assert a["step"] == b["step"] == 48
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_memory_exhausted_on_the_cpu_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A real allocation failure: the resumed run's batch cannot fit under the address-space limit set here."""
    common = [*TINY_SETS, "--output-dir", str(tmp_path), "--name", "run", "--set", "data.synthetic_train_size=32768"]
    assert subprocess.run([sys.executable, "-m", "vit_train", *common, "--steps", "2"], capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))

    done = subprocess.run([sys.executable, "-m", "vit_train", "--resume", str(tmp_path / "run"), "--steps", "4",
                           "--batch-size", "32768"], capture_output=True, text=True, preexec_fn=limit_memory,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: out of memory on the CPU while training at batch size 32768 (1 "
                                  "micro-batches of 32768 per process and step); give --grad-accum 2 "), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert (tmp_path / "run" / "last.pt").read_bytes() == before

    # A model that cannot fit at all is not a batch problem: the line says so, and nothing is written. (Its blocks
    # are small, so the check before building lets it through; the 10^8-wide pre-logits layer is not.)
    huge = subprocess.run([sys.executable, "-m", "vit_train", *common, "--name", "huge", "--steps", "1",
                           "--set", "model.representation_size=100000000"], capture_output=True, text=True,
                          preexec_fn=limit_memory, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert huge.returncode == 2 and huge.stderr.count("\n") == 1, huge.stderr
    assert huge.stderr.startswith("error: out of memory on the CPU building the model itself (testing with hidden size "
                                  "32"), huge.stderr
    assert not (tmp_path / "huge").exists()


def test_a_compiled_run_with_patch_dropout_low_resolution_and_every_patch_compiles_each_shape_once(tmp_path,
                                                                                                     capsys):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = resolve_config({**EVERYTHING_ON, "compile": True, "schedule.steps": 8, "log_every": 4,
                             "schedule.low_res_size": 16, "schedule.low_res_fraction": 0.5,
                             "schedule.all_patches_steps": 2,
                             "data.synthetic_test_size": 64, "eval_batch_size": 64, "optim.ema_decay": 0.0,
                             "output_dir": str(tmp_path), "name": "compiled"})
    train(config)
    # training at 16 px, at 32 px and on every patch at 32 px, evaluation at 32 px: four graphs, none recompiled
    # as the steps go on
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    assert "compiled: the first step took" in capsys.readouterr().out


def test_a_compiled_cpu_run_prints_no_warning_of_torch_about_cuda_home(tmp_path):
    # With a CUDA toolkit and no GPU (CUDA_HOME set), torch's C++-extension module warns as compiling imports it.
    done = subprocess.run([sys.executable, "-m", "vit_train", "--dataset", "synthetic", "--model", "testing",
                           "--device", "cpu", "--steps", "1", "--compile", "--quiet", "--output-dir",
                           str(tmp_path), "--name", "run"], capture_output=True, text=True,
                          env={**os.environ, "CUDA_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "CUDA" not in done.stdout + done.stderr and "compiled: the first step took" in done.stdout


def test_compile_on_a_cpu_without_a_cpp_compiler_is_one_line_before_anything_is_written(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vit_train", "--dataset", "synthetic", "--model", "testing",
                           "--device", "cpu", "--steps", "2", "--compile", "--output-dir", str(tmp_path), "--name",
                           "run"], capture_output=True, text=True,
                          env={**os.environ, "CXX": str(tmp_path / "no-such-g++"), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: --compile on the CPU needs a C++ compiler") and \
        done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "run").exists()


def test_the_gpu_check_without_a_gpu_says_so_in_one_line_and_writes_nothing(tmp_path):
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--report", str(tmp_path / "r.md"),
                           "--time-budget", "1m"], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                               "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert done.stderr == "error: no CUDA GPU visible; gpu_check.sh needs one\n"
    assert list(tmp_path.iterdir()) == []
    for script in ("gpu_check.sh", "train_multi_gpu.sh", "train_cifar10.sh", "finetune_pretrained.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "scripts" / script)]).returncode == 0, script
