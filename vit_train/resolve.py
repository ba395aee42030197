"""The one config a training run uses, resolved once and handed down.

    recipe file (configs/*.py, `get_config()`)   or, with --resume, the config saved in the checkpoint
      + flags (--lr 0.01, ...)                    each flag sets one key, e.g. --lr sets optim.lr
      + --set KEY=VALUE ...                       any other key, e.g. --set optim.weight_decay=0.05
      + the named model's full config            model_name -> model (then --set model.* applies)
      -> validated here, before any data or weights are touched

What the keys are, and the recipes, are in vit_train/config.py; this module adds what needs the rest of the
package: a checkpoint's saved config, the registries keys are checked against, the device and the run folder.
"""
import math
import os
import time
from pathlib import Path

import ml_collections

from vit_train.budget import budget_seconds
from vit_train.checkpoint import (check_no_other_run, check_not_in_use, check_resume_length, checkpoint_path,
                                  folder_creation_error, load_checkpoint)
from vit_train.config import (DEFAULT_RECIPES, PATH_KEYS, PRECISIONS, base_config, get_key, load_recipe,
                              parse_assignment, set_key, user_path)
from vit_train.data.loaders import check_data_config, saved_data_config
from vit_train.errors import UserError, warn
from vit_train.hub import check_weights_source
from vit_train.models.configs import block_parameters, check_config as check_model_config, get_config, patch_stride
from vit_train.optim import MUON_PRECISIONS, OPTIMIZERS, SCHEDULES, Plan
from vit_train.report import flatten
from vit_train.runtime import device_memory, resolve_device

# A resumed run keeps the network and the data it was trained on: these keys, and every model.* key but those of
# regularisation (dropout_rate, attention_dropout_rate, drop_path_rate, patch_dropout), which shape no weight.
# optim.name: the saved state is another optimizer's
FIXED_ON_RESUME = ("model_name", "img_size", "data.name", "optim.name")
REGULARISATION_SUFFIXES = ("_rate", "dropout")
# Keys that give the same thing two ways: setting one clears the others (to the value here, or None), so the one
# given last counts.
ALTERNATIVE_KEYS = [("schedule.steps", "schedule.epochs", "time_budget"),
                    ("schedule.warmup_steps", "schedule.warmup_fraction"),
                    ("schedule.low_res_steps", "schedule.low_res_fraction")]
CLEARED = {"schedule.warmup_steps": 0, "schedule.low_res_fraction": 0.0}
IN_MEMORY = "images held in memory (all but --dataset imagefolder with data.folder_in_memory=False)"


def in_memory(config) -> bool:
    """Whether the run's images are held in memory and cropped from padding there (IN_MEMORY); an image folder
    read by DataLoader workers crops with RandomResizedCrop instead."""
    return config.data.name != "imagefolder" or config.data.folder_in_memory


def has_ending(config) -> bool:
    """Whether the run ends with steps on every patch (any run length does to tell)."""
    return Plan.from_config(config, steps_per_epoch=1, total_steps=1_000_000).all_patches_steps > 0


# Keys that only some runs read, with when: one set in a run that never reads it is named in a warning line.
ONLY_READ_WITH = {
    "optim.momentum": (lambda config: config.optim.name == "sgd", "optim.name=sgd (Muon's is optim.muon_momentum)"),
    **{f"optim.muon_{key}": (lambda config: config.optim.name == "muon", "optim.name=muon")
       for key in ("momentum", "ns_steps", "precision")},
    "optim.betas": (lambda config: config.optim.name != "sgd", "optim.name=adamw or muon"),
    "data.crop_padding": (in_memory, IN_MEMORY),
    "data.all_patches_crop_padding": (lambda config: in_memory(config) and has_ending(config),
                                      f"steps on every patch (schedule.all_patches_*) and {IN_MEMORY}"),
    "data.padding_mode": (lambda config: config.data.crop_padding > 0 and in_memory(config),
                          f"data.crop_padding > 0 and {IN_MEMORY}"),
    "data.download": (lambda config: config.data.name in ("cifar10", "cifar100"), "--dataset cifar10 or cifar100"),
    **{f"data.{key}": (lambda config: config.data.name == "imagefolder", "--dataset imagefolder")
       for key in ("num_workers", "folder_in_memory")},
    **{f"data.synthetic_{key}": (lambda config: config.data.name == "synthetic", "--dataset synthetic")
       for key in ("train_size", "test_size", "num_classes")},
}


def resolve_config(overrides=None, sets=(), recipe=None) -> ml_collections.ConfigDict:
    """The validated config for a run.

    overrides: {dotted key: value} from flags, e.g. {"optim.lr": 0.01, "resume": "runs/x"}.
    sets: "KEY=VALUE" strings from --set, applied after the flags (see set_key for how VALUE is read).
    recipe: a recipe file; by default configs/cifar10_scratch.py, or cifar10_finetune.py with a pretrained model.
    A key set here that this run never reads (ONLY_READ_WITH) is named in a `warning:` line on stderr.
    """
    assignments = [(key, user_path(value, PATH_KEYS[key]) if key in PATH_KEYS and value is not None else value)
                   for key, value in [*(overrides or {}).items(), *map(parse_assignment, sets)]]
    # --set resume=... and --set pretrained=... act as the flags do: they choose where the config comes from.
    given = dict(assignments)
    resume = given.get("resume")
    assignments = [(key, value) for key, value in assignments if key != "resume"]
    if resume:
        if recipe is not None:
            raise UserError("--config cannot be combined with --resume: a resumed run keeps its saved config")
        config, resumed_step = resumed_config(resume)
    else:
        config = load_recipe(DEFAULT_RECIPES[bool(given.get("pretrained"))] if recipe is None
                             else user_path(recipe, "--config"))
    fixed = fixed_on_resume(config) if resume else {}
    if resume:
        check_resume_assignments(config, assignments)
    require("num_classes" not in given, "num_classes is the dataset's number of classes, filled in when it is "
            "read; drop --set num_classes (data.synthetic_num_classes sets the synthetic set's)")
    # model.* keys wait for the model config, which comes from model_name, itself maybe among the assignments.
    for key, value in assignments:
        for alternatives in ALTERNATIVE_KEYS:
            if key in alternatives:
                for other in alternatives:
                    set_key(config, other, CLEARED.get(other))
        if not key.startswith("model."):
            set_key(config, key, value)
    # A recipe may give its own model config (a named model with changes); --model naming another model replaces it.
    if not resume and (config.model is None or config.model.get("name") != config.model_name):
        config.model = get_config(config.model_name)
    for key, value in assignments:
        if key.startswith("model."):
            set_key(config, key, value)
    for key, value in fixed.items():
        require(get_key(config, key) == value, f"{key} cannot change when resuming ({value!r} in {resume})")
    if resume and config.schedule.steps is not None:  # before the run claims its folder (--epochs: once data is read)
        check_resume_length(config.resume, resumed_step, config.schedule.steps)
    for key in PATH_KEYS:  # a recipe's paths too (a saved empty path, from before they were refused, stays)
        if get_key(config, key):
            set_key(config, key, os.path.expanduser(get_key(config, key)))
    if config.name is None:
        config.name = f"{config.model_name}_{config.data.name}_{time.strftime('%Y%m%d-%H%M%S')}"
    validate(config)
    for key in sorted({key for key, _ in assignments} & set(ONLY_READ_WITH)):
        is_read, when = ONLY_READ_WITH[key]
        if not is_read(config):
            warn(f"{key} is read only with {when}; in this run it does nothing")
    return config


def check_resume_assignments(config, assignments):
    """A resumed run continues in its own folder, from its own weights, with the steps it planned: refuse flags
    that would send it elsewhere or that it would ignore, rather than record them as if they had been used."""
    for key, value in assignments:
        if key in ("name", "output_dir") and value is not None:
            here = Path(config.output_dir) / config.name
            there = Path(value) / config.name if key == "output_dir" else Path(config.output_dir) / value
            require(there.resolve() == here.resolve(),
                    f"--resume continues the run in {here}; --{key.replace('_', '-')} {value} would write another "
                    f"run's folder. Copy the folder first to branch it off")
        require(key != "pretrained" or not value,
                "--pretrained is not used when resuming: the weights come from the checkpoint; drop the flag")
        planned_by = "the steps its time budget planned" if config.time_budget else "its --steps or --epochs"
        require(key != "time_budget" or not value,
                f"a resumed run keeps its length, {planned_by}; give --steps N to change it")


def fixed_on_resume(config) -> dict:
    """{dotted key: value} of what a resumed run cannot change (see FIXED_ON_RESUME): checked before the
    checkpoint's weights are loaded, so a changed network is one line rather than a load_state_dict dump."""
    fixed = {key: get_key(config, key) for key in FIXED_ON_RESUME}
    fixed.update((f"model.{key}", value) for key, value in flatten(config.model).items()
                 if not key.endswith(REGULARISATION_SUFFIXES))
    return fixed


def pretrained_config(model_name, img_size=None) -> ml_collections.ConfigDict:
    """The config foreign weights are evaluated with: vit-train's fine-tuning recipe (224 px, inputs scaled to
    [-1, 1] as Google's checkpoints expect) for the named model."""
    config = load_recipe(DEFAULT_RECIPES[True])
    config.model_name = model_name
    config.model = get_config(model_name)
    config.img_size = config.img_size if img_size is None else img_size
    return config


def resumed_config(resume) -> tuple:
    """(the config saved in a checkpoint, pointed at it, the checkpoint's step); the run continues in the
    checkpoint's directory."""
    path = checkpoint_path(resume)
    check_not_in_use(path.parent, resuming=True)  # a run still going, maybe before its first last.pt
    config = base_config()  # keys added since the checkpoint was written keep their defaults (features off)
    checkpoint = load_checkpoint(path)
    saved = checkpoint["config"]
    config.update(saved)
    config.data = saved_data_config(saved["data"])
    config.output_dir, config.name, config.resume = str(path.parent.parent), path.parent.name, str(path)
    config.lock()
    return config, checkpoint["step"]


def require(ok, message):
    if not ok:
        raise UserError(message)


def validate(config):
    """Reject a config that cannot run, or a setting that would do nothing, in one line each, before anything is
    written or anything heavy starts."""
    check_data_config(config.data)
    check_model_config(config.model, config.img_size)
    optim, schedule = config.optim, config.schedule
    for key in ("batch_size", "optim.name", "optim.lr"):
        require(get_key(config, key) is not None,
                f"{key} is not set: the recipe must set it, or give it as a flag or with --set")
    require(schedule.steps is not None or schedule.epochs is not None or config.time_budget is not None,
            "give --steps, --epochs or --time-budget")
    if config.time_budget is not None:
        budget_seconds(config.time_budget)
    if schedule.low_res_size:
        require(0 < schedule.low_res_size < config.img_size,
                f"schedule.low_res_size must be between 0 and the image size {config.img_size}, got "
                f"{schedule.low_res_size}")
        stride = patch_stride(config.model)
        require(schedule.low_res_size % stride == 0,
                f"schedule.low_res_size {schedule.low_res_size} does not split into whole {stride}-pixel patches "
                f"of {config.model_name}; give a multiple of {stride}")
    else:
        require(schedule.low_res_fraction == 0 and not schedule.low_res_steps,
                "schedule.low_res_fraction and low_res_steps need schedule.low_res_size, the side to train at "
                "first; set it too, or leave them at 0")
    require(0 <= schedule.low_res_fraction < 1,
            f"schedule.low_res_fraction must be in [0, 1): the last steps train at the full image size; got "
            f"{schedule.low_res_fraction}")
    require(schedule.low_res_steps is None or schedule.low_res_steps >= 0,
            f"schedule.low_res_steps must be >= 0, got {schedule.low_res_steps}")
    require(schedule.low_res_steps is None or schedule.steps is not None or config.time_budget is None,
            "a --time-budget run plans its own length: give schedule.low_res_fraction, not schedule.low_res_steps")
    require(schedule.all_patches_steps is None or schedule.all_patches_steps >= 0,
            f"schedule.all_patches_steps must be >= 0, got {schedule.all_patches_steps}")
    require(schedule.all_patches_steps is None or schedule.steps is not None or config.time_budget is None,
            "a --time-budget run plans its own length: give schedule.all_patches_fraction, not "
            "schedule.all_patches_steps")
    require(math.isfinite(schedule.all_patches_lr) and 0 < schedule.all_patches_lr <= 1,
            "schedule.all_patches_lr is a factor of the peak learning rate, in (0, 1]; got "
            f"{schedule.all_patches_lr}")
    for what, value in {"optim.ema_decay": optim.ema_decay, "schedule.decay_from": schedule.decay_from,
                        "schedule.warmup_fraction": schedule.warmup_fraction,
                        "schedule.all_patches_fraction": schedule.all_patches_fraction}.items():
        require(value is None or 0 <= value < 1, f"{what} must be in [0, 1), got {value}")
    require(optim.name in OPTIMIZERS, f"unknown optimizer {optim.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    require(schedule.name in SCHEDULES, f"unknown schedule {schedule.name!r}; choose one of {', '.join(SCHEDULES)}")
    require(config.precision in PRECISIONS,
            f"unknown precision {config.precision!r}; choose one of {', '.join(PRECISIONS)}")
    require(math.isfinite(optim.lr) and optim.lr > 0, f"the learning rate (--lr) must be positive, got {optim.lr}")
    for what, value in {"--steps": schedule.steps, "--epochs": schedule.epochs, "--batch-size": config.batch_size,
                        "eval_batch_size": config.eval_batch_size, "--grad-accum": config.grad_accum,
                        "log_every": config.log_every}.items():
        require(value is None or value > 0, f"{what} must be positive, got {value}")
    # (nan fails every comparison, so `value >= 0` refuses it; inf needs saying)
    for what, value in {"optim.weight_decay": optim.weight_decay, "optim.grad_clip": optim.grad_clip,
                        "optim.momentum": optim.momentum, "--warmup-steps": schedule.warmup_steps,
                        "schedule.decay_from_step": schedule.decay_from_step,
                        "--eval-every": config.eval_every, "--save-every": config.save_every}.items():
        require(math.isfinite(value) and value >= 0, f"{what} must be a finite number >= 0, got {value}")
    require(len(optim.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in optim.betas),
            f"optim.betas must be two numbers in [0, 1), as (0.9, 0.999); got {tuple(optim.betas)}")
    require(optim.muon_precision in ("auto", *MUON_PRECISIONS),
            f"unknown optim.muon_precision {optim.muon_precision!r}; choose one of auto, {', '.join(MUON_PRECISIONS)}")
    require(isinstance(optim.muon_ns_steps, int) and 1 <= optim.muon_ns_steps <= 20,
            f"optim.muon_ns_steps must be an integer in 1..20 (5 is usual), got {optim.muon_ns_steps}")
    require(0 <= optim.muon_momentum < 1, f"optim.muon_momentum must be in [0, 1), got {optim.muon_momentum}")
    require(0 <= optim.label_smoothing < 1, f"optim.label_smoothing must be in [0, 1), got {optim.label_smoothing}")
    require(config.data.repeated_augmentation <= config.batch_size,
            f"data.repeated_augmentation {config.data.repeated_augmentation} repeats each image more times than "
            f"a batch of {config.batch_size} holds, so a batch would see one image; DeiT uses 3")
    for key, value in flatten(config).items():  # inf or nan in any other key (a strength, a rate) is never meant
        require(not isinstance(value, float) or math.isfinite(value), f"{key} must be a finite number, got {value}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    # Process r seeds numpy's global generator with seed + r, and np.random.seed takes 0..2**32 - 1 only.
    require(0 <= config.seed <= 2**32 - world_size, f"--seed must be in 0..{2**32 - world_size}, got {config.seed}")
    check_folder_name(config.name)
    require("\0" not in config.output_dir, f"--output-dir {config.output_dir!r} holds a NUL character")
    require(config.batch_size % (config.grad_accum * world_size) == 0,
            f"batch size {config.batch_size} is not divisible by grad accumulation {config.grad_accum} x "
            f"{world_size} processes; the step's batch must split evenly")
    device = resolve_device(config.device)
    # Training holds at least weights, gradients and one optimizer state per parameter, 4 bytes each.
    parameters = block_parameters(config.model)
    need, have = 12 * parameters, device_memory(device)
    require(need <= have, f"{config.model_name} with these sizes has over {parameters:.2g} "
            f"parameters: training needs at least {need / 2**30:.3g} GiB (weights, gradients, optimizer state), more "
            f"than the {have / 2**30:.3g} GiB of {device}; choose a smaller --model or model.* sizes")
    if config.pretrained and not config.resume:
        check_weights_source(config.pretrained, config.model_name)
    check_run_dir(Path(config.output_dir) / config.name, resuming=bool(config.resume))


def check_folder_name(name):
    """The run name becomes one folder: not empty, '.' or '..', no '/' or NUL, at most 255 bytes (NAME_MAX)."""
    require(name not in ("", ".", "..") and "/" not in name and "\0" not in name and len(name.encode()) <= 255,
            f"--name {name!r} cannot be a folder name: give a name without '/' (at most 255 bytes), not '.' or '..'")


def check_run_dir(run_dir: Path, resuming: bool):
    """The run directory must be creatable and writable, and must not hold another run we would overwrite."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} exists and is not a directory; choose another --output-dir/--name")
    check_not_in_use(run_dir, resuming)
    check_no_other_run(run_dir, resuming)
    if why := folder_creation_error(run_dir):
        raise UserError(f"cannot write the run directory {run_dir}: {why}")
