"""How the weights move: the run's plan (learning-rate and resolution schedule in absolute optimizer steps), the
optimizer, and the weight EMA. Below config (which validates against OPTIMIZERS and SCHEDULES) and train."""
import copy
import dataclasses
import math

import torch

from vit_train.runtime import fast_bf16

# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedules: a linear warm-up to the peak, then a decay to 0, as a function of the decay's progress
# (0 when the warm-up ends, 1 at the last step), with its inverse (the progress at which the decay is at a factor).

def cosine(progress):
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(progress):
    return 1.0 - progress


DECAYS = {"warmup_cosine": (cosine, lambda factor: math.acos(2.0 * factor - 1.0) / math.pi),
          "warmup_linear": (linear, lambda factor: 1.0 - factor)}
SCHEDULES = tuple(DECAYS)


def warmup_cosine(step, warmup_steps, total_steps):
    """The multiplier of the peak learning rate at optimizer step `step` (0-based): linear warm-up to 1 over
    warmup_steps, then half a cosine down to 0 at total_steps."""
    return Plan("warmup_cosine", total_steps, warmup_steps, img_size=0).lr_factor(step)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's schedule in absolute optimizer steps: its length, its warm-up, how many of its first steps train at
    the low resolution (progressive resizing) and how many of its last on every patch (after patch dropout). A
    value, fixed when made: fractions of the run are turned into steps once, so a run that is re-planned or
    resumed never moves a boundary it has already passed.

    A re-plan (a time budget's) changes the length after the decay began: the decay then goes on from the
    progress it had reached at that step (decay_from, at decay_from_step) to 0 at the new length, so that the
    learning rate never jumps."""
    schedule: str            # one of SCHEDULES
    total_steps: int
    warmup_steps: int
    img_size: int
    low_res_size: int = 0    # 0: no low-resolution phase
    low_res_steps: int = 0   # steps 0..low_res_steps-1 see low_res_size images
    decay_from_step: int = 0
    decay_from: float = 0.0
    all_patches_steps: int = 0     # the last steps train on every patch, patch dropout off
    all_patches_lr: float = 0.0    # the peak lr's factor they restart at

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
        all_patches = schedule.get("all_patches_steps")  # both absent from configs saved before them
        if all_patches is None:
            all_patches = round(schedule.get("all_patches_fraction", 0.0) * total_steps)
        if not config.model.get("patch_dropout", 0.0):  # every step is on every patch: there is no ending to add
            all_patches = 0
        return cls(schedule.name, total_steps, warmup, config.img_size, schedule.low_res_size,
                   min(low_res, total_steps) if schedule.low_res_size else 0, schedule.decay_from_step,
                   schedule.decay_from, min(all_patches, total_steps), schedule.get("all_patches_lr", 0.0))

    @property
    def all_patches_from(self) -> int:
        """The first step on every patch (total_steps when there are none); the main decay reaches 0 there."""
        return self.total_steps - self.all_patches_steps

    def decay_progress(self, step) -> float:
        start = max(self.decay_from_step, self.warmup_steps)
        span = max(1, self.all_patches_from - start)  # the decay ends where the steps on every patch begin
        return self.decay_from + (1.0 - self.decay_from) * min(1.0, (step - start) / span)

    def lr_factor(self, step) -> float:
        """The multiplier of the peak learning rate at optimizer step `step` (0-based). The steps on every patch
        restart at all_patches_lr and decay to 0 as the run's decay does: a short fine-tuning of the network,
        trained on a quarter of its tokens, to the whole sequence it is evaluated on (as FLIP, Li et al. 2023,
        tunes without masking at the end)."""
        decay = DECAYS[self.schedule][0]
        if self.all_patches_steps and step >= self.all_patches_from:
            return self.all_patches_lr * decay(min(1.0, (step - self.all_patches_from) / self.all_patches_steps))
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return decay(self.decay_progress(step))

    def phase(self, step) -> tuple:
        """(image side, every patch?) of step `step`. Progressive resizing: the first low_res_steps see images at
        low_res_size, the rest at img_size. Low-resolution steps cost a fraction as much (a 16-px image has a
        quarter of the patches of a 32-px one), so more epochs fit a time budget; the last steps adapt the network
        to the full resolution it is evaluated at (as Touvron et al. 2019 train low and test high). The last
        all_patches_steps turn patch dropout off, for the same reason."""
        (phase,) = self.phase_steps(step, step + 1)  # the boundaries are phase_steps' alone
        return phase

    def phase_steps(self, first, last) -> dict:
        """{phase: how many of steps first..last-1 are in it}, for the phases that have any."""
        def count(lo, hi):
            return max(0, min(last, hi) - max(first, lo))
        low_res = min(self.low_res_steps, self.all_patches_from)
        counts = {(self.low_res_size, False): count(0, low_res),
                  (self.img_size, False): count(low_res, self.all_patches_from),
                  (self.img_size, True): count(self.all_patches_from, self.total_steps)}
        return {phase: n for phase, n in counts.items() if n > 0}

    def phases(self) -> dict:
        """{phase: the share of the run's steps in it}, for the phases the run has."""
        return {phase: n / self.total_steps for phase, n in self.phase_steps(0, self.total_steps).items()}

    def lengthened(self, total_steps, step) -> "Plan":
        """This plan with a new length, decided at `step`, its learning rate never jumping. After the warm-up, the
        decay goes on from where it is to 0 at the new end. Inside the warm-up, the warm-up goes on as planned
        when the new length reaches its end; when it does not, the warm-up ends at once and the decay starts
        from the factor the warm-up had reached (rather than from the peak). The low-resolution boundary stays
        where it was when reached or still reached; when it no longer is, it keeps its share of the run, so
        that a shortened run still ends at full resolution. The steps on every patch keep their number (as many
        as fit after `step`), so they stay last; once they began, the plan keeps its length."""
        if step >= self.all_patches_from:
            return self
        main_steps = total_steps - min(self.all_patches_steps, total_steps - step)

        def moved(boundary):
            if boundary <= step or boundary < main_steps:
                return boundary
            return max(step, round(boundary * main_steps / self.all_patches_from))
        changes = {"total_steps": total_steps, "all_patches_steps": total_steps - main_steps,
                   "low_res_steps": moved(self.low_res_steps) if self.low_res_size else 0}
        if step >= self.warmup_steps:
            changes.update(decay_from_step=step, decay_from=self.decay_progress(step))
        elif main_steps <= self.warmup_steps:
            changes.update(warmup_steps=step, decay_from_step=step,
                           decay_from=DECAYS[self.schedule][1](self.lr_factor(step)))
        return dataclasses.replace(self, **changes)

    def record(self, config):
        """`config` (unchanged) as a copy with this plan in its schedule keys, in absolute steps: what config.json
        and checkpoints hold, so that --resume reads back exactly this plan."""
        recorded = copy.deepcopy(config)
        schedule = recorded.schedule
        schedule.steps, schedule.epochs = self.total_steps, None
        schedule.warmup_steps, schedule.warmup_fraction = self.warmup_steps, None
        schedule.decay_from_step, schedule.decay_from = self.decay_from_step, self.decay_from
        if self.low_res_size:
            schedule.low_res_steps, schedule.low_res_fraction = self.low_res_steps, 0.0
        schedule.all_patches_steps, schedule.all_patches_fraction = self.all_patches_steps, 0.0
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


def build_optimizer(model, optim, device):
    """SGD or AdamW with fused updates: one kernel for the whole update rather than several passes over every
    tensor, on GPUs and CPUs alike (on the CPU it makes AdamW's step for ViT-B about 5x faster than foreach).
    'muon' is Muon for the transformer blocks' weight matrices and AdamW for the rest (MuonAdamW), its
    orthogonalisation in bf16 where `device` multiplies bf16 in hardware, in fp32 elsewhere (optim.muon_precision)."""
    groups = param_groups(model, optim.weight_decay)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, fused=True)
    if optim.name == "muon":
        return MuonAdamW(model, groups, optim, muon_dtype(optim.muon_precision, device))
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=True)


def load_optimizer_state(optimizer, state_dict):
    """Load a checkpoint's optimizer state, keeping this optimizer's hyperparameters: saved param groups carry the
    settings of the run that wrote them, and a resumed run follows its own config (`--set optim.weight_decay=...`
    with --resume), as its config.json says. The learning rate is the plan's, set before every step."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, own in zip(optimizer.param_groups, settings):
        params = group["params"]
        group.clear()
        group.update(params=params, **own)


MUON_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def muon_dtype(precision, device) -> torch.dtype:
    """The dtype Muon orthogonalises in: 'auto' is bf16 where the device multiplies it in hardware, else fp32
    (an emulated bf16 product is slower than fp32, 40-80x on AVX2 CPUs)."""
    if precision == "auto":
        precision = "bf16" if fast_bf16(device) else "fp32"
    return MUON_PRECISIONS[precision]


# Jordan et al.'s quintic, a x + b x^3 + c x^5 on each singular value: the steepest slope at zero that still
# converges, so that five iterations lift singular values from 1e-3 of the largest into a band around 1
# (about 0.7-1.2) rather than exactly to 1, which trains as well.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrices, steps, dtype, coefficients=NS_COEFFICIENTS, eps=1e-7):
    """Newton-Schulz iterations on a stack of wide matrices (batch, m, n), m <= n, in `dtype`: each matrix keeps
    its singular vectors and has its singular values moved into the iteration's band around 1, approximating the
    orthogonal factor U V^T of its SVD. Divided by its Frobenius norm first, each starts with singular values <= 1.
    One batched product per iteration for the whole stack, rather than one per matrix."""
    a, b, c = coefficients
    x = matrices.to(dtype)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): momentum with a Nesterov look-ahead, the update orthogonalised by Newton-Schulz
    iterations, then scaled to AdamW's update size (0.2 sqrt(max(fan-out, fan-in)), Liu et al. 2025) so that it
    shares AdamW's learning rate and weight decay. The same step as torch.optim.Muon(adjust_lr_fn=
    'match_rms_adamw'), and its state (momentum_buffer) and group keys, so its checkpoints load; differences:

    - the orthogonalisation runs in `dtype` (torch's always casts to bf16, which CPUs without bf16 instructions
      emulate, slower than fp32);
    - matrices of one shape (after turning tall ones wide) are orthogonalised together in batched products;
    - `row_blocks` {param: k} orthogonalises a matrix as k stacked matrices: a fused query-key-value projection
      is three projections, each orthogonalised and scaled as its own 128x128 rather than as one 384x128
      (whose step would be sqrt(3) times larger);
    - under fp16 loss scaling (GradScaler), the step unscales the gradients and skips itself on overflow on the
      device, without reading the overflow flag on the host (_step_supports_amp_scaling)."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr, weight_decay, momentum=0.95, ns_steps=5, dtype=torch.float32, row_blocks=None):
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": True,
                    "ns_coefficients": NS_COEFFICIENTS, "eps": 1e-7, "ns_steps": ns_steps,
                    "adjust_lr_fn": "match_rms_adamw"}
        super().__init__(params, defaults)
        self.dtype, self.row_blocks = dtype, row_blocks or {}

    def by_shape(self, params, updates) -> dict:
        """The matrices as the step orthogonalises them: {(m, n) wide: [(the rows of a parameter, the matching
        block of its update turned wide, whether it was tall)]}, a parameter split into its row_blocks first."""
        grouped = {}
        for param, update in zip(params, updates):
            blocks = self.row_blocks.get(param, 1)
            for rows, block in zip(param.chunk(blocks), update.chunk(blocks)):
                tall = rows.shape[0] > rows.shape[1]
                wide = block.mT if tall else block
                grouped.setdefault(tuple(wide.shape), []).append((rows, wide, tall))
        return grouped

    @torch.no_grad()
    def step(self):
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad if grad_scale is None else p.grad / grad_scale for p in params]
            keep = None
            if found_inf is not None:  # 0 on overflow: every change below is multiplied by it
                keep = (found_inf == 0).to(torch.float32)
                grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
            buffers = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            momentum, lr = group["momentum"], group["lr"]
            if keep is None:
                torch._foreach_lerp_(buffers, grads, 1 - momentum)
            else:
                for buffer, grad in zip(buffers, grads):
                    buffer.lerp_(grad, (1 - momentum) * keep)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            by_shape = self.by_shape(params, updates)
            decay = 1 - lr * group["weight_decay"]
            torch._foreach_mul_(params, decay if keep is None else 1 - (1 - decay) * keep)
            for (m, n), pieces in by_shape.items():
                ortho = orthogonalize(torch.stack([wide for _, wide, _ in pieces]), group["ns_steps"], self.dtype,
                                      group["ns_coefficients"], group["eps"])
                step_size = -lr * 0.2 * math.sqrt(max(m, n))  # match_rms_adamw
                changes = [o.mT if tall else o for o, (_, _, tall) in zip(ortho, pieces)]
                rows = [rows for rows, _, _ in pieces]
                if keep is None:
                    torch._foreach_add_(rows, changes, alpha=step_size)
                else:
                    torch._foreach_add_(rows, torch._foreach_mul(changes, keep * step_size))


class MuonAdamW:
    """Muon for the 2-D weight matrices inside the transformer blocks, AdamW for everything else: the patch
    embedding, the head, biases, norms and embeddings, as Muon's authors advise. Both share one learning rate and
    weight decay. It is used as one optimizer: param_groups (which the schedule sets the lr of), step, zero_grad,
    state_dict; and with GradScaler, whose unscaling and overflow check both parts do on the device."""

    _step_supports_amp_scaling = True

    def __init__(self, model, groups, optim, dtype):
        hidden = {id(p) for name, p in model.named_parameters()
                  if name.startswith("blocks.") and p.ndim == 2 and p.requires_grad}
        adamw_groups = [{**g, "params": [p for p in g["params"] if id(p) not in hidden]} for g in groups]
        matrices = [p for g in groups for p in g["params"] if id(p) in hidden]
        fused_qkv = {p: 3 for name, p in model.named_parameters() if name.endswith(".attn.qkv.weight")}
        self.muon = Muon(matrices, lr=optim.lr, weight_decay=optim.weight_decay, momentum=optim.muon_momentum,
                         ns_steps=optim.muon_ns_steps, dtype=dtype, row_blocks=fused_qkv)
        self.adamw = torch.optim.AdamW([g for g in adamw_groups if g["params"]], lr=optim.lr,
                                       betas=tuple(optim.betas), fused=True)

    @property
    def param_groups(self):  # the two optimizers' own group dicts, which load_state_dict replaces
        return [*self.muon.param_groups, *self.adamw.param_groups]

    @torch.no_grad()
    def step(self):
        for part in (self.muon, self.adamw):  # GradScaler's unscaling and overflow flag, set on this object
            part.grad_scale, part.found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
            part.step()
            del part.grad_scale, part.found_inf

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
