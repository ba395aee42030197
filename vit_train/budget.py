"""--time-budget: parse a duration, calibrate (time a few real steps, an evaluation and a save), plan the run's
length, and re-plan it as the run goes from how long its steps really took: first after a fifth of the run, then
after every twentieth, so that a machine that slows down (or speeds up) later is followed to the end.

A plan is an optim.Plan, in absolute steps and fixed when made; a re-plan changes the length only, the learning
rate going on from where it is (see Plan.lengthened), and what it fixes is what config.json, checkpoints and
--resume read back. A resumed run keeps the plan it was stopped with.
"""
import copy
import dataclasses
import io
import math

import torch

from vit_train.errors import UserError
from vit_train.evaluate import eval_logits
from vit_train.optim import Plan
from vit_train.runtime import all_ranks

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A budget run re-times its steps when this share of its planned steps is done (see Calibration.replan), then
# again after each REPLAN_EVERY share of them, from the steps since the last re-plan.
REPLAN_AT = 0.2
REPLAN_EVERY = 0.05


def budget_seconds(text) -> float:
    """'90s', '10m', '2h', '1.5h' or a bare number of seconds -> seconds."""
    text = str(text).strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"--time-budget takes a duration such as 90s, 10m or 2h, not {text!r}")
    return seconds


def time_train_steps(step_fn, batches, warmup: int, timed: int, clock) -> tuple:
    """(mean seconds of `timed` steps, the batch's gathering and augmentation included, seconds of the `warmup`
    untimed ones before them: first steps compile, allocate and warm caches). The mean, not the median: the
    run's length is a sum."""
    started = clock()
    for _ in range(warmup):
        float(step_fn(*next(batches)))
    warmed = clock()
    for _ in range(timed):
        loss = step_fn(*next(batches))
    float(loss)  # wait for the device
    return (clock() - warmed) / timed, warmed - started


def time_eval_batches(model, test_loader, device, precision, clock, batches: int = 2) -> tuple:
    """(seconds per test batch of a full evaluation pass, from the `batches` batches after the first; seconds of
    the first, which compiles and warms up: timed alone only when it is the only one)."""
    evaluated = eval_logits(model, test_loader, device, precision)
    started = clock()
    next(evaluated)[0].sum().item()
    first_seconds, count = clock() - started, 0
    started = clock()
    for logits, _ in evaluated:
        logits.sum().item()
        count += 1
        if count == batches:
            break
    evaluated.close()
    return ((clock() - started) / count if count else first_seconds), first_seconds


def budget_steps(seconds_left, step_seconds, eval_seconds, save_seconds, eval_every, save_every, done=0) -> int:
    """The most optimizer steps after the first `done` whose training, evaluations (every eval_every steps and at
    the end) and saves (every save_every steps and at the end) fit in seconds_left."""
    def cost(steps):
        evals, saves = pauses(steps, done, eval_every, save_every)
        return steps * step_seconds + evals * eval_seconds + saves * save_seconds
    return most_steps(seconds_left, cost, upper=int(seconds_left / step_seconds))


def pauses(steps, done, eval_every, save_every) -> tuple:
    """(evaluations, saves) of steps done..done+steps-1, the final ones included."""
    evals = 1 + ((done + steps) // eval_every - done // eval_every if eval_every else 0)
    saves = 1 + ((done + steps) // save_every - done // save_every if save_every else 0)
    return evals, saves


def most_steps(seconds_left, cost, upper) -> int:
    """The largest n in 0..upper with cost(n) <= seconds_left (0 when none), cost growing with n: by bisection."""
    fits, too_many = 0, max(upper, 0) + 1
    while too_many - fits > 1:
        middle = (fits + too_many) // 2
        fits, too_many = (middle, too_many) if cost(middle) <= seconds_left else (fits, middle)
    return fits


def seconds_to_go(plan, step, seen, calibrated) -> float:
    """Seconds of training that steps step..plan.total_steps-1 take: each phase of the plan (Plan.phase) at the
    speed it last ran (`seen`: {phase: seconds per step}, the phase last run last). A phase not reached yet, such
    as the steps on every patch at the end (several times dearer than the patch-dropout steps before them), runs at
    its `calibrated` speed (a budget run's, else empty) scaled as the phase last run ran against its own; without a
    calibration, at the speed of the phase last run."""
    last = next(reversed(seen))
    scale = unseen_scale(seen[last] / calibrated[last]) if calibrated.get(last) else None

    def speed(phase):
        if phase in seen:
            return seen[phase]
        return scale * calibrated[phase] if scale is not None and calibrated.get(phase) else seen[last]
    return sum(n * speed(phase) for phase, n in plan.phase_steps(step, plan.total_steps).items())


def unseen_scale(slowdown) -> float:
    """How much slower than calibrated to expect what a run has not timed since its calibration (the steps on
    every patch at the end, evaluations, saves), when the steps it ran took `slowdown` times theirs: as much slower,
    but never faster. Steps that ran faster than calibrated say the calibration caught the machine busy; each
    phase is timed apart, so the busy moment may have passed before the next phase's timing began (a run whose
    patch-dropout steps ran at 0.7x their calibration, and its ending at 1.0x, ended 25 s late)."""
    return max(slowdown, 1.0)


def reserve(share, seconds) -> float:
    """What a plan keeps back for the unforeseen: a share of the seconds it plans, at least 3."""
    return max(3.0, share * seconds)


@dataclasses.dataclass
class Calibration:
    """What a --time-budget run measured: seconds per training step in each phase of the plan (Plan.phase: an
    image side, and patch dropout or every patch), per evaluation (raw and EMA, and a new best.pt) and per
    checkpoint save; and what it keeps in reserve for the unforeseen."""
    budget: float
    step_seconds: dict
    eval_seconds: float
    save_seconds: float

    def calibrated_seconds(self, plan, first, last) -> float:
        """Seconds that steps first..last-1 of `plan` take at the calibrated speeds."""
        return sum(n * self.step_seconds.get(phase, 0.0) for phase, n in plan.phase_steps(first, last).items())

    def replan(self, plan, step, seconds_left, seconds_trained, first_step, eval_every, save_every) -> tuple:
        """(the plan with its new length, how many times slower than calibrated its steps ran), once steps
        first_step..step-1 took seconds_trained of training and seconds_left remain: the steps still to come in
        the phases those steps ran in are expected to run as much slower (or faster) than calibrated as those did;
        the other phases, evaluations and saves as much slower but never faster (unseen_scale); and the length is
        re-fitted to what remains, less a reserve of 6% of it.

        The calibration times a few seconds of steps, a shared machine's speed wanders by more than that shows,
        and it drifts over a run (docs/training.md has what was measured): the run re-plans from its recent
        steps. Once the steps on every patch began, the length stays (Plan.lengthened)."""
        slowdown = seconds_trained / self.calibrated_seconds(plan, first_step, step)
        if step >= plan.all_patches_from:
            return plan, slowdown
        ran = {phase: slowdown * self.step_seconds[phase] for phase in plan.phase_steps(first_step, step)}

        def cost(more):  # the steps as the lengthened plan has them (a longer run adds full-resolution steps)
            evals, saves = pauses(more, step, eval_every, save_every)
            return (seconds_to_go(plan.lengthened(step + more, step), step, ran, self.step_seconds)
                    + unseen_scale(slowdown) * (evals * self.eval_seconds + saves * self.save_seconds))
        seconds = seconds_left - reserve(0.06, seconds_left)
        fastest = slowdown * min(self.step_seconds.values())
        more = most_steps(seconds, cost, upper=int(seconds / fastest) if fastest > 0 else 0)
        return plan.lengthened(step + max(more, 1), step), slowdown


def calibrate(config, state, step_fn, batches, eval_model, test_loader, precision, started, clock) -> tuple:
    """(the run's Plan, the Calibration, what was measured in words) for a --time-budget run: the number of steps
    that makes it end within its budget, counted from `started`.

    A few real training steps and test batches are timed, then undone (the run state restored: weights,
    optimizer, loss scaler, EMA and random generators), so the run starts exactly as the run `--steps N` would:
    the calibration costs a few percent of the budget and changes nothing else. The models timed are the run's
    own (compiled with --compile, each shape compiled by an untimed first step or batch, whose time is stated).
    Every process plans alike: rank 0's figures are used by all.
    """
    snapshot = copy.deepcopy(state.state_dict())
    budget, world_size = budget_seconds(config.time_budget), state.world_size

    def refuse_beyond_budget(what, seconds_more, compiling):
        """The calibration itself must fit in the budget: refuse as soon as it is clear that it cannot (on rank 0's
        figures, so that every process decides alike). compiling: the seconds --compile took so far."""
        spent, seconds_more, compiling = all_ranks((clock() - started, seconds_more, compiling), world_size)[0]
        seconds = spent + seconds_more
        if seconds > budget:
            compiled = (f" ({compiling:.0f} s of it compiling the model: --compile pays off in longer runs)"
                        if config.compile else "")
            raise UserError(f"the time budget {config.time_budget} is too short for this run: {what} takes "
                            f"{seconds:.0f} s before any training{compiled}; give a longer --time-budget")

    first, warmup_seconds = time_train_steps(step_fn, batches, warmup=1, timed=1, clock=clock)
    first = all_ranks(first, world_size)[0]  # every rank must run as many (all-reducing) steps as the others
    timed = min(30, max(3, int(0.02 * budget / first)))  # about 2% of the budget, at most 30 steps
    # The phases the run trains in, in the proportion its plan gives them (any length will do for the shares).
    shares = Plan.from_config(config, steps_per_epoch=1, total_steps=1000).phases()
    refuse_beyond_budget(f"start-up and timing {(timed + 1) * len(shares)} steps of {first:.1f} s",
                         (timed + 1) * len(shares) * first, warmup_seconds)
    seconds_at = {}
    for phase in shares:
        seconds_at[phase], warmed = time_train_steps(lambda x, y: step_fn(x, y, *phase), batches, warmup=1,
                                                     timed=timed, clock=clock)
        warmup_seconds += warmed
    batch_seconds, first_batch_seconds = time_eval_batches(eval_model, test_loader, state.device, precision, clock)
    eval_seconds, warmup_seconds = batch_seconds * len(test_loader), warmup_seconds + first_batch_seconds
    refuse_beyond_budget(f"start-up, timing steps and one evaluation ({eval_seconds:.0f} s)", eval_seconds,
                         warmup_seconds)
    save_started = clock()  # the optimizer now holds its moments, as in the run's checkpoints
    torch.save(state.state_dict(), io.BytesIO())
    save_seconds = 2 * (clock() - save_started)  # serialising, and as long again for the disk
    eval_seconds = (2 if state.ema is not None else 1) * eval_seconds + save_seconds  # raw and EMA; a new best.pt
    calibration = Calibration(budget, *all_ranks((seconds_at, eval_seconds, save_seconds), world_size)[0])
    state.load_state_dict(snapshot)

    # the mean step over the run: the phases' steps in their proportion
    step_seconds = sum(share * calibration.step_seconds[phase] for phase, share in shares.items())
    # Start-up of the loop, the final report, and the machine's changing speed until the re-plan.
    seconds_left = budget - (clock() - started) - reserve(0.15, budget)
    steps = budget_steps(seconds_left, step_seconds, calibration.eval_seconds, calibration.save_seconds,
                         config.eval_every, config.save_every)
    steps = all_ranks(steps, world_size)[0]  # each process's clock started a little apart
    if steps < 1:
        raise UserError(f"the time budget {config.time_budget} leaves no time to train after start-up "
                        f"({clock() - started:.0f} s) and one evaluation ({calibration.eval_seconds:.0f} s); "
                        "give a longer --time-budget")
    measured = f"measured: {step_seconds:.3f} s a step, {calibration.eval_seconds:.1f} s an evaluation"
    if config.compile:
        measured += f"; compiling took {warmup_seconds:.0f} s of the budget"
    return Plan.from_config(config, state.steps_per_epoch, total_steps=steps), calibration, measured
