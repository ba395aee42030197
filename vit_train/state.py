"""What a run carries across an interruption, in one object: `RunState`. Checkpoints are its state_dict(),
--resume is its load_state_dict(), and the time budget's calibration is undone by loading a copy of it.

A step's outcome depends only on the weights, the optimizer and loss-scaler states, the random generators
(dropout) and the step number, because the data order is a pure function of (seed, epoch, batch) and the
learning rate a pure function of (plan, step). A checkpoint holds all of them, so on the CPU a resumed run ends
exactly where an uninterrupted one does. The checkpoint layout (see vit_train/checkpoint.py) is:

    model, ema      the unwrapped weights and their EMA (None without optim.ema_decay)
    optimizer, scaler                their state dicts (scaler: {} when fp16 loss scaling is off)
    step            optimizer steps done
    rng             one dict per process (rank): the torch, CUDA, numpy and python generator states
    config          the resolved config with the run's plan in absolute steps (optim.Plan.record), its name and
                    class count: what config.json holds, and what --resume continues with
    class_names     the dataset's class names, in label order
    metrics         the last evaluation: {step, eval_loss, eval_accuracy[, eval_ema_loss, eval_ema_accuracy]}
    best_accuracy   the best accuracy of the weights vit-eval uses (the EMA's when there is one), or None
    epochs, epoch_anchor    epochs done, and where a resume changed the batch size (RunState.epoch_anchor)

Checkpoints written before this layout (with scheduler, epoch and batch_in_epoch, and -1.0 for no best) load too.
"""
import copy
import dataclasses

from vit_train.checkpoint import rng_state, set_rng_state
from vit_train.optim import Plan, load_optimizer_state
from vit_train.runtime import all_ranks


@dataclasses.dataclass
class RunState:
    model: object            # the unwrapped model: what is saved, evaluated for best.pt and exported
    optimizer: object
    scaler: object
    ema: object              # optim.WeightEMA or None
    plan: Plan
    config: object           # the resolved config, never changed: the plan, name and classes are added on record
    name: str                # the run's name, rank 0's (each process resolved its config, and a default name, alone)
    class_names: list
    steps_per_epoch: int
    device: object
    rank: int = 0
    world_size: int = 1
    step: int = 0
    best_accuracy: float = None
    metrics: dict = dataclasses.field(default_factory=dict)
    # (step, batches done by then): where a resume changed the batch size, so that epochs go on counting from
    # where they were rather than being recounted in batches of the new size
    epoch_anchor: tuple = (0, 0)

    def batches_done(self) -> int:
        """Training batches of the current size that the steps so far amount to: the data stream's position (the
        step itself, unless a resume changed the batch size)."""
        anchor_step, anchor_batches = self.epoch_anchor
        return anchor_batches + self.step - anchor_step

    def epochs(self) -> float:
        return self.batches_done() / self.steps_per_epoch

    def set_learning_rate(self):
        """The learning rate of the next step, from the plan: resuming or re-planning needs no scheduler state."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.optim.lr * self.plan.lr_factor(self.step)

    def recorded_config(self):
        """The config as config.json and checkpoints record it: resolved, with the plan in absolute steps."""
        recorded = self.plan.record(self.config) if self.plan else copy.deepcopy(self.config)  # None: not planned yet
        recorded.name, recorded.num_classes = self.name, len(self.class_names)
        return recorded

    def judged_accuracy(self):
        """The accuracy best.pt is chosen by: of the weights vit-eval evaluates and exports by default."""
        return self.metrics["eval_ema_accuracy" if self.ema is not None else "eval_accuracy"]

    def state_dict(self) -> dict:
        """Everything to continue the run exactly. Every process must call it: each gives its generators."""
        return {
            "model": self.model.state_dict(), "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "rng": all_ranks(rng_state(self.device), self.world_size),
            "config": self.recorded_config().to_dict(), "class_names": list(self.class_names),
            "metrics": self.metrics, "best_accuracy": self.best_accuracy,
            "epochs": self.epochs(), "epoch_anchor": list(self.epoch_anchor),
        }

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        if self.ema is not None:  # a run that turns the EMA on when resumed starts it from the resumed weights
            self.ema.model.load_state_dict(state.get("ema") or state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])  # with the config's settings, not the saved
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        set_rng_state(rngs[self.rank % len(rngs)], self.device)
        self.step, self.metrics = state["step"], dict(state["metrics"])
        self.epoch_anchor = tuple(state.get("epoch_anchor", (0, 0)))
        saved_batch = state["config"]["batch_size"]
        if saved_batch != self.config.batch_size:  # before "epochs" was saved: as many images as the steps took
            epochs = state.get("epochs", self.step * saved_batch / (self.steps_per_epoch * self.config.batch_size))
            self.epoch_anchor = (self.step, round(epochs * self.steps_per_epoch))
        best = state["best_accuracy"]
        self.best_accuracy = None if best is None or best < 0 else best  # -1.0: none, before this layout
