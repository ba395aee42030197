"""What a run reports, on rank 0: the start-up lines, a progress bar (plain lines when stderr is not a terminal,
or with --quiet), TensorBoard scalars, metrics.jsonl (one JSON object per evaluation), the expected duration and
the time budget's plan, and the summary line. Durations and clock times for people live here too."""
import contextlib
import datetime
import json
import os
import sys
import threading

import torch
from tqdm import tqdm

from vit_train.checkpoint import write_atomically
from vit_train.errors import UserError, first_line
from vit_train.runtime import describe_device, fast_bf16, slow_precision_warning

# Steps after which a run without a time budget states how long it will take.
ESTIMATE_AFTER_STEPS = 5
# A run longer than this on a CPU gets a pointer to a recipe sized for CPUs.
LONG_CPU_RUN_SECONDS = 2 * 3600


YEAR_S = 365.25 * 86400


def format_duration(seconds) -> str:
    """3725 -> '1:02:05', 95000 -> '1 day 2:23:20' (days never wrap into hours); beyond a year '3.2 years', and
    '1.1e+14 years' for any length a flag allows."""
    if seconds >= 365 * 86400:
        return f"{seconds / YEAR_S:.3g} years"
    days, rest = divmod(int(round(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days} day{'s' if days > 1 else ''} {clock}" if days else clock


def end_time(seconds_from_now) -> str:
    """'14:05' today, 'Tue 01 Dec 14:05' within a year, '3.2 years from now' (or '4.1e+05 years from now') beyond:
    any length a flag allows prints, where a date in the year 10000 would overflow."""
    if seconds_from_now >= 365 * 86400:
        return f"{format_duration(seconds_from_now)} from now"
    at = datetime.datetime.now() + datetime.timedelta(seconds=seconds_from_now)
    return at.strftime("%H:%M" if seconds_from_now < 20 * 3600 else "%a %d %b %H:%M")


def duration_line(seconds, device, steps, steps_per_epoch) -> str:
    line = (f"expected duration: {format_duration(seconds)} for {steps} steps ({steps / steps_per_epoch:.1f} epochs),"
            f" ending about {end_time(seconds)}")
    if device.type == "cpu" and seconds > LONG_CPU_RUN_SECONDS:
        line += ("; this is a GPU-sized run. On a CPU, `vit-train --config cifar10_cpu --time-budget 10m` trains "
                 "the best ViT the machine can in 10 minutes")
    return line


def summary(final, total_steps, with_ema):
    def number(value, spec):
        return "n/a" if value is None else format(value, spec)
    best = "best EMA" if with_ema else "best"
    ema = f"  EMA accuracy {number(final['eval_ema_accuracy'], '.4f')}" if with_ema else ""
    return (f"done: step {final['step']}/{total_steps}  eval accuracy {number(final['eval_accuracy'], '.4f')}{ema} "
            f"({best} {number(final['best_accuracy'], '.4f')})  eval loss {number(final['eval_loss'], '.4f')}  "
            f"train loss {number(final['train_loss'], '.4f')}  {final['run_images_per_sec']:.0f} img/s  "
            f"in {format_duration(final['seconds'])}  run dir {final['run_dir']}")


def flatten(config, prefix=""):
    """{"optim.lr": 0.001, ...} from a nested config."""
    flat = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


class RunLog:
    """Rank 0's reports for the run in `run_dir`, from `start_step` (a resumed run's) on.

    A write that fails (a full disk) ends the run with one line naming the file; checkpoints are written apart,
    atomically, so they stay as last saved. TensorBoard writes from a background thread, which would print the
    failure's traceback on its own: it is kept quiet, and the main thread reports the failure, which TensorBoard
    hands it at the next write."""

    def __init__(self, run_dir, quiet, start_step, total_steps, device):
        from torch.utils.tensorboard import SummaryWriter  # slow to import, and only rank 0 needs it

        self.run_dir, self.events = run_dir, f"the TensorBoard events in {run_dir}"
        with self.writing(self.events):
            # A resumed run repeats the steps after its checkpoint: drop what the interrupted run logged for them.
            self.writer = SummaryWriter(run_dir, purge_step=start_step + 1 if start_step else None)
        self.metrics_path = run_dir / "metrics.jsonl"
        if self.metrics_path.exists():
            try:
                lines = self.metrics_path.read_text().splitlines()
                records = [json.loads(line) for line in lines]
                kept = "".join(json.dumps(r) + "\n" for r in records if r["step"] <= start_step)
                write_atomically(self.metrics_path, lambda f: f.write(kept.encode()))
            except (OSError, ValueError, KeyError, UserError) as error:
                self.writer.close()
                raise UserError(f"cannot continue {self.metrics_path} ({first_line(error)}); move it aside to "
                                "start it anew") from None
        self.total_steps = total_steps
        self.device = describe_device(device)  # named with every figure: speed and accuracy depend on it
        use_bar = not quiet and sys.stderr.isatty()
        # tqdm's own time to go is its average step rate times the steps left, which misprices a plan whose phases
        # step at different speeds (docs/training.md, "Time and --time-budget"): the bar shows the run's ETA instead.
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
                        ) if use_bar else None
        self.previous_excepthook, threading.excepthook = threading.excepthook, self.quiet_writer_thread

    def quiet_writer_thread(self, args):
        if not type(args.thread).__module__.startswith("tensorboard."):
            self.previous_excepthook(args)

    @contextlib.contextmanager
    def writing(self, what):
        try:
            yield
        except OSError as error:
            raise UserError(f"could not write {what} ({error.strerror or error}); the checkpoints in {self.run_dir} "
                            f"are as last saved. Free space, then continue with vit-train --resume {self.run_dir}"
                            ) from None

    def print(self, text):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def start(self, config, state, precision, note, calibration=None, seconds_left=None):
        """The run's first lines: what trains on what, warnings about the plan, and how long it will take."""
        grid = state.model.grid_size  # patches per side (the hybrid's ResNet stem downsamples first)
        parameters = sum(p.numel() for p in state.model.parameters()) / 1e6
        self.print(f"{config.model_name} ({parameters:.1f}M parameters, {grid}x{grid} patches of {config.img_size}px "
                   f"images) on {config.data.name}: {state.steps_per_epoch} steps per epoch of batch "
                   f"{config.batch_size} (processes: {state.world_size}, micro-batches: {config.grad_accum}); "
                   f"{self.device}, {precision}; run dir {self.writer.log_dir}")
        if note:
            self.print(f"data: {note}")
        if warning := slow_precision_warning(precision, state.device):
            self.print(f"warning: {warning}")
        muon = getattr(state.optimizer, "muon", None)
        if muon is not None and muon.dtype == torch.bfloat16 and not fast_bf16(state.device):
            self.print(f"warning: optim.muon_precision=bf16 on {self.device}, which emulates bf16 products: Muon's "
                       "step runs 40-80x slower than in fp32 here; use optim.muon_precision=auto")
        plan = state.plan
        if plan.warmup_steps >= plan.total_steps > 0:
            self.print(f"note: the {plan.warmup_steps}-step warm-up is not shorter than the {plan.total_steps}-step "
                       "run, so the learning rate never reaches its peak; give a smaller --warmup-steps")
        if calibration:
            self.print(f"time budget {config.time_budget}: {plan.total_steps} steps "
                       f"({plan.total_steps / state.steps_per_epoch:.1f} epochs) planned to end about "
                       f"{end_time(seconds_left)} ({calibration})")

    def replanned(self, total_steps, text, said=True):
        self.total_steps = total_steps
        if self.bar is not None:
            self.bar.total = total_steps
        if said:
            self.print(text)

    def step(self):
        if self.bar is not None:
            self.bar.update()

    def train(self, step, loss, lr, images_per_sec, epoch, eta_seconds):
        with self.writing(self.events):
            for tag, value in (("loss", loss), ("lr", lr), ("images_per_sec", images_per_sec)):
                self.writer.add_scalar(f"train/{tag}", value, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_sec:.0f}",
                                 eta=format_duration(eta_seconds), refresh=False)
            return
        self.print(f"step {step}/{self.total_steps}  epoch {epoch:.2f}  loss {loss:.4f}  lr {lr:.2e}  "
                   f"{images_per_sec:.0f} img/s  eta {format_duration(eta_seconds)}")

    def eval(self, record, attention=None):
        with self.writing(self.events):
            for key in ("eval_loss", "eval_accuracy", "eval_ema_loss", "eval_ema_accuracy"):
                if key in record:
                    self.writer.add_scalar(key.replace("eval_", "eval/", 1), record[key], record["step"])
            if attention is not None:
                self.writer.add_image("eval/attention", attention, record["step"])
        with self.writing(self.metrics_path), open(self.metrics_path, "ab", buffering=0) as f:
            size = f.tell()
            try:
                f.write((json.dumps({**record, "device": self.device}) + "\n").encode())
            except OSError:
                os.ftruncate(f.fileno(), size)  # no half line for a resumed run to stumble on
                raise
        ema = (f"  EMA: loss {record['eval_ema_loss']:.4f}  accuracy {record['eval_ema_accuracy']:.4f}"
               if "eval_ema_accuracy" in record else "")
        self.print(f"eval at step {record['step']}: loss {record['eval_loss']:.4f}  "
                   f"accuracy {record['eval_accuracy']:.4f}{ema}")

    def finish(self, flat_config, final, total_steps, with_ema):
        """The hyperparameters with the final metrics for TensorBoard, and the summary line."""
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_config.items()}
        hparams["device"] = self.device
        metrics = {f"hparam/{k}": final[k] for k in ("eval_accuracy", "eval_loss", "best_accuracy")
                   if final[k] is not None}
        with self.writing(self.events):
            self.writer.add_hparams(hparams, metrics, run_name=".", global_step=final["step"])
            self.writer.flush()
        self.print(summary(final, total_steps, with_ema))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        """Flush and close. A run already ending on an error ends with that one line, not a second one."""
        try:
            with self.writing(self.events):
                self.writer.close()
        except UserError:
            if exc_type is None:
                raise
        finally:
            threading.excepthook = self.previous_excepthook
            if self.bar is not None:
                self.bar.close()
