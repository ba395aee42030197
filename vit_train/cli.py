"""Command-line entry points: thin layers over the Python API.

Every entry point is wrapped by `entry_point`, which prints a UserError as one line, `error: <message>`, on
stderr and exits with status 2; `Parser` makes argparse's own usage errors UserErrors too.

    vit-train   train_main: flags -> vit_train.config.resolve_config -> vit_train.train.train
"""
import argparse
import functools
import os
import sys

from vit_train.config import DEFAULT_RECIPES, get_key, load_recipe, resolve_config
from vit_train.data import DATASETS
from vit_train.errors import UserError
from vit_train.models import list_models
from vit_train.train import PRECISIONS, train


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors raised as UserError so that they print in one line like every other error."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def entry_point(main):
    """Wrap `main(argv) -> exit status` so that a UserError prints as one line and exits with status 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as error:
            if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike; say it once
                print(f"error: {error}", file=sys.stderr)
            return 2

    return wrapper


# ---------------------------------------------------------------------------------------------------------------
# vit-train

TRAIN_DESCRIPTION = """\
Train a Vision Transformer on CIFAR-10/100, an image folder or a synthetic set, on the CPU, one GPU, or many
(torchrun --nproc_per_node N -m vit_train.train takes the same flags).

The config is the recipe (--config) + these flags + --set KEY=VALUE for any other key (see config.json in a run
directory for all of them). Defaults below come from the from-scratch recipe; where the fine-tuning recipe,
used with --pretrained, differs, its value is given too. With --resume, the run's saved config is the default."""

TRAIN_EPILOG = """\
examples:
  vit-train --model ViT-B_16 --dataset cifar10
  vit-train --model ViT-B_16 --pretrained ViT-B_16.npz          # fine-tune: SGD, lr 3e-2, 10k steps, 224 px
  vit-train --config cifar100_scratch                          # = configs/cifar100_scratch.py
  vit-train --model testing --dataset synthetic --steps 200 --set optim.weight_decay=0.05
  vit-train --resume runs/NAME
outputs in <output-dir>/<name>/: config.json, last.pt, best.pt, metrics.jsonl, TensorBoard events"""


def train_parser():
    scratch, finetune = (load_recipe(DEFAULT_RECIPES[pretrained]) for pretrained in (False, True))

    def default(key):
        ours, theirs = get_key(scratch, key), get_key(finetune, key)
        shown = [("none" if value is None else value) for value in (ours, theirs)]
        return f"default: {shown[0]}" + ("" if ours == theirs else f"; {shown[1]} with --pretrained")

    parser = Parser(prog="vit-train", description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(name, key, what, default_text=None, **kwargs):
        """A flag that sets config key `key`; None (not given) leaves the recipe's value."""
        parser.add_argument(name, dest=key, default=None, help=f"{what} ({default_text or default(key)})", **kwargs)

    flag("--model", "model_name", "model config name, see --list-models", metavar="NAME")
    flag("--dataset", "data.name", "dataset", choices=DATASETS)
    flag("--data-dir", "data.data_dir", "where the dataset is, or is downloaded to", metavar="DIR")
    flag("--no-download", "data.download", "never download the dataset; read --data-dir as it is",
         "default: download CIFAR when it is missing", action="store_const", const=False)
    flag("--img-size", "img_size", "image side in pixels; images are resized to it", type=int, metavar="PX")
    flag("--batch-size", "batch_size", "global batch per optimizer step, over all processes and micro-batches",
         type=int, metavar="N")
    flag("--grad-accum", "grad_accum", "micro-batches per step, to fit memory; the step's batch stays --batch-size",
         type=int, metavar="N")
    flag("--lr", "optim.lr", "peak learning rate", type=float, metavar="LR")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", dest="schedule.steps", default=None, type=int, metavar="N",
                        help=f"optimizer steps ({default('schedule.steps')})")
    length.add_argument("--epochs", dest="schedule.epochs", default=None, type=int, metavar="N",
                        help=f"passes over the training set, instead of --steps ({default('schedule.epochs')})")
    flag("--warmup-steps", "schedule.warmup_steps", "linear warm-up steps before the cosine decay", type=int,
         metavar="N")
    flag("--eval-every", "eval_every", "steps between evaluations, 0 for only at the end", type=int, metavar="N")
    flag("--save-every", "save_every", "steps between writes of last.pt, 0 for only at the end", type=int,
         metavar="N")
    flag("--seed", "seed", "seed of the weights, data order, augmentation and dropout", type=int, metavar="N")
    flag("--name", "name", "run directory name", "default: <model>_<dataset>_<date>-<time>")
    flag("--output-dir", "output_dir", "where run directories go", metavar="DIR")
    flag("--pretrained", "pretrained", "start from these weights: Google .npz, timm .pth/.safetensors, or a "
         "vit-train checkpoint; selects the fine-tuning recipe", "default: none, train from scratch", metavar="PATH")
    flag("--resume", "resume", "continue the run in RUN_DIR (its last.pt) or from a checkpoint FILE",
         "default: none, start a new run", metavar="RUN_DIR|FILE")
    flag("--device", "device", "auto, cpu, cuda or cuda:N; auto picks the GPU when there is one")
    flag("--precision", "precision", "auto = bf16 autocast on GPUs that support it, else fp16 with loss scaling; "
         "fp32 on the CPU", choices=PRECISIONS)
    flag("--compile", "compile", "wrap the model in torch.compile", "default: off", action="store_const", const=True)
    flag("--quiet", "quiet", "plain progress lines instead of a progress bar", "default: off",
         action="store_const", const=True)
    parser.add_argument("--config", metavar="FILE|NAME", help="recipe file with get_config(), or its name in "
                        "configs/ (default: cifar10_scratch, or cifar10_finetune with --pretrained)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config key, e.g. optim.weight_decay=0.05 or model.transformer.dropout_rate=0; "
                             "repeatable, applied after the flags (default: none)")
    parser.add_argument("--list-models", action="store_true", help="print the model names and exit")
    return parser


def config_from_args(args):
    """The resolved config for parsed vit-train arguments: flags that were given override the recipe."""
    flags = dict(vars(args))
    recipe, sets = flags.pop("config"), flags.pop("set")
    del flags["list_models"]
    return resolve_config({key: value for key, value in flags.items() if value is not None}, sets, recipe)


@entry_point
def train_main(argv=None):
    """vit-train: exit status 0 when the run ends, 128 + the signal number when a signal stopped it."""
    args = train_parser().parse_args(argv)
    if args.list_models:
        print("\n".join(list_models()))
        return 0
    stopped_by = train(config_from_args(args))["stopped_by"]
    return 128 + stopped_by if stopped_by else 0
