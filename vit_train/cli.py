"""Command-line entry points: thin layers over the Python API.

Every entry point is wrapped by `entry_point`, which prints a UserError as one line, `error: <message>`, on
stderr and exits with status 2; `Parser` makes argparse's own usage errors UserErrors too.

    vit-train   train_main: flags -> vit_train.resolve.resolve_config -> vit_train.train.train
    vit-eval, vit-predict, vit-attention, vit-export
                eval_main, predict_main, attention_main, export_main: checkpoint -> vit_train.evaluate,
                vit_train.predict (predictions, attention), vit_train.export

The parsers need only torch-free modules (the config's keys, recipes and names: vit_train/config.py). Each command
imports the modules that do its work, and with them torch, after its arguments parse: --help, --version and
usage errors answer in a fraction of a second instead of the seconds torch takes to import. These are the only
imports inside functions in the package (tests/test_layout.py).
"""
import argparse
import functools
import os
import signal
import sys

from vit_train import __version__
from vit_train.config import (DATASETS, DEFAULT_RECIPES, EVAL_SPLITS, NORMALIZATIONS, PRECISIONS, WEIGHTS, get_key,
                              load_recipe, user_path)
from vit_train.errors import UserError
from vit_train.models import list_models


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors raised as UserError so that they print in one line like every other error, and
    without abbreviated flags: `--batch 64` is an error, not a silent `--batch-size 64` (nor, once another flag
    starts with --batch, a different error)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)
        self.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def path(flag):
    """argparse type of a path flag: '~' expanded, an empty path refused (config.user_path)."""
    return functools.partial(user_path, what=flag)


def entry_point(main):
    """Wrap `main(argv) -> exit status` so that a UserError prints as one line and exits with status 2, and
    Ctrl-C exits with status 130 without a traceback."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as error:
            if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike; say it once
                print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C (for vit-train the second one, which stops at once): no traceback
            return 128 + signal.SIGINT

    return wrapper


# ---------------------------------------------------------------------------------------------------------------
# vit-train

TRAIN_DESCRIPTION = """\
Train a Vision Transformer on CIFAR-10/100, an image folder or a synthetic set, on the CPU, one GPU, or many
(torchrun --nproc_per_node N -m vit_train takes the same flags).

The config is the recipe (--config) + these flags + --set KEY=VALUE for any other key (see config.json in a run
directory for all of them). Defaults below come from the from-scratch recipe; where the fine-tuning recipe,
used with --pretrained, differs, its value is given too. With --resume, the run's saved config is the default."""

TRAIN_EPILOG = """\
examples:
  vit-train --model ViT-B_16 --dataset cifar10
  vit-train --model ViT-B_16 --pretrained ViT-B_16.npz          # fine-tune: SGD, lr 3e-2, 10k steps, 224 px
  vit-train --pretrained ViT-B_16-i21k                         # the same with Google's file, downloaded once
  vit-train --config cifar100_scratch                          # = configs/cifar100_scratch.py
  vit-train --model testing --dataset synthetic --steps 200 --warmup-steps 20 --set optim.weight_decay=0.05
  vit-train --resume runs/NAME
outputs in <output-dir>/<name>/: config.json, last.pt, best.pt, metrics.jsonl, TensorBoard events"""


PRECISION_HELP = ("auto = bf16 autocast on GPUs that support it, else fp16 with loss scaling; on a CPU, bf16 "
                  "autocast where it has bf16 instructions (AVX512-BF16, AMX), else fp32")


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
    length.add_argument("--time-budget", dest="time_budget", default=None, metavar="DURATION",
                        help="train for as many steps as fit in this time, e.g. 90s, 10m, 2h (a bare number is "
                             "seconds): a few steps are timed, "
                             "then the whole schedule (warm-up, decay to zero, evaluations) is planned to end within "
                             "it, and re-planned as it goes, from a fifth of the steps on, from their real time; "
                             "--resume keeps the planned steps (default: none)")
    flag("--warmup-steps", "schedule.warmup_steps", "linear warm-up steps before the cosine decay", type=int,
         metavar="N")
    flag("--eval-every", "eval_every", "steps between evaluations, 0 for only at the end", type=int, metavar="N")
    flag("--save-every", "save_every", "steps between writes of last.pt, 0 for only at the end", type=int,
         metavar="N")
    flag("--seed", "seed", "seed of the weights, data order, augmentation and dropout", type=int, metavar="N")
    flag("--name", "name", "run directory name", "default: <model>_<dataset>_<date>-<time>")
    flag("--output-dir", "output_dir", "where run directories go", metavar="DIR")
    flag("--pretrained", "pretrained", "start from these weights: Google .npz, timm .pth/.safetensors, a "
         "vit-train checkpoint, or the name of a Google release (see --list-pretrained), downloaded into the cache on "
         "first use; selects the fine-tuning recipe", "default: none, train from scratch", metavar="PATH|NAME")
    flag("--resume", "resume", "continue the run in RUN_DIR (its last.pt) or from a checkpoint FILE; exactly where "
         "the images are held in memory (CIFAR, synthetic, image folders decoded in memory), with new random crops "
         "where DataLoader workers read an image folder (docs/data-edges.md)",
         "default: none, start a new run", metavar="RUN_DIR|FILE")
    flag("--device", "device", "auto, cpu, cuda or cuda:N; auto picks the GPU when there is one")
    flag("--precision", "precision", PRECISION_HELP, choices=PRECISIONS)
    flag("--compile", "compile", "wrap the model in torch.compile", "default: off", action="store_const", const=True)
    flag("--quiet", "quiet", "plain progress lines instead of a progress bar", "default: off",
         action="store_const", const=True)
    parser.add_argument("--config", metavar="FILE|NAME", help="recipe file with get_config(), or its name in "
                        "configs/ (default: cifar10_scratch, or cifar10_finetune with --pretrained)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config key, e.g. optim.weight_decay=0.05 or model.transformer.dropout_rate=0; "
                             "repeatable, applied after the flags (default: none)")
    parser.add_argument("--list-models", action="store_true", help="print the model names and exit")
    add_list_pretrained_flag(parser)
    return parser


def add_list_pretrained_flag(parser):
    parser.add_argument("--list-pretrained", action="store_true", help="print the names --pretrained takes for "
                        "Google's released weights (model, training data, size, URL, whether cached) and exit")


@entry_point
def train_main(argv=None):
    """vit-train: exit status 0 when the run ends, 128 + the signal number when a signal stopped it."""
    args = train_parser().parse_args(argv)
    if args.list_models:
        print("\n".join(list_models()))
        return 0
    from vit_train.hub import format_releases
    if args.list_pretrained:
        print(format_releases())
        return 0
    from vit_train.resolve import resolve_config
    from vit_train.train import train
    flags = dict(vars(args))
    recipe, sets = flags.pop("config"), flags.pop("set")
    del flags["list_models"], flags["list_pretrained"]
    config = resolve_config({key: value for key, value in flags.items() if value is not None}, sets, recipe)
    stopped_by = train(config)["stopped_by"]
    return 128 + stopped_by if stopped_by else 0


# ---------------------------------------------------------------------------------------------------------------
# vit-eval, vit-predict, vit-attention, vit-export: looking at a trained model (vit_train/evaluate.py, predict.py,
# export.py)

def add_checkpoint_flag(parser, required=True):
    parser.add_argument("--checkpoint", required=required, metavar="RUN_DIR|FILE", type=path("--checkpoint"),
                        help="a vit-train checkpoint: a run directory (its last.pt) or a .pt file such as best.pt")


def add_weights_flag(parser):
    parser.add_argument("--weights", choices=WEIGHTS, help="which weights of the checkpoint: the EMA "
                        "average (optim.ema_decay) or the raw ones (default: ema when the run kept one, else raw)")


def add_device_flag(parser):
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto, the GPU when "
                                                         "there is one)")


EVAL_DESCRIPTION = """\
Evaluate a model on its dataset's test split: top-1 and top-5 accuracy, loss, per-class accuracy and the
confusion matrix (with --split train, on its training images, unaugmented: how well it fits them). The model,
image size, data config and precision come from the checkpoint (flags below override the data), so the test
accuracy is the one vit-train logged for that checkpoint. Foreign weights (Google
.npz, timm .pth/.safetensors) are evaluated with --model and --pretrained instead, as the fine-tuning recipe
sees data (224 px, inputs scaled to [-1, 1]); their head must have one output per class of the dataset."""

EVAL_EPILOG = """\
examples:
  vit-eval --checkpoint runs/NAME                        # last.pt of a run
  vit-eval --checkpoint runs/NAME/best.pt --json eval.json --plot confusion.png
  vit-eval --checkpoint runs/NAME --split train          # its fit: accuracy on the training images
  vit-eval --model ViT-B_16 --pretrained ViT-B_16_cifar10.npz --dataset cifar10
  vit-eval --list-pretrained                             # names of Google's releases --pretrained takes"""


def eval_parser():
    parser = Parser(prog="vit-eval", description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flag(parser, required=False)
    add_weights_flag(parser)
    parser.add_argument("--model", metavar="NAME", help="with --pretrained: the weights' model config name")
    parser.add_argument("--pretrained", metavar="PATH|NAME", type=path("--pretrained"), help="evaluate these "
                        "weights instead of a checkpoint: a file, or the name of a Google release (see "
                        "--list-pretrained)")
    add_list_pretrained_flag(parser)
    parser.add_argument("--img-size", type=int, metavar="PX", help="with --pretrained: image side (default: 224)")
    parser.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's (cifar10 with --pretrained)")
    parser.add_argument("--data-dir", metavar="DIR", type=path("--data-dir"),
                        help="where the dataset is (default: the checkpoint's, ./data)")
    parser.add_argument("--no-download", action="store_true", help="never download the dataset")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, help="input normalisation: the dataset's mean and "
                        "std, or inception's [-1, 1] (default: the checkpoint's; inception with --pretrained)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="evaluation batch (default: the checkpoint's)")
    parser.add_argument("--split", choices=EVAL_SPLITS, default="test", help="the test split, or the training "
                        "images, unaugmented and seen as the test split is (default: test)")
    parser.add_argument("--flip-average", action="store_true", help="average each test image's logits with its "
                        "mirror image's (test-time augmentation, twice the work); without it, the accuracy is the "
                        "single view training logs")
    add_device_flag(parser)
    parser.add_argument("--precision", choices=PRECISIONS, help=f"{PRECISION_HELP} (default: the checkpoint's, "
                        "which reproduces the accuracy training logged; auto with --pretrained)")
    parser.add_argument("--json", metavar="FILE", type=path("--json"), help="also write the metrics as JSON: "
                        "accuracy, top5_accuracy, loss, per_class_accuracy, confusion_matrix (rows: true class), "
                        "num_samples, class_names, split, flip_average")
    parser.add_argument("--plot", metavar="FILE.png", type=path("--plot"), help="also draw the confusion matrix "
                        "(needs matplotlib: pip install 'vit-train[plot]')")
    return parser


def apply_eval_flags(config, args):
    """--dataset, --data-dir, --no-download, --normalize, --batch-size and --precision replace the config's values."""
    if args.dataset:
        config.data.name = args.dataset
    if args.normalize:
        config.data.normalize = args.normalize
    if args.data_dir:
        config.data.data_dir = args.data_dir
    if args.no_download:
        config.data.download = False
    if args.batch_size is not None:
        config.eval_batch_size = args.batch_size
    if args.precision:
        config.precision = args.precision


@entry_point
def eval_main(argv=None):
    """vit-eval: print the test-set report; --json and --plot write it to files."""
    args = eval_parser().parse_args(argv)
    if not args.list_pretrained:  # what the arguments alone decide, said before the imports below take seconds
        if bool(args.checkpoint) == bool(args.pretrained) or bool(args.model) != bool(args.pretrained):
            raise UserError("give --checkpoint, or --model and --pretrained (see vit-eval --help)")
        for flag, value in {"--batch-size": args.batch_size, "--img-size": args.img_size}.items():
            if value is not None and value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        if args.checkpoint and args.img_size:
            raise UserError("--img-size goes with --pretrained; a checkpoint is evaluated at the size it was "
                            "trained at")
    from vit_train.hub import check_release_head, check_weights_source, format_releases
    if args.list_pretrained:
        print(format_releases())
        return 0
    from vit_train import evaluate
    from vit_train.checkpoint import check_writable
    from vit_train.resolve import pretrained_config
    from vit_train.runtime import out_of_memory_says, resolve_device, resolve_precision, slow_precision_warning
    if args.pretrained:
        check_weights_source(args.pretrained, args.model)
    for report_file in filter(None, (args.json, args.plot)):  # fail now, not after a long evaluation
        check_writable(report_file)
    if args.plot:
        evaluate.require_matplotlib()
    device = resolve_device(args.device)
    if args.checkpoint:
        loaded = evaluate.load_trained_model(args.checkpoint, device, args.weights)
        apply_eval_flags(loaded.config, args)
        loaders = evaluate.eval_loaders(loaded.config, device, args.split)
        evaluate.check_class_count(loaded, loaders.class_names)
    else:
        config = pretrained_config(args.model, args.img_size)
        apply_eval_flags(config, args)
        loaders = evaluate.eval_loaders(config, device, args.split)
        check_release_head(args.pretrained, len(loaders.class_names))
        loaded, notes = evaluate.load_pretrained_model(config, args.pretrained, loaders.class_names, device)
        for note in notes:
            print(f"note: {note}")
    if warning := slow_precision_warning(resolve_precision(loaded.config.precision, device), device):
        print(f"warning: {warning}", file=sys.stderr)
    with out_of_memory_says(device, lambda memory, _: f"out of {memory} while evaluating, at batches of "
                            f"{loaded.config.eval_batch_size}; give a smaller --batch-size"):
        report = evaluate.evaluate(loaded.model, loaders.test, loaders.class_names, device, loaded.config.precision,
                                   args.flip_average)
    print(evaluate.format_report(report))
    if args.json:
        evaluate.write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        evaluate.plot_confusion_matrix(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def predict_parser():
    parser = Parser(prog="vit-predict", description="Print the most likely classes of image files of any size and "
                    "format, resized and normalised as the test split is.")
    add_checkpoint_flag(parser)
    add_weights_flag(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", type=path("IMAGE"),
                        help="image files (PNG, JPEG, ...)")
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="classes to print per image (default: 5)")
    add_device_flag(parser)
    return parser


@entry_point
def predict_main(argv=None):
    """vit-predict: for each image, its top-k classes with their probabilities."""
    args = predict_parser().parse_args(argv)
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    from vit_train import predict
    from vit_train.evaluate import load_trained_model
    from vit_train.runtime import resolve_device
    loaded = load_trained_model(args.checkpoint, resolve_device(args.device), args.weights)
    images = [predict.read_image(path) for path in args.images]  # a bad file fails before any output
    for path, image in zip(args.images, images):
        print(path)
        for name, probability in predict.predict(loaded, image, args.top_k):
            print(f"  {probability:.4f}  {name}")
    return 0


def attention_parser():
    parser = Parser(prog="vit-attention", description="Draw the attention rollout (Abnar & Zuidema 2020) of the "
                    "CLS token over an image, beside the image, as a picture file; print the top classes.")
    add_checkpoint_flag(parser)
    add_weights_flag(parser)
    parser.add_argument("image", metavar="IMAGE", type=path("IMAGE"),
                        help="an image file of any size (PNG, JPEG, ...)")
    parser.add_argument("--out", required=True, type=path("--out"), metavar="FILE.png", help="the picture to "
                        "write, in the format its suffix names: .png, .jpg, .webp, ...")
    add_device_flag(parser)
    return parser


@entry_point
def attention_main(argv=None):
    """vit-attention: write [image | attention rollout over the image] to --out."""
    args = attention_parser().parse_args(argv)
    from vit_train import predict
    from vit_train.checkpoint import check_writable
    from vit_train.evaluate import load_trained_model
    from vit_train.runtime import resolve_device
    check_writable(args.out)
    predict.image_format(args.out)  # an unknown suffix fails before any work too
    loaded = load_trained_model(args.checkpoint, resolve_device(args.device), args.weights)
    panel, top = predict.attention_figure(loaded, predict.read_image(args.image))
    predict.save_image(panel, args.out)
    print(f"{args.image}: " + ", ".join(f"{name} {probability:.4f}" for name, probability in top))
    print(f"wrote {args.out}")
    return 0


def export_parser():
    parser = Parser(prog="vit-export", description="Write a checkpoint's weights for inference: a state dict in "
                    "timm's names that timm.create_model loads, and beside it a JSON with our config, the class "
                    "names, the input normalisation and the timm.create_model arguments.")
    add_checkpoint_flag(parser)
    add_weights_flag(parser)
    parser.add_argument("--out", required=True, type=path("--out"), metavar="FILE.pth",
                        help="the weights file; the JSON gets its name with the suffix .json")
    return parser


@entry_point
def export_main(argv=None):
    """vit-export: weights to --out, config to --out with the suffix .json."""
    args = export_parser().parse_args(argv)
    from vit_train.evaluate import load_trained_model
    from vit_train.export import export
    config_path = export(load_trained_model(args.checkpoint, "cpu", args.weights), args.out)
    print(f"wrote {args.out} and {config_path}; they may move, together. In Python, in their folder: "
          f"timm.create_model(**json.load(open({config_path.name!r}))['timm']); from elsewhere see docs/evaluate.md")
    return 0
