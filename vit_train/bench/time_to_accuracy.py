"""Our CPU recipe against what a user would otherwise run, in the same time budget, on the same machine.

    python -m vit_train.bench.time_to_accuracy --time-budget 10m --data-dir data

One after the other, each in a process of its own: `vit-train --config cifar10_cpu --time-budget B`, then the usual
alternative, timm's VisionTransformer fed by torchvision's CIFAR10, its transforms and a DataLoader, with the
published recipe of the plain-ViT baseline of Lee et al. 2021 ("Vision Transformer for Small-Size Datasets",
../shared/ANCHORS.md): 4-px patches, width 192, 9 blocks, MLP 384, 12 heads, stochastic depth 0.1; AdamW lr 1e-3,
weight decay 0.05, batch 128, warm-up a tenth of the run (their 10 of 100 epochs), cosine to zero; random crop
(padding 4), flip, AutoAugment (CIFAR-10 policy), random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1.
Left out: their repeated augmentation, a sampler that torchvision does not have. The peer's length comes from its
own measured speed: its steps are timed, then as many planned as fit the budget. Both are evaluated on the full
test split at their end; the table gives test accuracy, wall time and training images/s (how:
vit_train/bench/budget_runs.py). The flags are parsed here without torch, so --help answers at once.
"""
import argparse
import sys

from vit_train.bench.options import assignment
from vit_train.cli import Parser, entry_point, path
from vit_train.errors import UserError

# The peer: timm.create_model arguments, and the recipe it is trained with (Lee et al. 2021's).
PEER_ARCHITECTURE = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 9, "num_heads": 12,
                     "mlp_ratio": 2.0, "num_classes": 10, "drop_path_rate": 0.1}
PEER_RECIPE = {"batch_size": 128, "lr": 1e-3, "weight_decay": 0.05, "label_smoothing": 0.1, "warmup_share": 0.1,
               "workers": 2}


def time_to_accuracy_parser():
    parser = Parser(prog="python -m vit_train.bench.time_to_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--time-budget", default="10m", metavar="DURATION",
                        help="each run's time, e.g. 90s, 10m, 2h (a bare number is seconds); ours plans its steps "
                             "to end within it, the peer as many steps as its timed speed fits (default: 10m)")
    parser.add_argument("--data-dir", default="data", type=path("--data-dir"), metavar="DIR",
                        help="holds cifar-10-batches-py/, real CIFAR-10 (default: data)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config key of our run on top of the cifar10_cpu recipe, as vit-train --set takes it, "
                             "e.g. model_name=testing (repeatable)")
    parser.add_argument("--peer-set", action="append", default=[], metavar="KEY=VALUE", type=assignment,
                        help="a setting of the peer: one of its timm.create_model arguments ("
                             + ", ".join(PEER_ARCHITECTURE) + ") or of its recipe (" + ", ".join(PEER_RECIPE)
                             + ") (repeatable)")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)  # the peer's own process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def peer_settings(assignments: list) -> tuple:
    """(timm.create_model arguments, recipe) of the peer with --peer-set's (key, value) pairs applied."""
    architecture, recipe = dict(PEER_ARCHITECTURE), dict(PEER_RECIPE)
    for key, value in assignments:
        settings = architecture if key in architecture else recipe if key in recipe else None
        if settings is None:
            raise UserError(f"--peer-set {key}: the peer has no such setting; it has "
                            f"{', '.join([*PEER_ARCHITECTURE, *PEER_RECIPE])}")
        settings[key] = value
    return architecture, recipe


@entry_point
def main(argv=None):
    args = time_to_accuracy_parser().parse_args(argv)
    architecture, recipe = peer_settings(args.peer_set)
    from vit_train.bench import budget_runs
    from vit_train.budget import budget_seconds
    budget_seconds(args.time_budget)  # a bad budget fails here, before either run starts
    if args.peer:
        budget_runs.peer_main(args.time_budget, args.data_dir, args.result, architecture, recipe)
        return 0
    rows = budget_runs.compare(args.time_budget, args.data_dir, args.set,
                               [f"{key}={value!r}" for key, value in args.peer_set])
    print(budget_runs.markdown_table(args.time_budget, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
