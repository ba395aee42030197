"""What a training config is: every key with its default, the names keys take, the recipes that fill them in,
and reading and writing keys by their dotted names. No torch here: the command line reads recipes and lists
choices from this module before it imports anything heavy (vit_train/resolve.py turns flags, recipes and
checkpoints into the validated config a run uses).

`base_config()` below lists every key with its neutral default; a recipe fills in the training choices it is
about (optimizer, learning rate, batch size, length, augmentation). Keys a recipe must set are placeholders
(None until set). The resolved config is written to the run directory as config.json and into every checkpoint.
"""
import ast
import contextlib
import os
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from vit_train.errors import UserError, first_line
from vit_train.models.configs import apply_overrides, get_config

# The recipes: configs/ at the top of a source checkout, which a wheel installs as vit_train/configs/ (pyproject.toml).
PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs" if (PACKAGE_DIR / "configs").is_dir() else PACKAGE_DIR.parent / "configs"
# The recipe used when --config is not given: the reference port's fine-tuning recipe for pretrained weights,
# else the from-scratch one.
DEFAULT_RECIPES = {False: CONFIGS_DIR / "cifar10_scratch.py", True: CONFIGS_DIR / "cifar10_finetune.py"}
# The names some keys take (the modules that act on them import these).
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")   # data.name
NORMALIZATIONS = ("dataset", "inception")                        # data.normalize
PRECISIONS = ("auto", "fp32", "bf16", "fp16")                    # precision
# The keys that hold paths (with the flag that sets each): read as user_path reads them.
PATH_KEYS = {"data.data_dir": "--data-dir (data.data_dir)", "output_dir": "--output-dir (output_dir)",
             "pretrained": "--pretrained (pretrained)", "resume": "--resume (resume)"}
# The splits vit-eval evaluates: the test split, or the training images unaugmented (how well a model fits them).
EVAL_SPLITS = ("test", "train")
# Which weights of a checkpoint the tools use: the EMA average (a run with optim.ema_decay > 0) or the raw ones.
WEIGHTS = ("ema", "raw")


def base_config() -> ml_collections.ConfigDict:
    """Every key of a training config with its default; recipes and flags change them. Locked: no new keys."""
    config = ml_collections.ConfigDict()
    config.model_name = "ViT-B_16"
    config.model = None                                  # the full model config: from model_name, unless the
                                                         # recipe gives one (see recipe_model)
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
        "betas": (0.9, 0.999),                           # adamw, and muon's AdamW part
        "muon_momentum": 0.95,                           # muon
        "muon_ns_steps": 5,                              # muon: Newton-Schulz iterations per step
        "muon_precision": "auto",                        # muon: one of MUON_PRECISIONS; auto: bf16 where native
        "grad_clip": 0.0,                                # max global gradient norm; 0 = no clipping
        "label_smoothing": 0.0,
        "ema_decay": 0.0,                                # weight EMA, e.g. 0.999; 0 = off
    })
    config.schedule = ml_collections.ConfigDict({
        "name": "warmup_cosine",                         # one of SCHEDULES
        "warmup_steps": 0,
        "warmup_fraction": config_dict.placeholder(float),  # instead of warmup_steps: this fraction of the run
        "low_res_size": 0,                               # > 0: train at this image side first (then img_size)
        "low_res_fraction": 0.0,                         # the fraction of the steps trained at low_res_size
        "low_res_steps": config_dict.placeholder(int),   # instead of low_res_fraction: this many first steps
        "all_patches_fraction": 0.0,                     # with model.patch_dropout: the fraction of the steps,
                                                         # the last ones, that train on every patch
        "all_patches_steps": config_dict.placeholder(int),  # instead of all_patches_fraction: this many last steps
        "all_patches_lr": 0.1,                           # the peak lr's factor those steps restart at, decaying to 0
        "decay_from_step": 0,                            # written by a time budget's re-plans (optim.Plan):
        "decay_from": 0.0,                               # the decay's progress at decay_from_step
        "steps": config_dict.placeholder(int),           # optimizer steps; set this or epochs
        "epochs": config_dict.placeholder(int),          # converted to steps once the dataset size is known
    })
    config.time_budget = config_dict.placeholder(str)    # e.g. "10m": the run's steps are planned to fit it
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


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` section of a training config; users override fields with `--set data.X=...`."""
    return ml_collections.ConfigDict({
        "name": "cifar10",            # one of DATASETS
        "data_dir": "./data",         # holds cifar-10-batches-py/, cifar-100-python/, or an image folder tree
        "download": True,             # fetch CIFAR (checksum-verified) when its folder is missing
        "crop_padding": 4,            # random crop after padding by this many pixels; 0 disables the crop
        "all_patches_crop_padding": config_dict.placeholder(int),  # the crop's padding in the steps on every
                                      # patch (schedule.all_patches_*); unset: crop_padding, as the other steps
        "padding_mode": "reflect",    # 'reflect' | 'zeros'
        "hflip": True,
        "alternate_flips": False,     # with hflip: each image flipped in every other epoch (from a random start)
                                      # rather than by a coin each epoch, so each pair of epochs shows it both ways
        "auto_augment": "none",       # 'none' | 'randaugment' | 'trivialaugment' | 'autoaugment' (CIFAR-10 policy)
        "random_erasing": 0.0,        # probability that an image gets a box of noise, after normalisation
        "mixup_alpha": 0.0,           # > 0 enables mixup; with cutmix too, each batch picks one of them 50/50
        "cutmix_alpha": 0.0,
        "repeated_augmentation": 0,   # > 1: each image appears this many times in a row, augmented differently
        "normalize": "dataset",       # 'dataset' (its mean/std) | 'inception' (mean = std = 0.5)
        "num_workers": 2,             # DataLoader workers, imagefolder only
        "folder_in_memory": True,     # imagefolder: decode once and hold on the device when it fits (augmented as
                                      # CIFAR is); False: always DataLoader workers (RandomResizedCrop per image)
        "synthetic_train_size": 2048,
        "synthetic_test_size": 512,
        "synthetic_num_classes": 10,
    })


def recipe_model(name, **overrides) -> ml_collections.ConfigDict:
    """For recipes: the named model's config with flat overrides, e.g. recipe_model("ViT-Ti_4", num_layers=9)."""
    return apply_overrides(get_config(name), **overrides)


def load_recipe(path) -> ml_collections.ConfigDict:
    """The config a recipe file's `get_config()` returns. `path` may also be a bare name from configs/."""
    path = Path(path)
    if path.suffix != ".py" and not path.exists():
        path = CONFIGS_DIR / f"{path}.py"
    if not path.is_file():
        raise UserError(f"recipe {path} not found; give a configs/<recipe>.py file (see {CONFIGS_DIR})")
    namespace = {"__file__": str(path), "__name__": f"recipe_{path.stem}"}
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        if "get_config" not in namespace:
            raise UserError(f"recipe {path} has no get_config() function")
        config = namespace["get_config"]()
    except UserError:
        raise
    except Exception as error:  # a recipe is the user's code: whatever it raises is a mistake in it
        raise UserError(f"recipe {path} failed: {type(error).__name__}: {first_line(error)}") from None
    if not isinstance(config, ml_collections.ConfigDict) or set(config) != set(base_config()):
        raise UserError(f"recipe {path}: get_config() must return vit_train.config.base_config() with changes")
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


BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False,
                 "0": False}


def set_key(config, key, value):
    """Set a dotted key. A string value for a key that does not hold strings is read as a Python literal
    ("0.05", "(4, 4)", "None", "True"; a boolean also as true/false, yes/no, on/off, 1/0), so --set values need no
    quotes; a value of the wrong type is an error."""
    parent, _, leaf = key.rpartition(".")
    node = get_key(config, parent)
    get_key(config, key)  # the leaf must exist too: a typo is an error, not a new key
    if isinstance(value, str) and node.get_type(leaf) is bool and value.strip().lower() in BOOLEAN_WORDS:
        value = BOOLEAN_WORDS[value.strip().lower()]  # as a shell user writes it: true, false, yes, no, on, off
    elif isinstance(value, str) and node.get_type(leaf) is not str:
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            with contextlib.suppress(ValueError):  # 'nan', 'inf': floats, which validation then judges
                value = float(value) if node.get_type(leaf) is float else value
            # otherwise left a string: the assignment below reports the type mismatch
    try:
        node[leaf] = value
    except TypeError:
        kind = {int: "an integer", float: "a number", bool: "True or False", str: "a string",
                tuple: "a tuple such as (0.9, 0.999)"}.get(node.get_type(leaf), f"a {node.get_type(leaf).__name__}")
        raise UserError(f"{key} takes {kind}, not {value!r}") from None


def parse_assignment(text):
    """"optim.weight_decay=0.05" -> ("optim.weight_decay", "0.05"); set_key reads the value."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set takes KEY=VALUE, e.g. optim.weight_decay=0.05; got {text!r}")
    return key.strip(), value


def user_path(text: str, what: str) -> str:
    """A path as the user meant it. '~' is expanded as a shell would have (torchvision expands it in the paths we
    hand it, so our own checks must look at the same place), and an empty path, usually an unset shell variable,
    is refused rather than read as the current folder or as no value at all."""
    if not text:
        raise UserError(f"{what} is an empty path (a shell variable that is not set?); give a path")
    return os.path.expanduser(text)
