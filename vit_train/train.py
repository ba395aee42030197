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
import functools
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vit_train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vit_train.data import build_loaders
from vit_train.errors import UserError
from vit_train.evaluate import attention_image, evaluate_model
from vit_train.models import VisionTransformer
from vit_train.pretrained import load_pretrained
from vit_train.runtime import all_ranks, autocast, distributed, local_leader_first, resolve_precision, seed_everything


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
        (no_decay if param.ndim <= 1 or name in NO_WEIGHT_DECAY else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, optim):
    """SGD or AdamW with fused updates: one kernel for the whole update rather than several passes over every
    tensor, on GPUs and CPUs alike (on the CPU it makes AdamW's step for ViT-B about 5x faster than foreach)."""
    groups = param_groups(model, optim.weight_decay)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=True)


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
    scheduler.step()
    return loss_sum


def train_batches(loader, step):
    """This process's batches from optimizer step `step` on, epoch after epoch. The order depends only on
    (seed, epoch, batch), so a resumed run starts mid-epoch exactly where the interrupted one stopped."""
    epoch, start = divmod(step, len(loader))
    while True:
        yield from loader.batches(epoch, start=start)
        epoch, start = epoch + 1, 0


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
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= start_step))
        self.start_step, self.total_steps, self.started = start_step, total_steps, time.perf_counter()
        use_bar = not config.quiet and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) if use_bar else None

    def print(self, text):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

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
        eta = time.strftime("%H:%M:%S", time.gmtime(seconds_per_step * (self.total_steps - step)))
        self.print(f"step {step}/{self.total_steps}  epoch {epoch:.2f}  loss {loss:.4f}  lr {lr:.2e}  "
                   f"{images_per_sec:.0f} img/s  eta {eta}")

    def eval(self, record):
        self.writer.add_scalar("eval/loss", record["eval_loss"], record["step"])
        self.writer.add_scalar("eval/accuracy", record["eval_accuracy"], record["step"])
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.print(f"eval at step {record['step']}: loss {record['eval_loss']:.4f}  "
                   f"accuracy {record['eval_accuracy']:.4f}")

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


@contextlib.contextmanager
def stop_signals():
    """While the block runs, SIGINT and SIGTERM are appended to the yielded list instead of killing the process,
    so that the loop can finish its step and save. Repeats change nothing: under torchrun, Ctrl-C reaches each
    process twice, from the terminal and from torchrun. (SIGKILL or Ctrl-\\ still end a run at once.)"""
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


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
    {step, train_loss, eval_loss, eval_accuracy, best_accuracy, images_per_sec, run_dir, stopped_by}, where
    stopped_by is the number of the signal that interrupted the run, or 0 when it ran to the end."""
    with distributed(config.device) as (rank, world_size, device), stop_signals() as received, \
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
        if config.schedule.steps is None:
            config.schedule.steps = config.schedule.epochs * steps_per_epoch
        total_steps = config.schedule.steps

        model = VisionTransformer(config.model, config.img_size, loaders.num_classes).to(device)
        if config.pretrained and not config.resume:
            notes = load_pretrained(model, config.pretrained)
            if is_main:
                print(f"loaded {config.pretrained}" + "".join(f"; {note}" for note in notes))
        optimizer = build_optimizer(model, config.optim)
        schedule = functools.partial(SCHEDULES[config.schedule.name], warmup_steps=config.schedule.warmup_steps,
                                     total_steps=total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        step, saved_step, best_accuracy, metrics = 0, 0, -1.0, {}
        if config.resume:
            checkpoint = load_checkpoint(config.resume)
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            if checkpoint["scaler"]:
                scaler.load_state_dict(checkpoint["scaler"])
            rngs = checkpoint["rng"]
            set_rng_state(rngs[rank % len(rngs)], device)
            step = saved_step = checkpoint["step"]
            best_accuracy, metrics = checkpoint["best_accuracy"], checkpoint["metrics"]
        eval_model = torch.compile(model) if config.compile else model
        train_model = eval_model
        if world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            train_model = DistributedDataParallel(eval_model, device_ids=device_ids)

        def save(filename):
            """Write a checkpoint of the state after `step` (every process takes part: each gives its RNG state)."""
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch,
                "rng": all_ranks(rng_state(device), world_size), "config": config.to_dict(),
                "class_names": loaders.class_names, "metrics": metrics, "best_accuracy": best_accuracy,
            }
            if is_main:
                save_checkpoint(state, run_dir / filename)

        log = None
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(config.to_json(indent=2) + "\n")
            log = RunLog(run_dir, config, step, total_steps)
            cleanup.callback(log.close)  # also when the run fails: flush TensorBoard, end the progress bar
            attention_samples = next(loaders.test.batches(0))[0][:4]  # TensorBoard shows their attention maps
            grid = model.grid_size  # patches per side (the hybrid's ResNet stem downsamples first)
            log.print(f"{config.model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                      f"{grid}x{grid} patches of {config.img_size}px images) on {config.data.name}: "
                      f"{steps_per_epoch} steps per epoch of batch {config.batch_size} (processes: {world_size}, "
                      f"micro-batches: {config.grad_accum}); {device}, {precision}; run dir {run_dir}")
            if config.schedule.warmup_steps >= total_steps > 0:
                log.print(f"note: the {config.schedule.warmup_steps}-step warm-up is not shorter than the "
                          f"{total_steps}-step run, so the learning rate never reaches its peak; "
                          f"give a smaller --warmup-steps")

        train_loss = images_per_sec = None
        signum = 0
        window, window_start = [], time.perf_counter()
        batches = train_batches(loaders.train, step)
        while step < total_steps and not signum:
            images, targets = next(batches)
            lr = optimizer.param_groups[0]["lr"]  # this step's, set by the scheduler after the previous one
            window.append(train_step(train_model, optimizer, scheduler, scaler, images, targets, config, precision))
            step += 1
            if log:
                log.step()
            signum = agreed_signal(received, world_size, device)
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
            if at_eval:
                eval_loss, eval_accuracy = evaluate_model(eval_model, loaders.test, device, precision)
                metrics = {"step": step, "eval_loss": eval_loss, "eval_accuracy": eval_accuracy}
                if log:
                    log.eval({**metrics, "epoch": step / steps_per_epoch, "train_loss": train_loss, "lr": lr,
                              "images_per_sec": images_per_sec})
                    log.writer.add_image("eval/attention", attention_image(model, attention_samples, config.data), step)
                if eval_accuracy > best_accuracy:
                    best_accuracy = eval_accuracy
                    save("best.pt")
            if at_save:
                # The loss checks the weights before the step; the update itself can still have overflowed.
                if not all(torch.isfinite(p).all() for p in model.parameters()):
                    raise diverged(step, run_dir, saved_step)
                save("last.pt")
                saved_step = step
            window, window_start = [], time.perf_counter()  # evaluation and saving do not count as training time

        final = {"step": step, "train_loss": train_loss, "eval_loss": metrics.get("eval_loss"),
                 "eval_accuracy": metrics.get("eval_accuracy"), "best_accuracy": best_accuracy,
                 "images_per_sec": images_per_sec, "run_dir": str(run_dir), "stopped_by": signum}
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
            f"run dir {final['run_dir']}")

