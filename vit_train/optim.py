"""How the weights move: the run's plan (learning-rate and resolution schedule in absolute optimizer steps), the
optimizer, and the weight EMA. Below config (which validates against OPTIMIZERS and SCHEDULES) and train."""
import copy
import dataclasses
import math

import torch

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


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's schedule in absolute optimizer steps: its length, its warm-up, and how many of its first steps
    train at the low resolution (progressive resizing). A value, fixed when made: fractions of the run are turned
    into steps once, so a run that is re-planned or resumed never moves a boundary it has already passed."""
    schedule: str            # one of SCHEDULES
    total_steps: int
    warmup_steps: int
    img_size: int
    low_res_size: int = 0    # 0: no low-resolution phase
    low_res_steps: int = 0   # steps 0..low_res_steps-1 see low_res_size images

    @classmethod
    def from_config(cls, config, steps_per_epoch, total_steps=None) -> "Plan":
        """The plan of a resolved config; total_steps (a time budget's) replaces the config's steps or epochs."""
        schedule = config.schedule
        if total_steps is None:
            total_steps = schedule.steps if schedule.steps is not None else schedule.epochs * steps_per_epoch
        warmup = schedule.warmup_steps
        if schedule.warmup_fraction is not None:
            warmup = round(schedule.warmup_fraction * total_steps)
        low_res = 0
        if schedule.low_res_size:
            low_res = (schedule.low_res_steps if schedule.low_res_steps is not None
                       else round(schedule.low_res_fraction * total_steps))
        return cls(schedule.name, total_steps, warmup, config.img_size, schedule.low_res_size,
                   min(low_res, total_steps) if schedule.low_res_size else 0)

    def lr_factor(self, step) -> float:
        return SCHEDULES[self.schedule](step, self.warmup_steps, self.total_steps)

    def image_size(self, step) -> int:
        """Progressive resizing: the first low_res_steps see images at low_res_size, the rest at img_size.
        Low-resolution steps cost a fraction as much (a 16-px image has a quarter of the patches of a 32-px one), so
        more epochs fit a time budget; the last steps adapt the network to the full resolution it is evaluated at
        (as Touvron et al. 2019 train low and test high)."""
        return self.low_res_size if step < self.low_res_steps else self.img_size

    def image_sizes(self) -> dict:
        """{image side: the share of the run's steps at it}, for the sides the run uses."""
        shares = {self.low_res_size: self.low_res_steps / self.total_steps,
                  self.img_size: 1 - self.low_res_steps / self.total_steps}
        return {size: share for size, share in shares.items() if share > 0}

    def lengthened(self, total_steps, step) -> "Plan":
        """This plan with a new length, decided at `step`. A boundary already reached stays where it was; so does
        one still ahead that the new length reaches (the common case); one the new length no longer reaches
        keeps its share of the run, so that a shortened run still ends warmed up and at full resolution."""
        def moved(boundary):
            if boundary <= step or boundary < total_steps:
                return boundary
            return max(step, round(boundary * total_steps / self.total_steps))
        return dataclasses.replace(self, total_steps=total_steps, warmup_steps=moved(self.warmup_steps),
                                   low_res_steps=moved(self.low_res_steps) if self.low_res_size else 0)

    def record(self, config):
        """`config` (unchanged) as a copy with this plan in its schedule keys, in absolute steps: what config.json
        and checkpoints hold, so that --resume reads back exactly this plan."""
        recorded = copy.deepcopy(config)
        schedule = recorded.schedule
        schedule.steps, schedule.epochs = self.total_steps, None
        schedule.warmup_steps, schedule.warmup_fraction = self.warmup_steps, None
        if self.low_res_size:
            schedule.low_res_steps, schedule.low_res_fraction = self.low_res_steps, 0.0
        return recorded


# ---------------------------------------------------------------------------------------------------------------
# The optimizer.

OPTIMIZERS = ("sgd", "adamw", "muon")
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
    tensor, on GPUs and CPUs alike (on the CPU it makes AdamW's step for ViT-B about 5x faster than foreach).
    'muon' is Muon for the transformer blocks' weight matrices and AdamW for the rest (MuonAdamW)."""
    groups = param_groups(model, optim.weight_decay)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, fused=True)
    if optim.name == "muon":
        return MuonAdamW(model, groups, optim)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=True)


class MuonAdamW:
    """Muon (Jordan et al. 2024: momentum, then the update orthogonalised by Newton-Schulz iterations) for the
    2-D weight matrices inside the transformer blocks, AdamW for everything else: the patch embedding, the head,
    biases, norms and embeddings, as Muon's authors advise. Muon's step is scaled to AdamW's update size
    ('match_rms_adamw', Liu et al. 2025), so both parts share one learning rate and weight decay. It is used as
    one optimizer: param_groups (which the schedule sets the lr of), step, zero_grad, state_dict."""

    def __init__(self, model, groups, optim):
        hidden = {id(p) for name, p in model.named_parameters()
                  if name.startswith("blocks.") and p.ndim == 2 and p.requires_grad}
        adamw_groups = [{**g, "params": [p for p in g["params"] if id(p) not in hidden]} for g in groups]
        matrices = [p for g in groups for p in g["params"] if id(p) in hidden]
        self.muon = torch.optim.Muon(matrices, lr=optim.lr, weight_decay=optim.weight_decay,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW([g for g in adamw_groups if g["params"]], lr=optim.lr,
                                       betas=tuple(optim.betas), fused=True)

    @property
    def param_groups(self):  # the two optimizers' own group dicts, which load_state_dict replaces
        return [*self.muon.param_groups, *self.adamw.param_groups]

    @torch.no_grad()
    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict):
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


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
