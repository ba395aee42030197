"""The one config a training run uses, resolved once and handed down.

    recipe file (configs/*.py, `get_config()`)   or, with --resume, the config saved in the checkpoint
      + flags (--lr 0.01, ...)                    each flag sets one key, e.g. --lr sets optim.lr
      + --set KEY=VALUE ...                       any other key, e.g. --set optim.weight_decay=0.05
      + the named model's full config            model_name -> model (then --set model.* applies)
      -> validated here, before any data or weights are touched

`base_config()` below lists every key with its neutral default; a recipe fills in the training choices it is
about (optimizer, learning rate, batch size, length, augmentation). Keys a recipe must set are placeholders
(None until set). The resolved config is written to the run directory as config.json and into every checkpoint.
"""
import ast
import os
import time
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from vit_train.checkpoint import checkpoint_path, load_checkpoint
from vit_train.data import check_data_config, default_data_config
from vit_train.errors import UserError
from vit_train.models import get_config
from vit_train.models.vit import check_config as check_model_config
from vit_train.runtime import PRECISIONS, resolve_device
from vit_train.train import OPTIMIZERS, SCHEDULES

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
# The recipe used when --config is not given: the reference port's fine-tuning recipe for pretrained weights,
# else the from-scratch one.
DEFAULT_RECIPES = {False: CONFIGS_DIR / "cifar10_scratch.py", True: CONFIGS_DIR / "cifar10_finetune.py"}
# A resumed run keeps the network and the data it was trained on.
FIXED_ON_RESUME = ("model_name", "img_size", "data.name")
LENGTH_KEYS = ("schedule.steps", "schedule.epochs")


def base_config() -> ml_collections.ConfigDict:
    """Every key of a training config with its default; recipes and flags change them. Locked: no new keys."""
    config = ml_collections.ConfigDict()
    config.model_name = "ViT-B_16"
    config.model = None                                  # the full model config, filled from model_name
    config.img_size = 32                                 # images are resized to img_size x img_size
    config.num_classes = config_dict.placeholder(int)    # filled from the dataset
    config.data = default_data_config()
    config.batch_size = config_dict.placeholder(int)     # global: per process x processes, split by grad_accum
    config.eval_batch_size = 512                         # per process
    config.grad_accum = 1                                # micro-batches per step; the step's batch stays batch_size
    config.optim = ml_collections.ConfigDict({
        "name": config_dict.placeholder(str),            # one of OPTIMIZERS
        "lr": config_dict.placeholder(float),            # peak learning rate, reached after the warm-up
        "weight_decay": 0.0,                             # decoupled for adamw; never on biases, norms, pos/cls
        "momentum": 0.9,                                 # sgd
        "betas": (0.9, 0.999),                           # adamw
        "grad_clip": 0.0,                                # max global gradient norm; 0 = no clipping
        "label_smoothing": 0.0,
    })
    config.schedule = ml_collections.ConfigDict({
        "name": "warmup_cosine",                         # one of SCHEDULES
        "warmup_steps": 0,
        "steps": config_dict.placeholder(int),           # optimizer steps; set this or epochs
        "epochs": config_dict.placeholder(int),          # converted to steps once the dataset size is known
    })
    config.seed = 0
    config.name = config_dict.placeholder(str)           # run directory name; default <model>_<dataset>_<time>
    config.output_dir = "runs"
    config.pretrained = config_dict.placeholder(str)     # weights to start from (.npz, .pth, .safetensors)
    config.resume = config_dict.placeholder(str)         # checkpoint the run continues from
    config.device = "auto"                               # auto = cuda if available, else cpu
    config.precision = "auto"                            # one of PRECISIONS; auto = bf16/fp16 on CUDA, fp32 on CPU
    config.compile = False                               # torch.compile the model
    config.eval_every = 1000                             # steps between evaluations; 0 = only at the end
    config.save_every = 1000                             # steps between writes of last.pt; 0 = only at the end
    config.log_every = 50                                # steps between progress lines and TensorBoard points
    config.quiet = False                                 # plain progress lines instead of a progress bar
    config.lock()
    return config


def load_recipe(path) -> ml_collections.ConfigDict:
    """The config a recipe file's `get_config()` returns. `path` may also be a bare name from configs/."""
    path = Path(path)
    if path.suffix != ".py" and not path.exists():
        path = CONFIGS_DIR / f"{path}.py"
    if not path.is_file():
        raise UserError(f"recipe {path} not found; give a configs/<recipe>.py file (see {CONFIGS_DIR})")
    namespace = {"__file__": str(path), "__name__": f"recipe_{path.stem}"}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    if "get_config" not in namespace:
        raise UserError(f"recipe {path} has no get_config() function")
    return namespace["get_config"]()


def resolve_config(overrides=None, sets=(), recipe=None) -> ml_collections.ConfigDict:
    """The validated config for a run.

    overrides: {dotted key: value} from flags, e.g. {"optim.lr": 0.01, "resume": "runs/x"}.
    sets: "KEY=VALUE" strings from --set, applied after the flags (see set_key for how VALUE is read).
    recipe: a recipe file; by default configs/cifar10_scratch.py, or cifar10_finetune.py with a pretrained model.
    """
    overrides = dict(overrides or {})
    resume = overrides.pop("resume", None)
    if resume:
        if recipe:
            raise UserError("--config cannot be combined with --resume: a resumed run keeps its saved config")
        config = resumed_config(resume)
    else:
        config = load_recipe(recipe or DEFAULT_RECIPES[bool(overrides.get("pretrained"))])
    assignments = [*overrides.items(), *map(parse_assignment, sets)]
    fixed = {key: get_key(config, key) for key in FIXED_ON_RESUME} if resume else {}
    # model.* keys wait for the model config, which comes from model_name, itself maybe among the assignments.
    for key, value in assignments:
        if key in LENGTH_KEYS:  # two ways to give the run's length: the one given last replaces the other
            for other in LENGTH_KEYS:
                set_key(config, other, None)
        if not key.startswith("model."):
            set_key(config, key, value)
    if not resume:
        config.model = get_config(config.model_name)
    for key, value in assignments:
        if key.startswith("model."):
            set_key(config, key, value)
    for key, value in fixed.items():
        require(get_key(config, key) == value, f"{key} cannot change when resuming ({value!r} in {resume})")
    if config.name is None:
        config.name = f"{config.model_name}_{config.data.name}_{time.strftime('%Y%m%d-%H%M%S')}"
    validate(config)
    return config


def pretrained_config(model_name, img_size=None) -> ml_collections.ConfigDict:
    """The config foreign weights are evaluated with: vit-train's fine-tuning recipe (224 px, inputs scaled to
    [-1, 1] as Google's checkpoints expect) for the named model."""
    config = load_recipe(DEFAULT_RECIPES[True])
    config.model_name = model_name
    config.model = get_config(model_name)
    config.img_size = img_size or config.img_size
    return config



def resumed_config(resume) -> ml_collections.ConfigDict:
    """The config saved in a checkpoint, pointed at it; the run continues in the checkpoint's directory."""
    path = checkpoint_path(resume)
    config = ml_collections.ConfigDict(load_checkpoint(path)["config"])
    config.output_dir, config.name, config.resume = str(path.parent.parent), path.parent.name, str(path)
    config.lock()
    return config


def get_key(config, key):
    """config["a"]["b"] for key "a.b" ("" is the config itself); an unknown key is a UserError."""
    node = config
    for depth, part in enumerate(filter(None, key.split("."))):
        if not isinstance(node, ml_collections.ConfigDict):
            raise UserError(f"unknown config key {key!r}: {'.'.join(key.split('.')[:depth])} holds no keys")
        if part not in node:
            where = ".".join(key.split(".")[:depth]) or "the top level"
            raise UserError(f"unknown config key {key!r}; the keys at {where} are {', '.join(node)}")
        node = node[part]
    return node


def set_key(config, key, value):
    """Set a dotted key. A string value for a key that does not hold strings is read as a Python literal
    ("0.05", "(4, 4)", "None", "True"), so --set values need no quotes; a value of the wrong type is an error."""
    parent, _, leaf = key.rpartition(".")
    node = get_key(config, parent)
    get_key(config, key)  # the leaf must exist too: a typo is an error, not a new key
    if isinstance(value, str) and node.get_type(leaf) is not str:
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # left a string: the assignment below reports the type mismatch
    try:
        node[leaf] = value
    except TypeError:
        raise UserError(f"{key} takes a {node.get_type(leaf).__name__}, not {value!r}") from None


def parse_assignment(text):
    """"optim.weight_decay=0.05" -> ("optim.weight_decay", "0.05"); set_key reads the value."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set takes KEY=VALUE, e.g. optim.weight_decay=0.05; got {text!r}")
    return key.strip(), value


def require(ok, message):
    if not ok:
        raise UserError(message)


def validate(config):
    """Reject a config that cannot run, in one line each, before anything heavy starts."""
    check_data_config(config.data)
    check_model_config(config.model, config.img_size)
    optim, schedule = config.optim, config.schedule
    for key in ("batch_size", "optim.name", "optim.lr"):
        require(get_key(config, key) is not None,
                f"{key} is not set: the recipe must set it, or give it as a flag or with --set")
    require(schedule.steps is not None or schedule.epochs is not None, "give --steps or --epochs")
    require(optim.name in OPTIMIZERS, f"unknown optimizer {optim.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    require(schedule.name in SCHEDULES, f"unknown schedule {schedule.name!r}; choose one of {', '.join(SCHEDULES)}")
    require(config.precision in PRECISIONS,
            f"unknown precision {config.precision!r}; choose one of {', '.join(PRECISIONS)}")
    require(optim.lr > 0, f"the learning rate (--lr) must be positive, got {optim.lr}")
    for what, value in {"--steps": schedule.steps, "--epochs": schedule.epochs, "--batch-size": config.batch_size,
                        "eval_batch_size": config.eval_batch_size, "--grad-accum": config.grad_accum,
                        "log_every": config.log_every}.items():
        require(value is None or value > 0, f"{what} must be positive, got {value}")
    for what, value in {"optim.weight_decay": optim.weight_decay, "optim.grad_clip": optim.grad_clip,
                        "--warmup-steps": schedule.warmup_steps, "--eval-every": config.eval_every,
                        "--save-every": config.save_every, "--seed": config.seed}.items():
        require(value >= 0, f"{what} must be >= 0, got {value}")
    require(0 <= optim.label_smoothing < 1, f"optim.label_smoothing must be in [0, 1), got {optim.label_smoothing}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    require(config.batch_size % (config.grad_accum * world_size) == 0,
            f"batch size {config.batch_size} is not divisible by grad accumulation {config.grad_accum} x "
            f"{world_size} processes; the step's batch must split evenly")
    resolve_device(config.device)
    require(not config.pretrained or config.resume or Path(config.pretrained).is_file(),
            f"pretrained weights {config.pretrained} not found")
    check_run_dir(Path(config.output_dir) / config.name, resuming=bool(config.resume))


def check_run_dir(run_dir: Path, resuming: bool):
    """The run directory must be creatable and writable, and must not hold another run we would overwrite."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} exists and is not a directory; choose another --output-dir/--name")
    if (run_dir / "last.pt").exists() and not resuming:
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --name")
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the run directory {run_dir}: {existing} is not a writable directory")
