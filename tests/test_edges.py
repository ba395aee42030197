"""What a new user trips on, beyond the bad-input table: lengths at the edges, budgets at any evaluation frequency
and too short for the model, one process per run folder, a full disk under TensorBoard, and the EMA's bookkeeping."""
import errno
import fcntl
import itertools
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch

import vit_train.checkpoint
import vit_train.models
import vit_train.train
from vit_train.budget import Calibration, budget_steps
from vit_train.checkpoint import LOCK_FILE, load_checkpoint, owned_folder, save_checkpoint
from vit_train.cli import eval_main, export_main, train_main
from vit_train.resolve import resolve_config
from vit_train.errors import UserError
from vit_train.models.vit import VisionTransformer
from vit_train.optim import Plan
from vit_train.report import duration_line, end_time, format_duration
from vit_train.train import train

from test_data import write_image_folder

TINY_SETS = ["--model", "testing", "--dataset", "synthetic", "--batch-size", "32", "--quiet",
             "--set", "data.auto_augment=none", "--set", "data.mixup_alpha=0", "--set", "data.cutmix_alpha=0",
             "--set", "data.random_erasing=0"]
TINY = {"model_name": "testing", "data.name": "synthetic", "data.synthetic_train_size": 512,
        "data.auto_augment": "none", "data.random_erasing": 0.0, "data.mixup_alpha": 0.0, "data.cutmix_alpha": 0.0,
        "data.synthetic_test_size": 128, "batch_size": 32, "optim.lr": 3e-3, "quiet": True}


def test_lengths_beyond_any_calendar_still_print():
    assert end_time(3.6e12) == "1.14e+05 years from now" and end_time(400 * 86400) == "1.1 years from now"
    assert format_duration(1e18 * 3600) == "1.14e+14 years" and format_duration(364 * 86400) == "364 days 0:00:00"
    line = duration_line(1e14 * 0.01, torch.device("cpu"), steps=10**14, steps_per_epoch=16)
    assert "100000000000000 steps" in line and "years" in line


def test_a_budget_plan_is_the_longest_that_fits_at_any_evaluation_and_save_frequency():
    """Against brute force over a grid of costs: the most steps whose cost fits, never one more."""
    for step_s, eval_s, save_s, every_eval, every_save, done, budget in itertools.product(
            (0.01, 0.07, 0.5), (0.0, 0.3, 4.0), (0.0, 0.2), (0, 1, 2, 7, 100), (0, 1, 3), (0, 5), (0.5, 20.0)):
        def cost(n):
            evals = 1 + ((done + n) // every_eval - done // every_eval if every_eval else 0)
            saves = 1 + ((done + n) // every_save - done // every_save if every_save else 0)
            return n * step_s + evals * eval_s + saves * save_s
        best = max((n for n in range(int(budget / step_s) + 2) if cost(n) <= budget), default=0)
        got = budget_steps(budget, step_s, eval_s, save_s, every_eval, every_save, done=done)
        assert got == best, (step_s, eval_s, save_s, every_eval, every_save, done, budget)
    # the case a user met: evaluations every 2 steps no longer leave a 20-second budget with no steps
    assert budget_steps(20 - 3, 0.05, 0.1, 0.01, 2, 0) > 100


class SlowClock:
    """Each reading is 5 s after the last: every step and test batch looks 5 s long."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 5.0
        return self.now


def test_a_budget_too_short_for_the_model_is_refused_at_its_first_step(tmp_path, monkeypatch):
    steps = []
    real_step = vit_train.train.train_step
    monkeypatch.setattr(vit_train.train, "train_step", lambda *args: steps.append(1) or real_step(*args))
    config = resolve_config({**TINY, "time_budget": "10s", "output_dir": str(tmp_path), "name": "short"})
    with pytest.raises(UserError, match=r"time budget 10s is too short for this run: start-up and timing \d+ steps"):
        train(config, clock=SlowClock())
    assert len(steps) == 2 and not (tmp_path / "short").exists()  # refused after timing one step, nothing written


def run_long(tmp_path, name, *extra):
    """`python -m vit_train` on a 5000-step run; returns the process once it logged step 20 (last.pt holds 10)."""
    command = [sys.executable, "-m", "vit_train", *TINY_SETS, "--steps", "5000", "--save-every", "10",
               "--output-dir", str(tmp_path), "--name", name, *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in process.stdout:
        if line.startswith("step 20/"):
            return process
    raise AssertionError(process.communicate()[1])


def test_a_run_folder_has_one_writer_and_a_killed_one_leaves_it_free(tmp_path, capsys):
    first = run_long(tmp_path, "shared")
    try:
        assert train_main([*TINY_SETS, "--steps", "20", "--output-dir", str(tmp_path), "--name", "shared"]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {tmp_path / 'shared'} is in use by another vit-train process (pid {first.pid}); "
                       "wait for it to end, or choose another --name\n")
    finally:
        first.send_signal(signal.SIGKILL)  # no chance to let go: the system releases the lock
        first.communicate(timeout=60)
    step = load_checkpoint(tmp_path / "shared")["step"]
    assert train_main(["--resume", str(tmp_path / "shared"), "--steps", str(step + 2)]) == 0
    assert load_checkpoint(tmp_path / "shared")["step"] == step + 2


def fill(folder):
    """Write a file into `folder` until its filesystem is full."""
    with open(folder / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)


def test_a_full_disk_under_tensorboard_is_one_line_and_the_last_checkpoint_survives(small_disk):
    """The disk fills after the step-200 checkpoint; at step 400 TensorBoard's thread writes the attention image
    and the run appends to metrics.jsonl, both into a full disk."""
    disk = small_disk("2m")
    command = [sys.executable, "-m", "vit_train", *TINY_SETS, "--steps", "5000", "--eval-every", "200",
               "--save-every", "200", "--output-dir", str(disk), "--name", "full"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in process.stdout:
        if line.startswith("step 250/"):
            fill(disk)
            break
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert err.startswith("error: could not write ") and err.count("\n") == 1, err
    assert "No space left on device" in err and "Traceback" not in err
    assert load_checkpoint(disk / "full" / "last.pt")["step"] == 200  # the last good one, whole
    assert not [p for p in (disk / "full").iterdir() if p.name.endswith(".tmp")]


def test_an_ema_run_says_which_accuracy_is_which_and_a_run_without_evaluation_prints_no_sentinel(tmp_path, capsys,
                                                                                               monkeypatch):
    final = train(resolve_config({**TINY, "schedule.steps": 6, "optim.ema_decay": 0.5, "eval_every": 3,
                                  "output_dir": str(tmp_path), "name": "ema"}))
    summary = capsys.readouterr().out.splitlines()[-1]
    assert f"eval accuracy {final['eval_accuracy']:.4f}  EMA accuracy {final['eval_ema_accuracy']:.4f} " in summary
    assert f"(best EMA {final['best_accuracy']:.4f})" in summary

    stopped_early = []
    real_step = vit_train.train.train_step

    def stop_at_once(*args):
        loss = real_step(*args)
        if not stopped_early:
            stopped_early.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(vit_train.train, "train_step", stop_at_once)
    final = train(resolve_config({**TINY, "schedule.steps": 50, "output_dir": str(tmp_path), "name": "early"}))
    assert final["best_accuracy"] is None
    summary = capsys.readouterr().out.splitlines()[-1]
    assert "(best n/a)" in summary and "-1.0" not in summary


def test_the_summary_gives_the_images_a_second_of_the_whole_loop_with_evaluations_left_out(tmp_path, capsys,
                                                                                          monkeypatch):
    # the last logging window's rate misstates a run whose phases train at different speeds (an ending on every
    # patch runs at a third of the speed), so the summary gives the whole loop's
    real_evaluate = vit_train.train.Run.evaluate

    def slow_evaluate(self, *args):
        time.sleep(1.0)
        return real_evaluate(self, *args)
    monkeypatch.setattr(vit_train.train.Run, "evaluate", slow_evaluate)
    final = train(resolve_config({**TINY, "schedule.steps": 8, "eval_every": 2, "log_every": 2,
                                  "output_dir": str(tmp_path), "name": "rate"}))
    images = 8 * TINY["batch_size"]
    assert final["run_images_per_sec"] > images / (final["seconds"] - 4.0)  # the 4 evaluations' 4 s are not in it
    summary = capsys.readouterr().out.splitlines()[-1]
    assert f"  {final['run_images_per_sec']:.0f} img/s  in " in summary


def test_a_replan_that_lengthens_a_run_counts_its_new_steps_at_full_resolution():
    """The low-resolution boundary stays where it was, so every added step is a full-resolution one."""
    plan = Plan("warmup_cosine", total_steps=1000, warmup_steps=50, img_size=32, low_res_size=16, low_res_steps=500)
    calibration = Calibration(budget=1000.0, step_seconds={(16, False): 0.2, (32, False): 0.6}, eval_seconds=1.0,
                              save_seconds=0.5)
    new, slowdown = calibration.replan(plan, step=200, seconds_left=500.0, seconds_trained=40.0, first_step=0,
                                       eval_every=0, save_every=0)
    assert slowdown == pytest.approx(1.0) and new.low_res_steps == 500 and new.total_steps > 1000
    spent = calibration.calibrated_seconds(new, 200, new.total_steps) + 1.0 + 0.5
    assert spent <= 500.0 - 30.0 < spent + 0.6  # fits the time less a 6% reserve, one more step would not


def test_paths_are_read_as_a_shell_reads_them_by_us_and_by_torchvision(tmp_path, monkeypatch, capsys):
    """'~' unexpanded by the shell (as in --data-dir=~/x) means the home folder to torchvision, so it means it to
    our checks and writers too: nothing lands in a folder called '~'. --set resume=RUN is --resume RUN."""
    home = tmp_path / "home"
    write_image_folder(home / "imgs", per_class_train=8, per_class_val=4)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    folder = ["--model", "testing", "--dataset", "imagefolder", "--img-size", "32", "--batch-size", "8", "--quiet",
              "--set", "data.num_workers=0"]
    assert train_main([*folder, "--data-dir=~/imgs", "--output-dir=~/runs", "--name", "r", "--steps", "2"]) == 0
    run_dir = home / "runs" / "r"
    assert (run_dir / "last.pt").exists() and not (tmp_path / "~").exists() and not (home / "runs" / "~").exists()
    assert json.loads((run_dir / "config.json").read_text())["data"]["data_dir"] == str(home / "imgs")
    assert train_main(["--set", "resume=~/runs/r", "--steps", "3", "--quiet"]) == 0
    assert load_checkpoint(run_dir / "last.pt")["step"] == 3
    capsys.readouterr()
    assert eval_main(["--checkpoint", "~/runs/r", "--json", "~/eval.json"]) == 0
    assert json.loads((home / "eval.json").read_text())["num_samples"] == 8
    assert not (tmp_path / "~").exists()


def test_a_setting_the_run_never_reads_is_named_in_a_warning(tmp_path, capsys):
    common = [*TINY_SETS, "--steps", "1", "--output-dir", str(tmp_path)]
    assert train_main([*common, "--name", "a", "--set", "optim.name=adamw", "--set", "optim.momentum=0.5",
                       "--set", "data.num_workers=4", "--no-download"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert [line.split()[1] for line in warnings] == ["data.download", "data.num_workers", "optim.momentum"]
    assert "optim.name=sgd" in warnings[2] and "does nothing" in warnings[2]
    # read: momentum with SGD, the synthetic set's sizes with --dataset synthetic
    assert train_main([*common, "--name", "b", "--set", "optim.name=sgd", "--set", "optim.momentum=0.5",
                       "--set", "data.synthetic_train_size=64"]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_outputs_that_overflow_from_finite_weights_stop_the_run_as_diverged(tmp_path):
    """A weight decay of 1e12 leaves the weights finite but their logits infinite: the evaluation's loss is nan,
    and that run must not end 'done' with a best.pt of broken weights."""
    config = resolve_config({**TINY, "schedule.steps": 2, "optim.weight_decay": 1e12, "output_dir": str(tmp_path),
                             "name": "wd"})
    with pytest.raises(UserError, match="training diverged"):
        train(config)
    assert not (tmp_path / "wd" / "best.pt").exists() and not (tmp_path / "wd" / "last.pt").exists()


def test_a_run_saved_with_an_empty_path_still_resumes(tmp_path):
    """Empty paths are refused when given, not when read back: a run saved before they were refused resumes."""
    train(resolve_config({**TINY, "schedule.steps": 2, "output_dir": str(tmp_path), "name": "old"}))
    checkpoint = load_checkpoint(tmp_path / "old" / "last.pt")
    checkpoint["config"]["data"]["data_dir"] = ""
    save_checkpoint(checkpoint, tmp_path / "old" / "last.pt")
    assert train(resolve_config({"resume": str(tmp_path / "old"), "schedule.steps": 3}))["step"] == 3


def test_an_export_that_does_not_fit_leaves_the_pair_as_it_was(small_disk, tmp_path, capsys):
    """The weights and their card change together: when either cannot be written, neither changes (a new
    weights file without its card, or an old card beside new weights, would load the wrong way)."""
    train(resolve_config({**TINY, "schedule.steps": 1, "output_dir": str(tmp_path), "name": "r"}))
    disk = small_disk("512k")
    assert export_main(["--checkpoint", str(tmp_path / "r"), "--out", str(disk / "vit.pth")]) == 0
    pair = {name: (disk / name).read_bytes() for name in ("vit.json", "vit.pth")}
    weight_pages = -(-len(pair["vit.pth"]) // 4096)
    capsys.readouterr()
    # room for half the weights, over the old pair and beside it; for new weights but not their card too
    for room, out in [(weight_pages // 2, "vit.pth"), (weight_pages // 2, "new.pth"), (weight_pages, "new.pth")]:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - room * 4096))
        assert export_main(["--checkpoint", str(tmp_path / "r"), "--out", str(disk / out)]) == 2, (room, out)
        err = capsys.readouterr().err
        assert err.startswith("error: could not write ") and err.count("\n") == 1, err
        (disk / "filler").unlink()
        assert {p.name: p.read_bytes() for p in disk.iterdir()} == pair


def test_a_run_claims_its_folder_before_reading_any_data(tmp_path, monkeypatch, capsys):
    """Another process takes the folder between this run's config and its start: the run is refused before it
    builds anything, and a folder it made for itself is gone again."""
    config = resolve_config({**TINY, "schedule.steps": 2, "output_dir": str(tmp_path / "runs"), "name": "raced"})
    built = []
    monkeypatch.setattr(vit_train.train, "build_loaders", lambda *args, **kwargs: built.append(1))
    with owned_folder(tmp_path / "runs" / "raced", resuming=False):  # as the other process holds it
        with pytest.raises(UserError, match=rf"in use by another vit-train process \(pid {os.getpid()}\)"):
            train(config)
    assert built == []
    refused = resolve_config({**TINY, "schedule.steps": 2, "output_dir": str(tmp_path / "runs"), "name": "bad",
                              "data.name": "cifar10", "data.data_dir": str(tmp_path / "none"), "data.download": False})
    monkeypatch.undo()
    with pytest.raises(UserError, match="downloading is off"):
        train(refused)
    assert list(tmp_path.iterdir()) == []  # neither folder, nor the runs/ made for them, is left


def test_a_folder_let_go_while_another_run_claims_it_is_claimed_anew(tmp_path, monkeypatch):
    """A run that made its folder and wrote nothing removes it as it ends. When that happens between a second
    run's open of the lock file and its lock, the second holds a file no longer in any folder: it must notice and
    claim the folder again, so that it has a folder to write in and a third run is refused."""
    folder = tmp_path / "runs" / "r"
    first = owned_folder(folder, resuming=False)
    first.__enter__()
    real_flock, first_holds = fcntl.flock, [True]

    def first_lets_go_now(file, operation):  # in the second run's window between open and flock
        if first_holds:
            first_holds.clear()
            first.__exit__(None, None, None)
        return real_flock(file, operation)

    monkeypatch.setattr(vit_train.checkpoint.fcntl, "flock", first_lets_go_now)
    with owned_folder(folder, resuming=False):
        monkeypatch.undo()
        assert first_holds == [] and (folder / LOCK_FILE).is_file()
        with pytest.raises(UserError, match="in use by another vit-train process"):
            with owned_folder(folder, resuming=False):
                pass
    assert list(tmp_path.iterdir()) == []  # the second made the folder again, wrote nothing, and removed it


def test_a_filesystem_without_locks_is_named_in_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def no_locks(file, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(vit_train.checkpoint.fcntl, "flock", no_locks)
    assert train_main([*TINY_SETS, "--steps", "1", "--output-dir", str(tmp_path), "--name", "nfs"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: cannot lock {tmp_path / 'nfs'} (No locks available): its filesystem has no flock, "
                        "so nothing stops another vit-train process from writing into this run folder too; the run "
                        "goes on"]
    assert load_checkpoint(tmp_path / "nfs")["step"] == 1


def test_resuming_a_run_still_going_names_its_process_with_or_without_a_checkpoint(tmp_path, capsys):
    assert train_main([*TINY_SETS, "--steps", "1", "--output-dir", str(tmp_path), "--name", "going"]) == 0
    (tmp_path / "starting").mkdir()  # a run before its first last.pt
    for folder in (tmp_path / "going", tmp_path / "starting"):
        before = {path.name: path.read_bytes() for path in folder.iterdir() if path.name != ".lock"}
        capsys.readouterr()
        with owned_folder(folder, resuming=True):  # as the other process holds it
            assert train_main(["--resume", str(folder), "--steps", "2"]) == 2
        assert capsys.readouterr().err == (
            f"error: {folder} is still being trained by another vit-train process (pid {os.getpid()}); wait for it "
            f"to end, or stop it (Ctrl-C there, or kill -INT {os.getpid()}: it saves last.pt) and resume then\n")
        assert {path.name: path.read_bytes() for path in folder.iterdir() if path.name != ".lock"} == before


def test_a_lock_whose_holder_has_not_written_its_pid_is_refused_without_naming_one(tmp_path, capsys):
    assert train_main([*TINY_SETS, "--steps", "1", "--output-dir", str(tmp_path), "--name", "run"]) == 0
    with open(tmp_path / "run" / LOCK_FILE, "w") as lock:  # emptied and held, as by a process just starting
        fcntl.flock(lock, fcntl.LOCK_EX)
        capsys.readouterr()
        assert train_main(["--resume", str(tmp_path / "run"), "--steps", "2"]) == 2
        assert train_main([*TINY_SETS, "--steps", "1", "--output-dir", str(tmp_path), "--name", "run"]) == 2
    refused = capsys.readouterr().err.splitlines()
    assert refused == [f"error: {tmp_path / 'run'} is still being trained by another vit-train process; wait for it "
                       "to end, or stop it (Ctrl-C there: it saves last.pt) and resume then",
                       f"error: {tmp_path / 'run'} is in use by another vit-train process; wait for it to end, or "
                       "choose another --name"]


@pytest.mark.parametrize("phase", ["evaluating", "training"])
def test_out_of_memory_names_the_phase_and_the_setting_that_helps(phase, tmp_path, monkeypatch, capsys):
    real_forward = VisionTransformer.forward

    def exhausted(self, *args, **kwargs):
        if self.training == (phase == "training"):
            raise MemoryError
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(VisionTransformer, "forward", exhausted)
    assert train_main([*TINY_SETS, "--steps", "2", "--output-dir", str(tmp_path), "--name", "oom"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    if phase == "evaluating":
        assert err.startswith("error: out of memory on the CPU while evaluating, at evaluation batches of 512; give "
                              "a smaller --set eval_batch_size=N."), err
        assert "--grad-accum" not in err
    else:
        assert err.startswith("error: out of memory on the CPU while training at batch size 32 (1 micro-batches of 32 "
                              "per process and step); give --grad-accum 2 "), err


def test_vit_eval_out_of_memory_is_one_line_naming_its_batch_flag(tmp_path, monkeypatch, capsys):
    assert train_main([*TINY_SETS, "--steps", "1", "--output-dir", str(tmp_path), "--name", "run"]) == 0
    real_forward = VisionTransformer.forward

    def exhausted(self, images, *args, **kwargs):
        if len(images) > 16:  # as an allocator that fits 16 images and no more
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: not enough memory")
        return real_forward(self, images, *args, **kwargs)

    monkeypatch.setattr(VisionTransformer, "forward", exhausted)
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(tmp_path / "run"), "--batch-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err == "error: out of memory on the CPU while evaluating, at batches of 64; give a smaller --batch-size\n"
    assert eval_main(["--checkpoint", str(tmp_path / "run"), "--batch-size", "16"]) == 0  # the advice works


def test_an_image_folder_evaluates_without_its_training_split_and_says_where_resume_is_not_exact(tmp_path, capsys):
    write_image_folder(tmp_path / "imgs", per_class_train=8, per_class_val=4)
    for workers_path in (False, True):
        folder = ["--model", "testing", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
                  "--img-size", "32", "--batch-size", "8", "--quiet", "--set", "data.num_workers=0",
                  "--set", f"data.folder_in_memory={not workers_path}", "--output-dir", str(tmp_path), "--name",
                  f"r{workers_path}"]
        assert train_main([*folder, "--steps", "1"]) == 0
        capsys.readouterr()
        assert train_main(["--resume", str(tmp_path / f"r{workers_path}"), "--steps", "2"]) == 0
        notes = [line for line in capsys.readouterr().out.splitlines() if "does not continue bit for bit" in line]
        assert len(notes) == workers_path, notes
    (tmp_path / "imgs" / "train" / "cat" / "0.png").write_bytes(b"\x89PNG truncated")
    for workers_path in (False, True):
        assert eval_main(["--checkpoint", str(tmp_path / f"r{workers_path}"), "--json", str(tmp_path / "e.json")]) == 0
        assert json.loads((tmp_path / "e.json").read_text())["num_samples"] == 8


def test_the_previous_releases_import_of_create_model_still_works():
    from vit_train.models import VisionTransformer as network, create_model  # noqa: the old import path

    assert isinstance(create_model("testing", img_size=32, num_classes=3), network)
    with pytest.raises(AttributeError, match="no attribute 'create_modle'"):
        vit_train.models.create_modle  # noqa: B018


def test_the_progress_bar_on_a_terminal_shows_the_runs_eta_not_tqdms_average_rate_guess(tmp_path):
    """On a terminal the bar replaces the progress lines, so it must carry the ETA that prices each phase apart;
    tqdm's default `elapsed<remaining` is the average rate times the steps left, wrong across phases."""
    master, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a pty starts 0 columns wide
    process = subprocess.Popen(
        [sys.executable, "-m", "vit_train", *[a for a in TINY_SETS if a != "--quiet"], "--steps", "6",
         "--set", "log_every=2", "--eval-every", "0", "--save-every", "0", "--output-dir", str(tmp_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    written = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal is gone once the run has exited
            break
        if not chunk:
            break
        written += chunk
    os.close(master)
    assert process.wait(timeout=120) == 0, written.decode(errors="replace")[-2000:]
    bar = written.decode(errors="replace")
    assert "6/6" in bar and "eta=0:00:00" in bar
    assert not re.search(r"\d\d:\d\d<", bar), bar[-800:]
