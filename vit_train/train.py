"""Train a Vision Transformer: `train(config)` runs one resolved config (see vit_train/resolve.py) to its end.

    vit-train --model ViT-B_16 --dataset cifar10                           one process: the CPU or one GPU
    torchrun --nproc_per_node 8 -m vit_train --model ViT-B_16 ...          DistributedDataParallel, same flags

The file reads top to bottom: one training step, the batches of a run, stopping on signals and on a diverging
loss, and `train()`: build the run state, (plan a time budget), the loop of steps with its evaluation, save and
log points, the summary. What a run carries across an interruption is vit_train/state.py; the time budget is
vit_train/budget.py; what a run prints and logs is vit_train/report.py.
"""
import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from vit_train import budget
from vit_train.checkpoint import (check_resume_length, load_checkpoint, owned_folder, save_checkpoint,
                                  write_atomically)
from vit_train.data import build_loaders, resize_images
from vit_train.errors import UserError
from vit_train.evaluate import eval_logits, evaluate_model
from vit_train.models.vit import VisionTransformer
from vit_train.optim import Plan, WeightEMA, build_optimizer
from vit_train.predict import attention_image
from vit_train.pretrained import load_pretrained
from vit_train.report import ESTIMATE_AFTER_STEPS, RunLog, duration_line, flatten
from vit_train.runtime import (all_ranks, autocast, check_compiler, distributed, local_leader_first,
                               out_of_memory_says, resolve_precision, seed_everything)
from vit_train.state import RunState


# ---------------------------------------------------------------------------------------------------------------
# One training step.

def train_step(model, optimizer, scaler, images, targets, config, precision):
    """One optimizer step on this process's batch, at the learning rate the optimizer holds; returns the batch's
    mean loss as a tensor (reading its value would make the CPU wait for the GPU, so the loop reads a window of
    them at a time).

    The batch is split into config.grad_accum micro-batches, each loss divided by their number, so the summed
    gradients are the whole batch's: accumulation bounds memory without changing the step. Under DDP the
    gradients are averaged across processes once, during the last micro-batch's backward pass.
    """
    loss_sum = 0.0
    micro_batches = zip(images.chunk(config.grad_accum), targets.chunk(config.grad_accum))
    ddp = getattr(model, "_orig_mod", model)  # a compiled DDP model is DDP inside
    for i, (x, y) in enumerate(micro_batches):
        defer_sync = isinstance(ddp, DistributedDataParallel) and i < config.grad_accum - 1
        with ddp.no_sync() if defer_sync else contextlib.nullcontext():
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
    return loss_sum


def train_batches(loader, done):
    """This process's batches after the first `done` (RunState.batches_done), epoch after epoch. The order depends
    only on (seed, epoch, batch), so a resumed run starts mid-epoch exactly where the interrupted one stopped."""
    epoch, start = divmod(done, len(loader))
    while True:
        yield from loader.batches(epoch, start=start)
        epoch, start = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------------
# Stopping: on a signal, and on a loss that diverged.

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
    alone would wait forever for the others at its next gradient all-reduce. Agreeing is a collective the host
    waits for, so under torchrun the loop asks only at its log, evaluation and save points."""
    signum = received[0] if received else 0
    if world_size > 1:
        flag = torch.full((), signum, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
    return signum


def window_losses(window, world_size):
    """The per-step losses of a log window as floats, averaged across processes (one GPU sync per window). A sum
    divided here, not ReduceOp.AVG, which gloo has only since torch 2.7."""
    losses = torch.stack(window).float()
    if world_size > 1:
        dist.all_reduce(losses, op=dist.ReduceOp.SUM)
        losses /= world_size
    return losses.tolist()


def diverged(step, run_dir, saved_step):
    kept = f"{run_dir}/last.pt still holds step {saved_step}" if saved_step else "no checkpoint was written"
    return UserError(f"training diverged: the loss or the weights became non-finite at step {step}; {kept}. "
                     f"Lower --lr or set optim.grad_clip, then start again")


# ---------------------------------------------------------------------------------------------------------------
# The run.

@dataclasses.dataclass
class Run:
    """A run being trained: its state, the models it steps and evaluates (DDP- and compile-wrapped around
    state.model), its data, where it writes, rank 0's log (None elsewhere), and the step last.pt holds."""
    state: RunState
    train_model: torch.nn.Module
    eval_model: torch.nn.Module
    loaders: object
    precision: str
    run_dir: Path
    attention_samples: torch.Tensor  # four test images, whose attention maps TensorBoard shows
    log: RunLog = None
    saved_step: int = 0
    calibrated: dict = dataclasses.field(default_factory=dict)  # a budget run's seconds per step of each phase
    step_seconds: dict = dataclasses.field(default_factory=dict)  # ... as each last ran, the latest last

    def step(self, images, targets, size=None, every_patch=False):
        """One optimizer step (and the EMA's), images resized to `size` first when given, on every patch of each
        image (patch dropout off) when `every_patch`."""
        if size is not None:
            images = resize_images(images, size)
        state = self.state
        state.model.patch_dropout = 0.0 if every_patch else state.config.model.get("patch_dropout", 0.0)
        loss = train_step(self.train_model, state.optimizer, state.scaler, images, targets, state.config,
                          self.precision)
        if state.ema is not None:
            state.ema.update(state.model)
        return loss

    def write_config(self):
        config = self.state.recorded_config()
        write_atomically(self.run_dir / "config.json", lambda f: f.write((config.to_json(indent=2) + "\n").encode()))

    def save(self, filename):
        """Write a checkpoint of the run state (every process takes part: each gives its generators)."""
        checkpoint = self.state.state_dict()
        if self.state.rank == 0:
            save_checkpoint(checkpoint, self.run_dir / filename)

    def save_last(self):
        # The loss checks the weights before the step; the update itself can still have overflowed.
        if not all(torch.isfinite(p).all() for p in self.state.model.parameters()):
            raise diverged(self.state.step, self.run_dir, self.saved_step)
        self.save("last.pt")
        self.saved_step = self.state.step

    def end_window(self, window, seconds, lr, paused_share) -> tuple:
        """(mean loss, images/s) of the steps since the last log point, logged with the time the rest of the run
        will take (its training, at each phase's speed, and evaluations and saves taking the share `paused_share`
        of the run's time they took so far); a non-finite loss stops the run."""
        state = self.state
        losses = window_losses(window, state.world_size)
        bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
        if bad is not None:
            raise diverged(state.step - len(losses) + 1 + bad, self.run_dir, self.saved_step)
        train_loss, images_per_sec = sum(losses) / len(losses), len(losses) * state.config.batch_size / seconds
        if self.log:  # the speeds are the ETA's alone, and only rank 0 prints it
            phases = state.plan.phase_steps(state.step - len(window), state.step)
            if len(phases) == 1 or not self.step_seconds:  # a window across a phase change says neither's speed
                phase = state.plan.phase(state.step - 1)
                self.step_seconds.pop(phase, None)
                self.step_seconds[phase] = seconds / len(window)
            to_go = budget.seconds_to_go(state.plan, state.step, self.step_seconds, self.calibrated)
            self.log.train(state.step, train_loss, lr, images_per_sec, epoch=state.epochs(),
                           eta_seconds=to_go / (1 - paused_share))
        return train_loss, images_per_sec

    def evaluate(self, logged):
        """Evaluate the weights (and their EMA) into state.metrics and log them with `logged`; a new best is
        saved as best.pt."""
        state, device = self.state, self.state.device
        metrics = dict(zip(("eval_loss", "eval_accuracy"),
                           evaluate_model(self.eval_model, self.loaders.test, device, self.precision)))
        if state.ema is not None:
            metrics["eval_ema_loss"], metrics["eval_ema_accuracy"] = evaluate_model(
                state.ema.model, self.loaders.test, device, self.precision)
        if not all(math.isfinite(metrics[key]) for key in metrics if key.endswith("_loss")):
            # finite weights can still be too large for their outputs (a huge weight decay): nothing to keep
            raise diverged(state.step, self.run_dir, self.saved_step)
        state.metrics = {"step": state.step, **metrics}
        if self.log:
            self.log.eval({**state.metrics, "epoch": state.epochs(), **logged},
                          attention_image(state.model, self.attention_samples, state.config.data))
        if state.best_accuracy is None or state.judged_accuracy() > state.best_accuracy:
            state.best_accuracy = state.judged_accuracy()
            self.save("best.pt")


@contextlib.contextmanager
def quiet_cpp_extension_logger():
    """Compiling imports torch.utils.cpp_extension, which logs a warning line about CUDA_HOME on machines with a
    CUDA toolkit but no GPU; it concerns C++ extensions, not the run. It is imported here, its warning held back:
    left to the compiled model's first call, it would print in the middle of the run's start."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401  (the import is the point)
        yield
    finally:
        logger.setLevel(level)


def build_run(config, run_dir, rank, world_size, device) -> Run:
    """The data, the model (from --pretrained weights or a checkpoint), the optimizer, loss scaler and EMA, in one
    RunState writing to run_dir; resumed from config.resume when given. The plan is the config's, or None for a
    budget run to plan."""
    if config.compile:
        check_compiler(device)
    seed_everything(config.seed + rank)  # distinct dropout per process; DDP copies rank 0's initial weights
    precision = resolve_precision(config.precision, device)
    with local_leader_first(world_size):  # one dataset download per machine
        loaders = build_loaders(config.data, img_size=config.img_size, batch_size=config.batch_size // world_size,
                                eval_batch_size=config.eval_batch_size, device=device, seed=config.seed, rank=rank,
                                world_size=world_size)
    if config.resume and not loaders.resumes_exactly and rank == 0:
        print("note: this run reads its image folder through DataLoader workers, so the resumed steps see the same "
              "images in the same order but new random crops and flips: it does not continue bit for bit")
    sizes = config.model  # out of memory before any batch: no batch size would help (training_memory_advice)
    with out_of_memory_says(device, lambda memory, _: (
            f"out of {memory} building the model itself ({config.model_name} with hidden size {sizes.hidden_size}, "
            f"{sizes.transformer.num_layers} layers, MLP {sizes.transformer.mlp_dim}); choose a smaller --model or "
            "model.* sizes")):
        model = VisionTransformer(config.model, config.img_size, loaders.num_classes).to(device)
    if config.pretrained and not config.resume:
        notes = load_pretrained(model, config.pretrained)
        if rank == 0:
            print(f"loaded {config.pretrained}" + "".join(f"; {note}" for note in notes))
    train_model = eval_model = model
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)  # copies rank 0's weights
    if config.compile:
        # Static shapes: each image side (and evaluation) compiles once, rather than once more as a dynamic graph.
        # DDP is compiled whole, as torch documents, so that compiled backward keeps all-reducing gradient
        # buckets while it runs (a compiled module inside DDP loses that overlap).
        with quiet_cpp_extension_logger():
            train_model, eval_model = torch.compile(train_model, dynamic=False), torch.compile(model, dynamic=False)
    optimizer = build_optimizer(model, config.optim, device)
    ema = WeightEMA(model, config.optim.ema_decay) if config.optim.ema_decay > 0 else None  # after DDP's copy
    budgeted = config.time_budget and config.schedule.steps is None  # a resumed budget run keeps its plan
    plan = None if budgeted else Plan.from_config(config, len(loaders.train))
    state = RunState(model, optimizer, torch.amp.GradScaler(device.type, enabled=precision == "fp16"), ema, plan,
                     config, run_dir.name, loaders.class_names, len(loaders.train), device, rank, world_size)
    if config.resume:
        state.load_state_dict(load_checkpoint(config.resume))
        if state.plan:  # --epochs (--steps is checked as the config resolves)
            check_resume_length(config.resume, state.step, state.plan.total_steps)
    attention_samples = next(loaders.test.batches(0))[0][:4]
    return Run(state, train_model, eval_model, loaders, precision, run_dir, attention_samples, saved_step=state.step)


def train(config, clock=time.perf_counter):
    """Run a resolved config (vit_train.resolve.resolve_config) to its end and return the final metrics:
    {step, train_loss, eval_loss, eval_accuracy, eval_ema_accuracy, best_accuracy, images_per_sec,
    run_images_per_sec, run_dir, stopped_by, seconds}, where images_per_sec is the last logging window's and
    run_images_per_sec the whole loop's (evaluations and saves left out: a run's phases train at different speeds),
    stopped_by is the number of the signal that interrupted the run, or 0 when it ran to
    the end, eval_ema_accuracy is None without optim.ema_decay, best_accuracy is None before the first evaluation,
    and seconds is the wall time since the call. `clock` times the run and its budget (seconds, monotonic: tests
    give a simulated one to make a budget's plan repeatable). The config is read, never changed."""
    started = clock()
    with distributed(config.device) as (rank, world_size, device), StopSignals(announce=rank == 0) as stops, \
            contextlib.ExitStack() as cleanup:
        # the last to see an error: the outermost
        cleanup.enter_context(out_of_memory_says(device, training_memory_advice(config, world_size)))
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
        name = all_ranks(config.name, world_size)[0]  # each process resolved its config, and a default name, alone
        run_dir = Path(config.output_dir) / name
        if rank == 0:  # claimed before anything heavy: a second run of the same --name is refused at once
            cleanup.enter_context(owned_folder(run_dir, resuming=bool(config.resume)))
        run = build_run(config, run_dir, rank, world_size, device)
        state = run.state
        calibration = measured = None
        if state.plan is None:
            state.plan, calibration, measured = budget.calibrate(
                config, state, run.step, train_batches(run.loaders.train, 0), run.eval_model, run.loaders.test,
                run.precision, started, clock)
            run.calibrated = calibration.step_seconds
        stops.plan = lambda: f"{stopping_at(state, config, world_size)}, then saving {run.run_dir / 'last.pt'}"
        if rank == 0:
            run.write_config()
            # closed also when the run fails: TensorBoard flushed, the progress bar ended
            run.log = cleanup.enter_context(RunLog(run.run_dir, config.quiet, state.step, state.plan.total_steps,
                                                   device))
            run.log.start(config, state, run.precision, run.loaders.note, measured,
                          calibration and calibration.budget - (clock() - started))

        train_loss = images_per_sec = None
        signum, first_step = 0, state.step
        batches = train_batches(run.loaders.train, state.batches_done())
        window, window_start, loop_started, paused = [], clock(), clock(), 0.0  # paused: evaluating and saving
        replan_at = max(round(budget.REPLAN_AT * state.plan.total_steps), first_step + 1) if calibration else None
        replanned = (first_step, 0.0)  # the step and training seconds of the last re-plan (or the loop's start)
        while state.step < state.plan.total_steps and not signum:
            phase = state.plan.phase(state.step)
            run.loaders.train.every_patch = phase[1]  # the batch is drawn for its step's phase
            images, targets = next(batches)
            state.set_learning_rate()
            lr = state.optimizer.param_groups[0]["lr"]
            window.append(run.step(images, targets, *phase))
            state.step += 1
            if run.log:
                run.log.step()
            if state.step == first_step + 1:  # the first step compiles (--compile), allocates, warms caches
                float(window[-1])  # wait for the device: it is done
                estimate_from = clock()
                if config.compile and run.log:
                    run.log.print(f"compiled: the first step took {estimate_from - loop_started:.1f} s")
            if state.step == first_step + 1 + ESTIMATE_AFTER_STEPS and not calibration:
                announce_duration(run, window[-1], (clock() - estimate_from) / ESTIMATE_AFTER_STEPS)
            if state.step == replan_at < state.plan.total_steps:  # at the last step there is nothing to re-plan
                float(window[-1])  # wait for the device: the steps so far are done
                trained = clock() - loop_started - paused
                replan(run, calibration, seconds_left=calibration.budget - (clock() - started),
                       seconds_trained=trained - replanned[1], first_step=replanned[0],
                       first=replanned[0] == first_step)
                replanned = (state.step, trained)
                replan_at = state.step + max(1, round(budget.REPLAN_EVERY * state.plan.total_steps))
            at_end = state.step == state.plan.total_steps
            at_eval = at_end or (config.eval_every and state.step % config.eval_every == 0)
            at_save = at_end or (config.save_every and state.step % config.save_every == 0)
            at_log = at_eval or at_save or state.step % config.log_every == 0
            if at_log or world_size == 1:
                signum = agreed_signal(stops.received, world_size, device)
                at_save = at_save or signum
            if not (at_log or signum):
                continue

            train_loss, images_per_sec = run.end_window(window, clock() - window_start, lr,
                                                        paused_share=paused / max(clock() - loop_started, 1e-9))
            pause_started = clock()
            if at_eval:
                run.evaluate({"train_loss": train_loss, "lr": lr, "images_per_sec": images_per_sec})
            if at_save:
                run.save_last()
            paused += clock() - pause_started
            window, window_start = [], clock()  # evaluation and saving do not count as training time

        final = {"step": state.step, "train_loss": train_loss, "eval_loss": state.metrics.get("eval_loss"),
                 "eval_accuracy": state.metrics.get("eval_accuracy"),
                 "eval_ema_accuracy": state.metrics.get("eval_ema_accuracy"), "best_accuracy": state.best_accuracy,
                 "images_per_sec": images_per_sec,
                 "run_images_per_sec": (state.step - first_step) * config.batch_size
                 / max(clock() - loop_started - paused, 1e-9),
                 "run_dir": str(run.run_dir), "stopped_by": signum,
                 "seconds": clock() - started}
        if run.log:
            if signum:
                run.log.print(f"stopped by {signal.Signals(signum).name} after step {state.step}; saved "
                              f"{run.run_dir / 'last.pt'}. Resume with: vit-train --resume {run.run_dir}")
            run.log.finish(flatten(state.recorded_config()), final, state.plan.total_steps, state.ema is not None)
        return final


def stopping_at(state, config, world_size):
    """Which step a run stops after when a signal comes now: the next one, or under torchrun at the latest the
    next log step, where the processes agree on it (agreed_signal); after the last step, none: the final
    evaluation is under way."""
    if state.step >= state.plan.total_steps:
        return f"all {state.plan.total_steps} steps are done: finishing the final evaluation"
    if world_size == 1:
        return f"finishing step {state.step + 1}"
    agreed = min((state.step // config.log_every + 1) * config.log_every, state.plan.total_steps)
    return f"finishing the steps to step {agreed} at the latest"


def training_memory_advice(config, world_size):
    """What to change when memory runs out in a training run (checkpoints are written atomically, so the last one
    is whole): for evaluation its batch size, for training the micro-batches. For out_of_memory_says."""
    def message(memory, error):
        # evaluation (and the budget's timing of it) runs its batches in eval_logits; training's sizes cannot help
        if any(frame.f_code is eval_logits.__code__ for frame, _ in traceback.walk_tb(error.__traceback__)):
            return (f"out of {memory} while evaluating, at evaluation batches of {config.eval_batch_size}; "
                    "give a smaller --set eval_batch_size=N. Checkpoints are as last saved")
        micro = config.batch_size // world_size // config.grad_accum
        more = next((k for k in range(config.grad_accum + 1, config.batch_size // world_size + 1)
                     if config.batch_size % (k * world_size) == 0), None)  # micro-batches the batch splits into
        change = (f"give --grad-accum {more} for the same step in less memory, or a smaller --batch-size" if more
                  else "give a smaller --batch-size")
        return (f"out of {memory} while training at batch size {config.batch_size} ({config.grad_accum} "
                f"micro-batches of {micro} per process and step); {change}. Checkpoints are as last saved")
    return message


def announce_duration(run, last_loss, seconds_per_step):
    """How long a run without a time budget will take, from its first steps."""
    if run.log and run.state.step < run.state.plan.total_steps:
        float(last_loss)  # wait for the device: the steps so far are done
        steps_left = run.state.plan.total_steps - run.state.step
        run.log.print(duration_line(seconds_per_step * steps_left, run.state.device, run.state.plan.total_steps,
                                    run.state.steps_per_epoch))


def replan(run, calibration, seconds_left, seconds_trained, first_step, first):
    """Re-fit a budget run's length to the time left (budget.Calibration.replan), from steps first_step on, on
    every rank alike. Said the first time, and later when the length moves by 2% and 10 steps or more."""
    state, config = run.state, run.state.config
    before = state.plan.total_steps
    state.plan, slowdown = all_ranks(calibration.replan(state.plan, state.step, seconds_left, seconds_trained,
                                                        first_step, config.eval_every, config.save_every),
                                     state.world_size)[0]
    if run.log:
        run.write_config()  # what checkpoints and --resume see
        run.log.replanned(state.plan.total_steps,
                          f"re-planned at step {state.step}: steps {first_step}-{state.step} took {slowdown:.2f}x "
                          f"the calibrated time, so {state.plan.total_steps} steps rather than {before} "
                          f"({state.plan.total_steps / state.steps_per_epoch:.1f} epochs)",
                          said=first or abs(state.plan.total_steps - before) >= max(0.02 * before, 10))
