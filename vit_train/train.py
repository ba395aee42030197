"""Train a Vision Transformer: `train(config)` runs one resolved config (see vit_train/config.py) to its end.

    vit-train --model ViT-B_16 --dataset cifar10                           one process: the CPU or one GPU
    torchrun --nproc_per_node 8 -m vit_train --model ViT-B_16 ...          DistributedDataParallel, same flags

The file reads top to bottom: learning-rate schedules, the optimizer, one training step, what a run reports, and `train()` itself: set-up, then the loop with its edges (evaluation,
checkpoints, signals, a diverging loss).

Exact resume: a step's outcome depends only on the model, optimizer, scheduler and loss-scaler states, the
random generators (dropout) and the step number, because the data order is a pure function of (seed, epoch,
batch). A checkpoint holds all of them, so on the CPU a resumed run ends exactly where an uninterrupted one does.
"""
import contextlib
import copy
import dataclasses
import datetime
import functools
import io
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vit_train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, write_atomically
from vit_train.data import build_loaders, resize_images
from vit_train.errors import UserError
from vit_train.evaluate import attention_image, eval_logits, evaluate_model
from vit_train.models import VisionTransformer
from vit_train.pretrained import load_pretrained
from vit_train.runtime import (all_ranks, autocast, distributed, local_leader_first, resolve_precision, seed_everything,
                               slow_precision_warning)


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedules: the multiplier of the peak learning rate for optimizer step `step` (0-based).

def warmup_cosine(step, warmup_steps, total_steps):
    """Linear warm-up to 1 over warmup_steps, then half a cosine down to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * decay_progress(step, warmup_steps, total_steps)))


def warmup_linear(step, warmup_steps, total_steps):
    """Linear warm-up to 1 over warmup_steps, then a straight line down to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0 - decay_progress(step, warmup_steps, total_steps)


def decay_progress(step, warmup_steps, total_steps):
    """0 when the warm-up ends, 1 at total_steps."""
    return min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))


SCHEDULES = {"warmup_cosine": warmup_cosine, "warmup_linear": warmup_linear}


# ---------------------------------------------------------------------------------------------------------------
# The optimizer.

OPTIMIZERS = ("sgd", "adamw")
NO_WEIGHT_DECAY = ("pos_embed", "cls_token")


def param_groups(model, weight_decay):
    """Weight matrices and kernels decay; biases, norm scales, position embeddings and the CLS token do not:
    decay would pull those offsets and embeddings towards zero for no regularising benefit."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:  # fixed position embeddings
            continue
        (no_decay if param.ndim <= 1 or name in NO_WEIGHT_DECAY else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, optim):
    """SGD or AdamW with fused updates: one kernel for the whole update rather than several passes over every
    tensor, on GPUs and CPUs alike (on the CPU it makes AdamW's step for ViT-B about 5x faster than foreach)."""
    groups = param_groups(model, optim.weight_decay)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=True)


class WeightEMA:
    """An exponential moving average of the weights (Polyak averaging, as DeiT trains ViTs): after each optimizer
    step, ema <- decay * ema + (1 - decay) * weights, starting from the weights the run starts with. The average
    lives in a copy of the model, always in eval mode, so it is evaluated, saved and exported like the model."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        ema, weights = self.model.state_dict().values(), model.state_dict().values()  # same order, same shapes
        torch._foreach_lerp_(list(ema), list(weights), 1.0 - self.decay)


# ---------------------------------------------------------------------------------------------------------------
# One training step.

def train_step(model, optimizer, scheduler, scaler, images, targets, config, precision):
    """One optimizer step on this process's batch; returns the batch's mean loss as a tensor (reading its value
    would make the CPU wait for the GPU, so the loop reads a window of them at a time).

    The batch is split into config.grad_accum micro-batches, each loss divided by their number, so the summed
    gradients are the whole batch's: accumulation bounds memory without changing the step. Under DDP the
    gradients are averaged across processes once, during the last micro-batch's backward pass.
    """
    loss_sum = 0.0
    micro_batches = zip(images.chunk(config.grad_accum), targets.chunk(config.grad_accum))
    for i, (x, y) in enumerate(micro_batches):
        defer_sync = isinstance(model, DistributedDataParallel) and i < config.grad_accum - 1
        with model.no_sync() if defer_sync else contextlib.nullcontext():
            with autocast(x.device, precision):
                loss = F.cross_entropy(model(x), y, label_smoothing=config.optim.label_smoothing) / config.grad_accum
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if config.optim.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16 loss-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    scaler.step(optimizer)  # with fp16, skipped when the gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:  # None while a --time-budget run times its steps at the peak learning rate
        scheduler.step()
    return loss_sum


def image_size_at(step, total_steps, config) -> int:
    """Progressive resizing: the first schedule.low_res_fraction of the steps see images at low_res_size, the
    rest at img_size. Low-resolution steps cost a fraction as much (a 16-px image has a quarter of the patches
    of a 32-px one), so more epochs fit a time budget; the last steps adapt the network to the full resolution
    it is evaluated at (as Touvron et al. 2019 train low and test high)."""
    low = config.schedule.low_res_size
    return low if low and step < round(config.schedule.low_res_fraction * total_steps) else config.img_size


def train_batches(loader, step):
    """This process's batches from optimizer step `step` on, epoch after epoch. The order depends only on
    (seed, epoch, batch), so a resumed run starts mid-epoch exactly where the interrupted one stopped."""
    epoch, start = divmod(step, len(loader))
    while True:
        yield from loader.batches(epoch, start=start)
        epoch, start = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------------
# How long a run takes: timed steps, the planned length of a --time-budget run, durations for people.

def time_train_steps(step_fn, batches, warmup: int, timed: int) -> float:
    """Mean seconds of `timed` steps, the batch's gathering and augmentation included, after `warmup` untimed
    ones (first steps allocate and warm caches). The mean, not the median: the run's length is a sum."""
    for _ in range(warmup):
        float(step_fn(*next(batches)))
    started = time.perf_counter()
    for _ in range(timed):
        loss = step_fn(*next(batches))
    float(loss)  # wait for the device
    return (time.perf_counter() - started) / timed


def time_eval_batches(model, test_loader, device, precision, batches: int = 2) -> float:
    """Seconds per test batch of a full evaluation pass, from its first `batches` batches."""
    evaluated = eval_logits(model, test_loader, device, precision)
    started = time.perf_counter()
    next(evaluated)[0].sum().item()  # the first batch, warming up; timed only when it is the only one
    first_seconds, count = time.perf_counter() - started, 0
    started = time.perf_counter()
    for logits, _ in evaluated:
        logits.sum().item()
        count += 1
        if count == batches:
            break
    evaluated.close()
    return (time.perf_counter() - started) / count if count else first_seconds


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Steps after which a run without a time budget states how long it will take.
ESTIMATE_AFTER_STEPS = 5


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


# A budget run re-times its steps once, when this share of its planned steps is done (see BudgetPlan.replan).
REPLAN_AT = 0.2


@dataclasses.dataclass
class BudgetPlan:
    """What a --time-budget run measured: seconds per training step at each image side, per evaluation (raw and
    EMA, and a new best.pt) and per checkpoint save; and what it keeps in reserve for the unforeseen."""
    budget: float
    step_seconds: dict
    eval_seconds: float
    save_seconds: float

    def reserve(self, share) -> float:
        return max(3.0, share * self.budget)

    def calibrated_seconds(self, config, first, last, total_steps) -> float:
        """Seconds that steps first..last-1 of a total_steps run take at the calibrated speeds."""
        return sum(self.step_seconds[image_size_at(step, total_steps, config)] for step in range(first, last))

    def replan(self, config, step, total_steps, seconds_left, seconds_trained, first_step) -> tuple:
        """(the run's new length, how many times slower than calibrated its steps ran), once steps
        first_step..step-1 took seconds_trained of training and seconds_left remain: the steps still to come are
        expected to run as much slower (or faster) than calibrated as those did, and the schedule is re-fitted to
        what remains, less a 6% reserve.

        The calibration times a few seconds of steps, and a shared machine's speed wanders by more than that
        shows (on the 2-core CPU the recipes were measured on, 100-step windows ran between 0.8x and 1.2x their
        mean, and the calibration missed the run's mean by up to 25%); a fifth of the run measures it well."""
        slowdown = seconds_trained / self.calibrated_seconds(config, first_step, step, total_steps)
        to_come = max(total_steps - step, 1)
        step_seconds = slowdown * self.calibrated_seconds(config, step, step + to_come, total_steps) / to_come
        more = budget_steps(seconds_left - self.reserve(0.06), step_seconds, self.eval_seconds, self.save_seconds,
                            config.eval_every, config.save_every, done=step)
        return step + max(more, 1), slowdown


def plan_budget_run(config, started, step_on, model, optimizer, scaler, ema, loaders, device, precision,
                    world_size) -> tuple:
    """(steps, what was measured, BudgetPlan) for a --time-budget run: the number of steps that makes it end
    within its budget, counted from `started`.

    A few real training steps and test batches are timed, then undone (model, optimizer, loss scaler, EMA and
    random generators restored), so the run starts exactly as the run `--steps N` would: the calibration costs a
    few percent of the budget and changes nothing else. When a fifth of the steps are done, the run re-times them
    and re-plans its length once (BudgetPlan.replan). Every process plans alike: rank 0's figures are used by all.
    """
    snapshot = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scaler": scaler.state_dict(), "rng": rng_state(device),
                              "ema": ema.model.state_dict() if ema is not None else None})
    budget = budget_seconds(config.time_budget)
    batches = train_batches(loaders.train, 0)
    first = time_train_steps(lambda x, y: step_on(x, y, None), batches, warmup=1, timed=1)
    first = all_ranks(first, world_size)[0]  # every rank must run as many (all-reducing) steps as the others
    timed = min(30, max(3, int(0.02 * budget / first)))  # about 2% of the budget, at most 30 steps
    low_share = config.schedule.low_res_fraction if config.schedule.low_res_size else 0.0
    shares = {size: share for size, share in ((config.schedule.low_res_size, low_share),
                                               (config.img_size, 1.0 - low_share)) if share > 0}
    seconds_at = {}
    for size in shares:
        seconds_at[size] = time_train_steps(lambda x, y: step_on(resize_images(x, size), y, None), batches,
                                            warmup=1, timed=timed)
    eval_seconds = time_eval_batches(model, loaders.test, device, precision) * len(loaders.test)
    save_started = time.perf_counter()  # the optimizer now holds its moments, as in the run's checkpoints
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, io.BytesIO())
    save_seconds = 2 * (time.perf_counter() - save_started)  # serialising, and as long again for the disk
    eval_seconds = (2 if ema is not None else 1) * eval_seconds + save_seconds  # raw and EMA; a new best.pt
    plan = BudgetPlan(budget, *all_ranks((seconds_at, eval_seconds, save_seconds), world_size)[0])
    # the mean step over the run: low- and full-resolution steps in their proportion
    step_seconds = sum(share * plan.step_seconds[size] for size, share in shares.items())

    model.load_state_dict(snapshot["model"])
    optimizer.load_state_dict(snapshot["optimizer"])
    scaler.load_state_dict(snapshot["scaler"])
    if ema is not None:
        ema.model.load_state_dict(snapshot["ema"])
    set_rng_state(snapshot["rng"], device)
    # Start-up of the loop, the final report, and the machine's changing speed until the re-plan (BudgetPlan.replan).
    seconds_left = budget - (time.perf_counter() - started) - plan.reserve(0.15)
    steps = budget_steps(seconds_left, step_seconds, plan.eval_seconds, plan.save_seconds, config.eval_every,
                         config.save_every)
    steps = all_ranks(steps, world_size)[0]  # each process's clock started a little apart
    if steps < 1:
        raise UserError(f"the time budget {config.time_budget} leaves no time to train after start-up "
                        f"({time.perf_counter() - started:.0f} s) and one evaluation ({plan.eval_seconds:.0f} s); "
                        "give a longer --time-budget")
    return steps, f"measured: {step_seconds:.3f} s a step, {plan.eval_seconds:.1f} s an evaluation", plan


def budget_steps(seconds_left, step_seconds, eval_seconds, save_seconds, eval_every, save_every, done=0) -> int:
    """The most optimizer steps after the first `done` whose training, evaluations (every eval_every steps and at
    the end) and saves (every save_every steps and at the end) fit in seconds_left."""
    def cost(steps):
        evals = 1 + ((done + steps) // eval_every - done // eval_every if eval_every else 0)
        saves = 1 + ((done + steps) // save_every - done // save_every if save_every else 0)
        return steps * step_seconds + evals * eval_seconds + saves * save_seconds

    steps = max(int(seconds_left / step_seconds), 0)
    while steps > 0 and cost(steps) > seconds_left:
        steps -= max(1, int((cost(steps) - seconds_left) / (step_seconds * 2)))
    return max(steps, 0)


def format_duration(seconds) -> str:
    """3725 -> '1:02:05', 95000 -> '1 day 2:23:20': days never wrap into hours."""
    days, rest = divmod(int(round(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days} day{'s' if days > 1 else ''} {clock}" if days else clock


def end_time(seconds_from_now) -> str:
    at = datetime.datetime.now() + datetime.timedelta(seconds=seconds_from_now)
    return at.strftime("%H:%M" if seconds_from_now < 20 * 3600 else "%a %d %b %H:%M")


# A run longer than this on a CPU gets a pointer to a recipe sized for CPUs.
LONG_CPU_RUN_SECONDS = 2 * 3600


def duration_line(seconds, device, steps, steps_per_epoch) -> str:
    line = (f"expected duration: {format_duration(seconds)} for {steps} steps ({steps / steps_per_epoch:.1f} epochs),"
            f" ending about {end_time(seconds)}")
    if device.type == "cpu" and seconds > LONG_CPU_RUN_SECONDS:
        line += ("; this is a GPU-sized run. On a CPU, `vit-train --config cifar10_cpu --time-budget 10m` trains "
                 "the best ViT the machine can in 10 minutes")
    return line


# ---------------------------------------------------------------------------------------------------------------
# What a run reports.

class RunLog:
    """Rank 0's reports: a progress bar (plain lines when stderr is not a terminal, or with --quiet), TensorBoard
    scalars, and metrics.jsonl, one JSON object per evaluation, in the run directory."""

    def __init__(self, run_dir, config, start_step, total_steps):
        from torch.utils.tensorboard import SummaryWriter  # slow to import, and only rank 0 needs it

        # A resumed run repeats the steps after its checkpoint: drop what the interrupted run logged for them.
        self.writer = SummaryWriter(run_dir, purge_step=start_step + 1 if start_step else None)
        self.metrics_path = run_dir / "metrics.jsonl"
        if self.metrics_path.exists():
            records = [json.loads(line) for line in self.metrics_path.read_text().splitlines()]
            kept = "".join(json.dumps(r) + "\n" for r in records if r["step"] <= start_step)
            write_atomically(self.metrics_path, lambda f: f.write(kept.encode()))
        self.start_step, self.total_steps, self.started = start_step, total_steps, time.perf_counter()
        use_bar = not config.quiet and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) if use_bar else None

    def print(self, text):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def replanned(self, total_steps, text):
        self.total_steps = total_steps
        if self.bar is not None:
            self.bar.total = total_steps
        self.print(text)

    def step(self):
        if self.bar is not None:
            self.bar.update()

    def train(self, step, loss, lr, images_per_sec, epoch):
        for tag, value in (("loss", loss), ("lr", lr), ("images_per_sec", images_per_sec)):
            self.writer.add_scalar(f"train/{tag}", value, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_sec:.0f}", refresh=False)
            return
        seconds_per_step = (time.perf_counter() - self.started) / (step - self.start_step)
        eta = format_duration(seconds_per_step * (self.total_steps - step))
        self.print(f"step {step}/{self.total_steps}  epoch {epoch:.2f}  loss {loss:.4f}  lr {lr:.2e}  "
                   f"{images_per_sec:.0f} img/s  eta {eta}")

    def eval(self, record):
        for key in ("eval_loss", "eval_accuracy", "eval_ema_loss", "eval_ema_accuracy"):
            if key in record:
                self.writer.add_scalar(key.replace("eval_", "eval/", 1), record[key], record["step"])
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        ema = (f"  EMA: loss {record['eval_ema_loss']:.4f}  accuracy {record['eval_ema_accuracy']:.4f}"
               if "eval_ema_accuracy" in record else "")
        self.print(f"eval at step {record['step']}: loss {record['eval_loss']:.4f}  "
                   f"accuracy {record['eval_accuracy']:.4f}{ema}")

    def hparams(self, config, final):
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config).items()}
        metrics = {f"hparam/{k}": final[k] for k in ("eval_accuracy", "eval_loss", "best_accuracy")
                   if final[k] is not None}
        self.writer.add_hparams(hparams, metrics, run_name=".", global_step=final["step"])

    def close(self):
        self.writer.close()
        if self.bar is not None:
            self.bar.close()


def flatten(config, prefix=""):
    """{"optim.lr": 0.001, ...} from a nested config."""
    flat = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


class StopSignals:
    """While its `with` block runs, SIGINT (Ctrl-C) and SIGTERM ask the run to stop cleanly: they are appended to
    `received` instead of killing the process, so that the loop finishes its step and saves. The first of each kind
    prints at once, on stderr, what will happen: `plan()`, which train() keeps naming the step and the file.

    A second signal of the same kind, REPEAT_AFTER_S or more after the first, is the user insisting: it raises
    KeyboardInterrupt, which stops the run at once without saving (a checkpoint being written stays as it was:
    write_atomically removes its temporary file). Sooner repeats change nothing, because under torchrun one Ctrl-C
    reaches each process twice within milliseconds: from the terminal, and again from torchrun, which passes it
    on. (SIGKILL or Ctrl-\\ still end a run at once.)"""

    REPEAT_AFTER_S = 1.0

    def __init__(self, announce: bool):
        self.announce = announce  # only rank 0 speaks
        self.received = []        # signal numbers, in the order they came
        self.first_at = {}        # signal number -> time.monotonic() of its first arrival
        self.plan = lambda: "finishing the set-up and one training step, then saving last.pt"

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for s, old in self.previous.items():
            signal.signal(s, old)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if signum not in self.first_at:
            self.first_at[signum] = time.monotonic()
            self.received.append(signum)
            again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {name} again"
            self.say(f"{name}: {self.plan()}; {again} to stop at once without saving")
        elif time.monotonic() - self.first_at[signum] >= self.REPEAT_AFTER_S:
            self.say(f"{name} again: stopping at once, without saving")
            raise KeyboardInterrupt

    def say(self, text):
        # os.write, not print: a handler that prints while the interrupted code is inside a write to the same
        # buffered stream (the progress bar's) fails with "reentrant call".
        if self.announce:
            bar_line_end = "\n" if os.isatty(2) else ""  # the progress bar's line, and the terminal's ^C, end first
            os.write(2, f"{bar_line_end}{text}\n".encode())


def agreed_signal(received, world_size, device):
    """The signal number any process received, or 0. Processes must stop at the same step: one that went on
    alone would wait forever for the others at its next gradient all-reduce."""
    signum = received[0] if received else 0
    if world_size > 1:
        flag = torch.tensor(signum, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
    return signum


def window_losses(window, world_size):
    """The per-step losses of a log window as floats, averaged across processes (one GPU sync per window)."""
    losses = torch.stack(window).float()
    if world_size > 1:
        dist.all_reduce(losses, op=dist.ReduceOp.AVG)
    return losses.tolist()


def diverged(step, run_dir, saved_step):
    kept = f"{run_dir}/last.pt still holds step {saved_step}" if saved_step else "no checkpoint was written"
    return UserError(f"training diverged: the loss or the weights became non-finite at step {step}; {kept}. "
                     f"Lower --lr or set optim.grad_clip, then start again")


# ---------------------------------------------------------------------------------------------------------------
# The run.

def train(config):
    """Run a resolved config (vit_train.config.resolve_config) to its end and return the final metrics:
    {step, train_loss, eval_loss, eval_accuracy, eval_ema_accuracy, best_accuracy, images_per_sec, run_dir,
    stopped_by, seconds}, where stopped_by is the number of the signal that interrupted the run, or 0 when it ran to
    the end, eval_ema_accuracy is None without optim.ema_decay, and seconds is the wall time since the call."""
    started = time.perf_counter()
    with distributed(config.device) as (rank, world_size, device), StopSignals(announce=rank == 0) as stops, \
            contextlib.ExitStack() as cleanup:
        # Each process resolved the config on its own; the run name (a timestamp by default) is rank 0's.
        config.name = all_ranks(config.name, world_size)[0]
        run_dir = Path(config.output_dir) / config.name
        is_main = rank == 0
        precision = resolve_precision(config.precision, device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
        seed_everything(config.seed + rank)  # distinct dropout per process; DDP copies rank 0's initial weights

        with local_leader_first(world_size):  # one dataset download per machine
            loaders = build_loaders(config.data, img_size=config.img_size,
                                    batch_size=config.batch_size // world_size, eval_batch_size=config.eval_batch_size,
                                    device=device, seed=config.seed, rank=rank, world_size=world_size)
        steps_per_epoch = len(loaders.train)
        config.num_classes = loaders.num_classes

        model = VisionTransformer(config.model, config.img_size, loaders.num_classes).to(device)
        if config.pretrained and not config.resume:
            notes = load_pretrained(model, config.pretrained)
            if is_main:
                print(f"loaded {config.pretrained}" + "".join(f"; {note}" for note in notes))
        optimizer = build_optimizer(model, config.optim)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        eval_model = torch.compile(model) if config.compile else model
        train_model = eval_model
        if world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            train_model = DistributedDataParallel(eval_model, device_ids=device_ids)  # copies rank 0's weights
        ema = WeightEMA(model, config.optim.ema_decay) if config.optim.ema_decay > 0 else None  # after DDP's copy

        def step_on(images, targets, scheduler):
            loss = train_step(train_model, optimizer, scheduler, scaler, images, targets, config, precision)
            if ema is not None:
                ema.update(model)
            return loss

        calibration, plan = "", None
        if config.time_budget and config.schedule.steps is None:  # a resumed budget run keeps its planned steps
            config.schedule.steps, calibration, plan = plan_budget_run(
                config, started, step_on, model, optimizer, scaler, ema, loaders, device, precision, world_size)
        if config.schedule.steps is None:
            config.schedule.steps = config.schedule.epochs * steps_per_epoch
        total_steps = config.schedule.steps
        if config.schedule.warmup_fraction is not None:
            config.schedule.warmup_steps = round(config.schedule.warmup_fraction * total_steps)

        def lr_factor(total):
            return functools.partial(SCHEDULES[config.schedule.name], warmup_steps=config.schedule.warmup_steps,
                                     total_steps=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(total_steps))
        step, saved_step, best_accuracy, metrics = 0, 0, -1.0, {}
        if config.resume:
            checkpoint = load_checkpoint(config.resume)
            model.load_state_dict(checkpoint["model"])
            if ema is not None:  # a run that turns the EMA on when resumed starts it from the resumed weights
                ema.model.load_state_dict(checkpoint.get("ema") or checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            if checkpoint["scaler"]:
                scaler.load_state_dict(checkpoint["scaler"])
            rngs = checkpoint["rng"]
            set_rng_state(rngs[rank % len(rngs)], device)
            step = saved_step = checkpoint["step"]
            best_accuracy, metrics = checkpoint["best_accuracy"], checkpoint["metrics"]

        def save(filename):
            """Write a checkpoint of the state after `step` (every process takes part: each gives its RNG state)."""
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch,
                "rng": all_ranks(rng_state(device), world_size), "config": config.to_dict(),
                "class_names": loaders.class_names, "metrics": metrics, "best_accuracy": best_accuracy,
                "ema": ema.model.state_dict() if ema is not None else None,
            }
            if is_main:
                save_checkpoint(state, run_dir / filename)

        def write_config():
            write_atomically(run_dir / "config.json", lambda f: f.write((config.to_json(indent=2) + "\n").encode()))

        stops.plan = lambda: f"finishing step {step + 1}, then saving {run_dir / 'last.pt'}"
        log = None
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config()
            log = RunLog(run_dir, config, step, total_steps)
            cleanup.callback(log.close)  # also when the run fails: flush TensorBoard, end the progress bar
            attention_samples = next(loaders.test.batches(0))[0][:4]  # TensorBoard shows their attention maps
            grid = model.grid_size  # patches per side (the hybrid's ResNet stem downsamples first)
            log.print(f"{config.model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                      f"{grid}x{grid} patches of {config.img_size}px images) on {config.data.name}: "
                      f"{steps_per_epoch} steps per epoch of batch {config.batch_size} (processes: {world_size}, "
                      f"micro-batches: {config.grad_accum}); {device}, {precision}; run dir {run_dir}")
            if warning := slow_precision_warning(precision, device):
                log.print(f"warning: {warning}")
            if config.schedule.warmup_steps >= total_steps > 0:
                log.print(f"note: the {config.schedule.warmup_steps}-step warm-up is not shorter than the "
                          f"{total_steps}-step run, so the learning rate never reaches its peak; "
                          f"give a smaller --warmup-steps")

            if calibration:
                seconds = time.perf_counter() - started
                log.print(f"time budget {config.time_budget}: {total_steps} steps "
                          f"({total_steps / steps_per_epoch:.1f} epochs) planned to end about "
                          f"{end_time(budget_seconds(config.time_budget) - seconds)} ({calibration})")

        train_loss = images_per_sec = None
        signum = 0
        window, window_start = [], time.perf_counter()
        batches = train_batches(loaders.train, step)
        first_step, loop_started = step, time.perf_counter()
        paused = 0.0  # seconds of evaluations and saves since loop_started
        replan_at = max(round(REPLAN_AT * total_steps), first_step + 1) if plan else None
        while step < total_steps and not signum:
            images, targets = next(batches)
            images = resize_images(images, image_size_at(step, total_steps, config))
            lr = optimizer.param_groups[0]["lr"]  # this step's, set by the scheduler after the previous one
            window.append(step_on(images, targets, scheduler))
            step += 1
            if log:
                log.step()
                if step == first_step + ESTIMATE_AFTER_STEPS and not calibration and step < total_steps:
                    float(window[-1])  # wait for the device: the steps so far are done
                    per_step = (time.perf_counter() - loop_started) / ESTIMATE_AFTER_STEPS
                    log.print(duration_line(per_step * (total_steps - step), device, total_steps, steps_per_epoch))
            if step == replan_at:
                float(window[-1])  # wait for the device: the steps so far are done
                now = time.perf_counter()
                replanned, slowdown = all_ranks(plan.replan(
                    config, step, total_steps, seconds_left=plan.budget - (now - started),
                    seconds_trained=now - loop_started - paused, first_step=first_step), world_size)[0]
                text = (f"re-planned at step {step}: steps took {slowdown:.2f}x the calibrated time, so {replanned} "
                        f"steps rather than {total_steps} ({replanned / steps_per_epoch:.1f} epochs)")
                total_steps = config.schedule.steps = replanned  # what checkpoints, config.json, --resume see
                scheduler.lr_lambdas = [lr_factor(total_steps)] * len(scheduler.lr_lambdas)
                if log:
                    write_config()
                    log.replanned(total_steps, text)
            signum = agreed_signal(stops.received, world_size, device)
            at_eval = step == total_steps or (config.eval_every and step % config.eval_every == 0)
            at_save = step == total_steps or signum or (config.save_every and step % config.save_every == 0)
            if not (at_eval or at_save or step % config.log_every == 0):
                continue

            losses = window_losses(window, world_size)
            bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
            if bad is not None:
                raise diverged(step - len(losses) + 1 + bad, run_dir, saved_step)
            train_loss = sum(losses) / len(losses)
            images_per_sec = len(losses) * config.batch_size / (time.perf_counter() - window_start)
            if log:
                log.train(step, train_loss, lr, images_per_sec, epoch=step / steps_per_epoch)
            pause_started = time.perf_counter()
            if at_eval:
                eval_loss, eval_accuracy = evaluate_model(eval_model, loaders.test, device, precision)
                metrics = {"step": step, "eval_loss": eval_loss, "eval_accuracy": eval_accuracy}
                if ema is not None:
                    metrics["eval_ema_loss"], metrics["eval_ema_accuracy"] = evaluate_model(
                        ema.model, loaders.test, device, precision)
                if log:
                    log.eval({**metrics, "epoch": step / steps_per_epoch, "train_loss": train_loss, "lr": lr,
                              "images_per_sec": images_per_sec})
                    log.writer.add_image("eval/attention", attention_image(model, attention_samples, config.data), step)
                accuracy = max(eval_accuracy, metrics.get("eval_ema_accuracy", -1.0))  # best of raw and EMA
                if accuracy > best_accuracy:
                    best_accuracy = accuracy
                    save("best.pt")
            if at_save:
                # The loss checks the weights before the step; the update itself can still have overflowed.
                if not all(torch.isfinite(p).all() for p in model.parameters()):
                    raise diverged(step, run_dir, saved_step)
                save("last.pt")
                saved_step = step
            paused += time.perf_counter() - pause_started
            window, window_start = [], time.perf_counter()  # evaluation and saving do not count as training time

        final = {"step": step, "train_loss": train_loss, "eval_loss": metrics.get("eval_loss"),
                 "eval_accuracy": metrics.get("eval_accuracy"), "eval_ema_accuracy": metrics.get("eval_ema_accuracy"),
                 "best_accuracy": best_accuracy, "images_per_sec": images_per_sec, "run_dir": str(run_dir),
                 "stopped_by": signum, "seconds": time.perf_counter() - started}
        if log:
            if signum:
                log.print(f"stopped by {signal.Signals(signum).name} after step {step}; saved {run_dir / 'last.pt'}. "
                          f"Resume with: vit-train --resume {run_dir}")
            log.hparams(config, final)
            log.print(summary(final, total_steps))
        return final


def summary(final, total_steps):
    def number(value, spec):
        return "n/a" if value is None else format(value, spec)
    return (f"done: step {final['step']}/{total_steps}  eval accuracy {number(final['eval_accuracy'], '.4f')} "
            f"(best {number(final['best_accuracy'], '.4f')})  eval loss {number(final['eval_loss'], '.4f')}  "
            f"train loss {number(final['train_loss'], '.4f')}  {number(final['images_per_sec'], '.0f')} img/s  "
            f"in {format_duration(final['seconds'])}  run dir {final['run_dir']}")

