"""The run state: what a run carries across an interruption. A budget run re-planned, stopped and resumed ends
bit for bit where the uninterrupted run does, with the plan it committed to; the config handed to train() is
never changed; checkpoints written before the run state existed still resume and evaluate."""
import copy
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

import vit_train.budget
import vit_train.train
from vit_train.checkpoint import load_checkpoint
from vit_train.cli import eval_main
from vit_train.resolve import resolve_config
from vit_train.optim import Plan, warmup_cosine
from vit_train.train import train

TINY = {"model_name": "testing", "data.name": "synthetic", "data.synthetic_train_size": 512,
        "data.auto_augment": "none", "data.random_erasing": 0.0, "data.mixup_alpha": 0.0, "data.cutmix_alpha": 0.0,
        "data.synthetic_test_size": 128, "batch_size": 32, "optim.lr": 3e-3, "eval_every": 0, "save_every": 0,
        "log_every": 5, "quiet": True}
# A budget run whose re-plan comes inside its warm-up (30% of the run; the re-plan is at 20%) and before the end
# of its low-resolution half.
BUDGET = {**TINY, "time_budget": "100s", "schedule.warmup_fraction": 0.3, "schedule.low_res_size": 16,
          "schedule.low_res_fraction": 0.5, "optim.ema_decay": 0.9}
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SimulatedClock:
    """A clock that advances one second each time it is read: the budget's calibration and re-plan then see the
    same 'durations' in every run, so two runs of one config plan the same steps."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def plan_of(run_dir):
    """(total, warm-up, low-resolution steps) as config.json and last.pt record them."""
    recorded = [json.loads((run_dir / "config.json").read_text())["schedule"],
                load_checkpoint(run_dir / "last.pt")["config"]["schedule"]]
    plans = {(s["steps"], s["warmup_steps"], s["low_res_steps"]) for s in recorded}
    assert len(plans) == 1, plans
    return plans.pop()


def test_a_replanned_budget_run_stopped_and_resumed_ends_as_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """A budget run re-plans as it goes; stopped after its last re-plan and resumed (a resumed run keeps its plan),
    it ends bit for bit where the uninterrupted run does."""
    real_replan = vit_train.train.replan
    replans = []

    def counted_replan(run, *args, **kwargs):
        real_replan(run, *args, **kwargs)
        replans.append((run.state.step, run.state.plan))

    monkeypatch.setattr(vit_train.train, "replan", counted_replan)
    straight = train(resolve_config({**BUDGET, "output_dir": str(tmp_path), "name": "straight"}),
                     clock=SimulatedClock())
    said = capsys.readouterr().out
    first_total = int(re.search(r"time budget 100s: (\d+) steps", said)[1])
    first_replan, last_replan = replans[0][0], replans[-1][0]
    total = replans[-1][1].total_steps
    assert len(replans) > 1 and total != first_total and straight["step"] == total
    assert first_replan < round(0.3 * first_total)  # the first re-plan came inside the warm-up
    # the warm-up kept its end, or, where a new length no longer reached it, ended at that re-plan
    length, warmup, _ = plan_of(tmp_path / "straight")
    assert length == total and warmup in {round(0.3 * first_total), *(step for step, _ in replans)}

    def replan_then_sigterm(run, *args, **kwargs):
        real_replan(run, *args, **kwargs)
        if run.state.step == last_replan:
            os.kill(os.getpid(), signal.SIGTERM)  # the step after the re-plan finishes, is saved, the run returns

    monkeypatch.setattr(vit_train.train, "replan", replan_then_sigterm)
    config = resolve_config({**BUDGET, "output_dir": str(tmp_path), "name": "stopped"})
    stopped = train(config, clock=SimulatedClock())
    monkeypatch.undo()
    assert stopped["stopped_by"] == signal.SIGTERM and stopped["step"] == last_replan
    run_dir = tmp_path / "stopped"
    assert plan_of(run_dir) == plan_of(tmp_path / "straight")
    assert config.schedule.steps is None and config.schedule.warmup_fraction == 0.3  # train() changed nothing

    resumed = train(resolve_config({"resume": str(run_dir)}))  # the real clock: a resumed run does not re-plan
    assert resumed["step"] == total and plan_of(run_dir) == plan_of(tmp_path / "straight")
    assert resumed["eval_loss"] == straight["eval_loss"]
    assert resumed["eval_ema_accuracy"] == straight["eval_ema_accuracy"]
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(run_dir)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_a_resumed_run_given_a_new_length_keeps_its_boundaries_and_follows_the_new_schedule_at_once(tmp_path,
                                                                                                  monkeypatch):
    settings = {**TINY, "schedule.steps": 40, "schedule.warmup_fraction": 0.25, "save_every": 10,
                "schedule.low_res_size": 16, "schedule.low_res_fraction": 0.5, "output_dir": str(tmp_path)}
    train(resolve_config({**settings, "name": "short"}))
    assert plan_of(tmp_path / "short") == (40, 10, 20)
    shutil.rmtree(tmp_path / "short")
    train(resolve_config({**settings, "schedule.steps": 20, "name": "short"}))  # the same first 20 steps, saved
    assert plan_of(tmp_path / "short") == (20, 5, 10)  # its own plan: a 20-step run

    longer = resolve_config({"resume": str(tmp_path / "short"), "schedule.steps": 30})
    assert (longer.schedule.warmup_steps, longer.schedule.low_res_steps) == (5, 10)  # the boundaries it committed to
    lrs = []
    real_step = vit_train.train.train_step

    def recording_step(model, optimizer, *args):
        lrs.append(optimizer.param_groups[0]["lr"])
        return real_step(model, optimizer, *args)

    monkeypatch.setattr(vit_train.train, "train_step", recording_step)
    train(longer)
    assert plan_of(tmp_path / "short") == (30, 5, 10)
    # step 20 of the 30-step cosine after a 5-step warm-up, not the 20-step run's last learning rate
    assert lrs[0] == pytest.approx(3e-3 * warmup_cosine(20, 5, 30)) and len(lrs) == 10


def resume_copy(fixture, run_dir, stop_after=None, monkeypatch=None):
    """Resume a copy of a checkpoint file in run_dir; with stop_after, SIGTERM after that many steps (the step
    finishes and is saved), then resume again: the run in two legs."""
    run_dir.mkdir()
    shutil.copy(fixture, run_dir / "last.pt")
    if stop_after is None:
        return train(resolve_config({"resume": str(run_dir)}))
    real_step, steps = vit_train.train.train_step, []

    def step_then_sigterm(*args):
        steps.append(real_step(*args))
        if len(steps) == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return steps[-1]

    monkeypatch.setattr(vit_train.train, "train_step", step_then_sigterm)
    stopped = train(resolve_config({"resume": str(run_dir)}))
    monkeypatch.undo()
    assert stopped["stopped_by"] == signal.SIGTERM and len(steps) == stop_after
    return train(resolve_config({"resume": str(run_dir)}))


def same_weights(a, b):
    return all(torch.equal(a[part][k], b[part][k]) for part in ("model", "ema") for k in a[part])


def test_a_checkpoint_written_before_the_run_state_resumes_exactly_and_evaluates(tmp_path, capsys, monkeypatch):
    """tests/fixtures/round2_step3.pt: step 3 of a 6-step run (EMA, warm-up fraction, progressive resizing),
    written by the code before this layout (scheduler, epoch, batch_in_epoch keys; -1.0 for no best), on another
    processor. What must hold everywhere is checked exactly: it loads, resumes, and a resume stopped and resumed
    again ends bit for bit where a straight resume from the same file ends, on this machine. Numbers recorded on
    the fixture's machine are checked within a tolerance only (see below)."""
    fixture = FIXTURES / "round2_step3.pt"
    old = load_checkpoint(fixture)
    assert {"scheduler", "epoch", "batch_in_epoch"} <= old.keys() and "low_res_steps" not in old["config"]["schedule"]
    straight = resume_copy(fixture, tmp_path / "straight")
    two_legs = resume_copy(fixture, tmp_path / "two_legs", stop_after=1, monkeypatch=monkeypatch)
    assert straight["step"] == two_legs["step"] == 6
    assert (straight["eval_loss"], straight["eval_ema_accuracy"]) == (two_legs["eval_loss"],
                                                                       two_legs["eval_ema_accuracy"])
    assert same_weights(load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "two_legs"))

    # The same run from its start, by today's code on this processor. Its first three steps were recorded on the
    # fixture's processor: kernels that sum in another order (AVX2 against AVX-512) differ by float32 rounding,
    # seen up to 3e-5 in a loss after three steps, so the agreement is within a tolerance a hundred times that,
    # far below what a real change (another schedule, augmentation, or a lost optimizer state) moves.
    saved = copy.deepcopy(old["config"])
    settings = {"model_name": "testing", "data.name": "synthetic", "batch_size": 16, "optim.lr": 3e-3,
                "output_dir": str(tmp_path), "name": "today", "quiet": True}
    for key in ("synthetic_train_size", "synthetic_test_size", "auto_augment", "random_erasing", "mixup_alpha",
                "cutmix_alpha"):
        settings[f"data.{key}"] = saved["data"][key]
    for key in ("warmup_fraction", "low_res_size", "low_res_fraction"):
        settings[f"schedule.{key}"] = saved["schedule"][key]
    settings.update({"schedule.steps": 6, "optim.ema_decay": 0.9, "eval_every": 3, "save_every": 3})
    today = train(resolve_config(settings))
    assert today["step"] == 6
    assert today["eval_loss"] == pytest.approx(straight["eval_loss"], abs=3e-3)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "today")
    assert all(torch.allclose(a["ema"][k], b["ema"][k], atol=3e-3) for k in a["ema"])

    capsys.readouterr()
    shutil.copy(fixture, tmp_path / "old.pt")
    assert eval_main(["--checkpoint", str(tmp_path / "old.pt"), "--device", "cpu"]) == 0
    assert "accuracy" in capsys.readouterr().out


class StepClock:
    """A machine's clock as the budget sees it, where only training steps take time: `seconds` each, until
    `slows_after` steps, then `slower` each (the machine slowing down, as a shared one does)."""

    def __init__(self, slows_after=None, seconds=1.0, slower=2.0):
        self.now, self.steps, self.slows_after, self.seconds, self.slower = 0.0, 0, slows_after, seconds, slower

    def __call__(self):
        return self.now

    def step(self):
        self.steps += 1
        slowed = self.slows_after is not None and self.steps > self.slows_after
        self.now += self.slower if slowed else self.seconds


def run_on(clock, settings, monkeypatch):
    real_step = vit_train.train.train_step

    def timed_step(*args):
        clock.step()
        return real_step(*args)

    monkeypatch.setattr(vit_train.train, "train_step", timed_step)
    final = train(resolve_config(settings), clock=clock)
    monkeypatch.setattr(vit_train.train, "train_step", real_step)
    return final


def test_a_budget_run_on_a_machine_that_slows_down_late_still_ends_within_its_budget(tmp_path, monkeypatch):
    settings = {**BUDGET, "output_dir": str(tmp_path), "time_budget": "200s"}
    steady = run_on(StepClock(), {**settings, "name": "steady"}, monkeypatch)
    assert 0.9 * 200 <= steady["seconds"] <= 200  # the budget used, not overrun
    # twice as slow after half the run: one re-plan (at a fifth) cannot see it; re-planning as the run goes does
    half = steady["step"] // 2
    slowed = run_on(StepClock(slows_after=half), {**settings, "name": "slowed"}, monkeypatch)
    assert 0.9 * 200 <= slowed["seconds"] <= 200 and slowed["step"] < steady["step"]
    monkeypatch.setattr(vit_train.budget, "REPLAN_EVERY", 10.0)  # the first re-plan only, as before
    once = run_on(StepClock(slows_after=half), {**settings, "name": "once"}, monkeypatch)
    assert once["seconds"] > 1.2 * 200


def test_a_replan_never_makes_the_learning_rate_jump():
    plan = Plan("warmup_cosine", total_steps=1000, warmup_steps=300, img_size=32)
    for step, total in [(600, 1500), (600, 700), (600, 601), (200, 1400), (200, 400), (200, 250), (0, 100),
                        (299, 300)]:
        new = plan.lengthened(total, step)
        assert new.lr_factor(step) == pytest.approx(plan.lr_factor(step), abs=1e-12), (step, total)
        after = [new.lr_factor(s) for s in range(max(step, new.warmup_steps), total + 1)]
        assert all(b <= a for a, b in zip(after, after[1:])) and after[-1] == 0.0, (step, total)
        again = new.lengthened(total + 50, total - 1)  # a second re-plan, from the first one's decay
        assert again.lr_factor(total - 1) == pytest.approx(new.lr_factor(total - 1), abs=1e-12)
    linear = Plan("warmup_linear", total_steps=100, warmup_steps=40, img_size=32).lengthened(30, 19)
    assert linear.lr_factor(19) == pytest.approx(0.5) and linear.lr_factor(30) == 0.0


def test_a_resume_with_another_batch_size_counts_epochs_on_from_where_they_were(tmp_path):
    settings = {**TINY, "batch_size": 64, "schedule.steps": 10, "output_dir": str(tmp_path), "name": "run"}
    train(resolve_config(settings))  # 512 images: 8 steps an epoch, so 1.25 epochs
    records = tmp_path / "run" / "metrics.jsonl"
    assert json.loads(records.read_text().splitlines()[-1])["epoch"] == 1.25
    train(resolve_config({"resume": str(tmp_path / "run"), "batch_size": 32, "schedule.steps": 14}))
    # 4 more steps of 32 (16 an epoch): 1.5 epochs, where counting all 14 steps in batches of 32 said 0.875
    assert json.loads(records.read_text().splitlines()[-1])["epoch"] == 1.5
    saved = load_checkpoint(tmp_path / "run")
    assert saved["epochs"] == 1.5 and saved["epoch_anchor"] == [10, 20]
    train(resolve_config({"resume": str(tmp_path / "run"), "schedule.steps": 16}))  # the anchor carries on
    assert json.loads(records.read_text().splitlines()[-1])["epoch"] == 1.625
