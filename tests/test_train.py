"""The training loop: it learns, resumes exactly, stops cleanly on signals, scales across processes, refuses bad
checkpoints. Every run is the tiny `testing` model for a few dozen steps."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import vit_train.train
from vit_train.checkpoint import load_checkpoint, save_checkpoint, write_atomically
from vit_train.cli import entry_point, train_main
from vit_train.resolve import resolve_config
from vit_train.errors import UserError
from vit_train.models.vit import create_model
from vit_train.runtime import fast_bf16, resolve_precision, slow_precision_warning
from vit_train.optim import Plan, param_groups, warmup_cosine
from vit_train.train import StopSignals, train

# The testing model keeps its dropout of 0.1, so exact resumption also covers the dropout generator.
# Crop and flip only, whatever the default recipe adds: these runs are a few dozen steps, which heavier
# augmentation would leave near chance; and mixing pairs images within each process's batch, so it stays off
# where runs on 1 and 2 processes are compared.
TINY = {"model_name": "testing", "data.name": "synthetic", "data.synthetic_train_size": 512,
        "data.auto_augment": "none", "data.random_erasing": 0.0, "data.mixup_alpha": 0.0, "data.cutmix_alpha": 0.0,
        "data.synthetic_test_size": 128, "batch_size": 32, "schedule.steps": 30, "schedule.warmup_steps": 3,
        "optim.lr": 3e-3, "eval_every": 10, "save_every": 10, "log_every": 5, "quiet": True}
NO_DROPOUT = {"model.transformer.dropout_rate": 0.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from two, and on a busy shared machine two threads that
    wait on each other run up to 20x slower. Module-wide, so that runs compared bit for bit share it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(tmp_path, name, **overrides):
    """Train TINY (+ overrides, dotted keys spelled with __) in tmp_path/name; returns the final metrics."""
    overrides = {key.replace("__", "."): value for key, value in overrides.items()}
    return train(resolve_config({**TINY, "output_dir": str(tmp_path), "name": name, **overrides}))


def cli_sets(**overrides):
    """TINY (+ overrides) as vit-train --set arguments."""
    settings = {**TINY, **{key.replace("__", "."): value for key, value in overrides.items()}}
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def eval_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in ("step", "eval_loss", "eval_accuracy")} for r in map(json.loads, lines)]


def assert_same_weights(run_a, run_b, **tolerance):
    a, b = load_checkpoint(run_a)["model"], load_checkpoint(run_b)["model"]
    assert a.keys() == b.keys()
    for key in a:
        if tolerance:
            torch.testing.assert_close(a[key], b[key], **tolerance)
        else:
            assert torch.equal(a[key], b[key]), key


def test_schedules_warm_up_then_decay_to_zero():
    assert [warmup_cosine(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 20) == 1.0 and warmup_cosine(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.0)
    linear = Plan("warmup_linear", total_steps=20, warmup_steps=4, img_size=32).lr_factor
    assert linear(4) == 1.0 and linear(12) == 0.5 and linear(20) == 0.0
    assert warmup_cosine(0, 0, 10) == 1.0


def test_no_weight_decay_on_biases_norms_position_embeddings_and_cls_token():
    model = create_model("testing")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "head.bias", "blocks.0.attn.qkv.bias"} <= exempt
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if n not in exempt}
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_learns_on_synthetic_and_writes_the_run_directory(tmp_path):
    final = run(tmp_path, "synthetic", schedule__steps=60, eval_every=20, save_every=30)
    run_dir = tmp_path / "synthetic"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60]
    for record in records:
        assert {"step", "epoch", "train_loss", "eval_loss", "eval_accuracy", "lr", "images_per_sec"} <= record.keys()
        assert 0 <= record["eval_accuracy"] <= 1
    assert records[-1]["eval_loss"] < records[0]["eval_loss"] - 0.2
    assert final["eval_accuracy"] > 0.5 and final["eval_loss"] == records[-1]["eval_loss"]
    assert list(run_dir.glob("events.out.tfevents.*"))

    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)  # plain tensors and values only
    assert checkpoint["step"] == 60
    assert checkpoint["metrics"]["eval_accuracy"] == final["eval_accuracy"]
    assert checkpoint["best_accuracy"] == max(r["eval_accuracy"] for r in records)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    assert {"torch", "cuda", "numpy", "python"} <= checkpoint["rng"][0].keys()
    assert checkpoint["class_names"][0] == "class_0" and checkpoint["config"]["num_classes"] == 10
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved == json.loads(json.dumps(checkpoint["config"]))
    assert load_checkpoint(run_dir / "best.pt")["best_accuracy"] == checkpoint["best_accuracy"]


def test_learns_on_a_real_cifar10_subset(tmp_path, cifar10_subset):
    run(tmp_path, "cifar", data__name="cifar10", data__data_dir=str(cifar10_subset), data__download=False,
        schedule__steps=60, eval_every=20, save_every=0)
    records = eval_records(tmp_path / "cifar")
    assert records[-1]["eval_loss"] < records[0]["eval_loss"] - 0.05
    assert records[-1]["eval_accuracy"] > 0.2  # chance is 0.1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 30-step run to compare interrupted ones with."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    return tmp_path / "straight", run(tmp_path, "straight")


def interrupt_at(monkeypatch, call, action):
    """Make the `call`-th train_step do `action` (before the step: a crash; after it: a signal)."""
    real_step, calls = vit_train.train.train_step, []

    def step(*args):
        calls.append(1)
        if len(calls) == call and action == "crash":
            raise RuntimeError("power cut")
        loss = real_step(*args)
        if len(calls) == call and action == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(vit_train.train, "train_step", step)


@pytest.mark.parametrize("action", ["crash", "sigterm"])
def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_result(action, tmp_path, monkeypatch,
                                                                        uninterrupted):
    straight_dir, straight = uninterrupted
    interrupt_at(monkeypatch, 16, action)
    if action == "crash":  # dies in step 16: the step-10 checkpoint is what is left
        with pytest.raises(RuntimeError, match="power cut"):
            run(tmp_path, "interrupted")
        saved_step = 10
    else:  # SIGTERM during step 16: the step finishes, last.pt is written, the run returns
        stopped = run(tmp_path, "interrupted")
        assert stopped["stopped_by"] == signal.SIGTERM and stopped["step"] == 16
        saved_step = 16
    monkeypatch.undo()
    run_dir = tmp_path / "interrupted"
    assert load_checkpoint(run_dir)["step"] == saved_step

    resumed = train(resolve_config({"resume": str(run_dir)}))
    assert resumed["step"] == 30 and resumed["stopped_by"] == 0
    assert (resumed["eval_loss"], resumed["eval_accuracy"]) == (straight["eval_loss"], straight["eval_accuracy"])
    assert eval_records(run_dir) == eval_records(straight_dir)  # nothing logged twice, nothing missing
    assert_same_weights(run_dir, straight_dir)


def signal_a_long_run(tmp_path, *signums):
    """Start `python -m vit_train` on a 5000-step run, send it `signums` once it logged step 10; (process, out, err)."""
    command = [sys.executable, "-m", "vit_train", "--output-dir", str(tmp_path), "--name", "long",
               *cli_sets(schedule__steps=5000, save_every=0)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in process.stdout:
        if line.startswith("step 10/"):
            for signum in signums:
                process.send_signal(signum)
            break
    out, err = process.communicate(timeout=120)
    return process, out, err


def test_sigterm_to_the_command_saves_and_prints_how_to_resume(tmp_path):
    process, out, err = signal_a_long_run(tmp_path, signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: finishing step " in err and "send SIGTERM again to stop at once without saving" in err
    assert f"Resume with: vit-train --resume {tmp_path / 'long'}" in out
    step = load_checkpoint(tmp_path / "long")["step"]
    assert 10 <= step < 5000

    assert train_main(["--resume", str(tmp_path / "long"), "--steps", str(step + 5)]) == 0
    assert load_checkpoint(tmp_path / "long")["step"] == step + 5


def test_sigint_says_what_happens_and_a_repeat_within_a_second_changes_nothing(tmp_path):
    # Twice at once, as under torchrun: the terminal's Ctrl-C, then torchrun's copy.
    process, out, err = signal_a_long_run(tmp_path, signal.SIGINT, signal.SIGINT)
    assert process.returncode == 128 + signal.SIGINT, err
    said = [line for line in err.splitlines() if line.startswith("SIGINT")]
    assert len(said) == 1 and "Traceback" not in err, err
    assert re.fullmatch(rf"SIGINT: finishing step \d+, then saving {re.escape(str(tmp_path / 'long' / 'last.pt'))}; "
                        r"press Ctrl-C again to stop at once without saving", said[0])
    step = int(said[0].split()[3].rstrip(","))
    assert load_checkpoint(tmp_path / "long")["step"] == step  # the step it named is the one it saved
    assert f"Resume with: vit-train --resume {tmp_path / 'long'}" in out


@pytest.mark.parametrize("signum, again", [(signal.SIGINT, "press Ctrl-C again"),
                                           (signal.SIGTERM, "send SIGTERM again")])
def test_a_second_signal_after_a_second_stops_at_once(signum, again, capfd):
    name = signal.Signals(signum).name
    # what the handlers were (a suite started in the background by a shell has SIGINT ignored, not Python's)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals(announce=True) as stops:
        stops.plan = lambda: "finishing step 8, then saving runs/x/last.pt"
        os.kill(os.getpid(), signum)
        assert stops.received == [signum]
        time.sleep(StopSignals.REPEAT_AFTER_S)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signum)
            time.sleep(5)  # not reached: the handler runs as soon as os.kill returns
    assert capfd.readouterr().err.splitlines() == [
        f"{name}: finishing step 8, then saving runs/x/last.pt; {again} to stop at once without saving",
        f"{name} again: stopping at once, without saving"]
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # the handlers are given back


def test_ctrl_c_in_any_command_exits_130_without_a_traceback(capsys):
    @entry_point
    def interrupted(argv):
        raise KeyboardInterrupt

    assert interrupted([]) == 128 + signal.SIGINT and capsys.readouterr().err == ""


def test_gradient_accumulation_4x16_matches_1x64(tmp_path):
    # SGD: its update is linear in the gradient, so the weights show the gradients' agreement (Adam's
    # normalisation would blow float rounding up for parameters whose gradients are near zero).
    # fp32: in bf16 (auto's choice on a CPU with bf16 instructions) 4 micro-batches round differently from one batch.
    common = dict(batch_size=64, schedule__steps=8, eval_every=0, save_every=0, optim__name="sgd", optim__lr=0.1,
                  precision="fp32", **NO_DROPOUT)
    whole = run(tmp_path, "whole", **common)
    accumulated = run(tmp_path, "accumulated", grad_accum=4, **common)
    assert accumulated["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-5)
    assert_same_weights(tmp_path / "whole", tmp_path / "accumulated", rtol=1e-4, atol=1e-5)


def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vit_train", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_gloo_processes_match_one_and_resume(tmp_path):
    # With a weight EMA too: every process must average rank 0's weights, not its own random start.
    # fp32: in bf16 (auto's choice on a CPU with bf16 instructions) two half batches round differently from one.
    common = dict(schedule__steps=20, optim__ema_decay=0.9, precision="fp32", **NO_DROPOUT)
    sets = cli_sets(**common)
    single = run(tmp_path, "single", **common)
    double = torchrun("--output-dir", str(tmp_path), "--name", "double", *sets)
    out, err = double.communicate(timeout=300)
    assert double.returncode == 0, err
    final = eval_records(tmp_path / "double")[-1]
    assert final["step"] == 20
    assert final["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-4)
    assert final["eval_accuracy"] == pytest.approx(single["eval_accuracy"], abs=1 / 128)
    last = json.loads((tmp_path / "double" / "metrics.jsonl").read_text().splitlines()[-1])
    single_last = json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval_ema_loss"] == pytest.approx(single_last["eval_ema_loss"], abs=1e-4)
    assert len(load_checkpoint(tmp_path / "double")["rng"]) == 2  # each process's generators

    # Interrupted with SIGTERM (torchrun passes it on to both processes), then resumed under torchrun.
    interrupted = torchrun("--output-dir", str(tmp_path), "--name", "interrupted", *sets,
                           "--set", "schedule.steps=2000", "--set", "save_every=0")
    for line in interrupted.stdout:
        if line.startswith("step 5/"):
            interrupted.send_signal(signal.SIGTERM)
            break
    interrupted.communicate(timeout=120)
    step = load_checkpoint(tmp_path / "interrupted")["step"]
    assert 5 <= step < 2000
    resumed = torchrun("--resume", str(tmp_path / "interrupted"), "--steps", str(step + 5))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert load_checkpoint(tmp_path / "interrupted")["step"] == step + 5


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(UserError, match=r"training diverged: .* non-finite at step (\d+); .*last\.pt still holds"):
        run(tmp_path, "diverging", optim__lr=1e30, schedule__warmup_steps=0, optim__grad_clip=0.0, save_every=1,
            eval_every=0, log_every=1)
    checkpoint = load_checkpoint(tmp_path / "diverging")
    assert checkpoint["step"] >= 1
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_the_cpu(precision, tmp_path, capsys):
    final = run(tmp_path, precision, precision=precision, schedule__steps=5, eval_every=0, save_every=0)
    assert math.isfinite(final["train_loss"]) and math.isfinite(final["eval_loss"])
    assert bool(load_checkpoint(tmp_path / precision)["scaler"]) == (precision == "fp16")  # fp16 scales the loss
    warning = slow_precision_warning(precision, torch.device("cpu"))  # this CPU's own answer: warned, or silent
    assert (f"warning: {warning}" in capsys.readouterr().out) == (warning is not None)


@pytest.mark.parametrize("precision, flags, slow", [
    ("bf16", {"avx2", "avx512f", "avx512bw"}, True),      # AVX-512 without bf16 dot products: emulated
    ("bf16", {"avx512f", "avx512_bf16"}, False),
    ("bf16", {"avx2", "amx_bf16"}, False),
    ("fp16", {"avx512f", "avx512_bf16"}, True),           # a Zen 4: bf16 yes, fp16 no
    ("fp16", {"avx512f", "avx512_fp16"}, False),
    ("fp16", {"amx_fp16"}, False),
    ("fp32", set(), False),
])
def test_bf16_and_fp16_on_a_cpu_without_their_instructions_are_warned_about(precision, flags, slow):
    warning = slow_precision_warning(precision, torch.device("cpu"), flags)
    assert (warning is not None) == slow
    if slow:
        assert "\n" not in warning and "slower than fp32" in warning and f"--precision {precision}" in warning
    assert slow_precision_warning(precision, torch.device("cuda"), flags) is None  # GPUs: a matter for autocast
    # auto picks bf16 on a CPU only where it is native (this CPU's answer; held to AVX2: tests/test_muon.py)
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if fast_bf16(torch.device("cpu")) else "fp32")


def test_a_warmup_longer_than_the_run_is_pointed_out(tmp_path, capsys):
    run(tmp_path, "short", schedule__steps=5, schedule__warmup_steps=500, eval_every=0, save_every=0)
    assert "the 500-step warm-up is not shorter than the 5-step run" in capsys.readouterr().out
    run(tmp_path, "fine", schedule__steps=5, schedule__warmup_steps=2, eval_every=0, save_every=0)
    assert "warm-up" not in capsys.readouterr().out


@pytest.fixture
def tiny_disk(small_disk):
    """A real 256 KiB filesystem (tmpfs)."""
    return small_disk("256k")


def test_a_full_disk_keeps_the_previous_checkpoint_and_report(tiny_disk):
    path = tiny_disk / "last.pt"
    good = {"model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "step": 10, "config": {}}
    save_checkpoint(good, path)
    # 512 KiB of weights cannot fit: torch's zip writer fails with "unexpected pos", a RuntimeError
    with pytest.raises(UserError, match=r"could not write .*last\.pt \(torch's writer failed: .*; 0\.\d MiB free\); "
                                        r".*still holds the previous checkpoint") as caught:
        save_checkpoint({**good, "model": {"w": torch.ones(128 * 1024)}, "step": 20}, path)
    assert "\n" not in str(caught.value)
    assert [p.name for p in tiny_disk.iterdir()] == ["last.pt"]  # no half-written temporary file left
    assert load_checkpoint(path)["step"] == 10

    report = tiny_disk / "eval.json"  # a plain write fails with the OSError itself
    write_atomically(report, lambda f: f.write(b"{}"))
    with pytest.raises(UserError, match=r"No space left on device\); .*eval\.json still holds the previous file"):
        write_atomically(report, lambda f: f.write(b"x" * 512 * 1024))
    assert report.read_bytes() == b"{}" and sorted(p.name for p in tiny_disk.iterdir()) == ["eval.json", "last.pt"]
