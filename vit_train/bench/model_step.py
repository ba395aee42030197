"""Training-step speed of our ViT against timm's and HF's, same network, same batch, same run.

    python -m vit_train.bench.model_step                       # the device's standard cases (STANDARD_CASES)
    python -m vit_train.bench.model_step --device cuda --case small-vit-32 --case vit-b16-224 --markdown
    python -m vit_train.bench.model_step --model ViT-S_4 --override num_layers=6 --batch-size 128 --precision bf16

One step is forward + backward + AdamW update (fused, as the training loop runs it); ours, timm's and HF's are
timed round-robin, with the fraction of the machine's GEMM rate our step reaches and, on a GPU, each one's MFU
(how: vit_train/bench/step_timing.py). The flags are parsed here without torch, so --help answers at once.
"""
import argparse
import sys
from typing import Callable, NamedTuple

import ml_collections

from vit_train.bench.options import assignment, positive_int
from vit_train.cli import Parser, entry_point
from vit_train.config import load_recipe
from vit_train.errors import UserError
from vit_train.models import apply_overrides, get_config


class Case(NamedTuple):
    label: str
    model_config: Callable[[], ml_collections.ConfigDict]  # called when the case runs: a recipe is read then
    img_size: int
    batch_size: dict  # {device type: batch}: a CPU batch times in seconds, a GPU batch is what training uses


def small_vit_config() -> ml_collections.ConfigDict:
    """The plain small ViT of the from-scratch recipe without its stochastic depth, which HF's ViT lacks: the three
    implementations must run the same network."""
    return apply_overrides(load_recipe("cifar10_vit_small").model, drop_path_rate=0.0)


CASES = {
    "vit-b16-32": Case("ViT-B_16 @32px", lambda: get_config("ViT-B_16"), 32, {"cpu": 64, "cuda": 512}),
    "tiny-vit-32": Case("tiny ViT 4x4 patches @32px",
                        lambda: apply_overrides(get_config("ViT-Ti_4"), hidden_size=128, num_layers=4, mlp_dim=512,
                                                num_heads=4), 32, {"cpu": 128, "cuda": 128}),
    "small-vit-32": Case("small plain ViT of cifar10_vit_small @32px", small_vit_config, 32, {"cpu": 128, "cuda": 128}),
    "vit-b16-224": Case("ViT-B_16 @224px", lambda: get_config("ViT-B_16"), 224, {"cpu": 8, "cuda": 128}),
}
# On the CPU the design-card model and a tiny small-patch model; on a GPU the design card, the from-scratch
# recipe's plain ViT and ViT-B_16 at the fine-tuning resolution.
STANDARD_CASES = {"cpu": ["vit-b16-32", "tiny-vit-32"], "cuda": ["vit-b16-32", "small-vit-32", "vit-b16-224"]}

def model_step_parser():
    parser = Parser(prog="python -m vit_train.bench.model_step", description=__doc__.splitlines()[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--case", action="append", choices=CASES,
                       help="a named case, repeatable (default: the device's standard cases: "
                            + "; ".join(f"{device} {', '.join(names)}" for device, names in STANDARD_CASES.items())
                            + ")")
    which.add_argument("--model", metavar="NAME", help="one model name instead of the named cases (e.g. ViT-S_4)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", type=assignment,
                        help="model setting for --model, e.g. --override hidden_size=128 (repeatable)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help="default: each case's batch on the device; 64 with --model")
    parser.add_argument("--img-size", type=positive_int, default=32, metavar="PX",
                        help="image side for --model (default: 32)")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="default: vit-train's auto, bf16 on GPUs and on CPUs with bf16 instructions, else fp32")
    parser.add_argument("--repeats", type=positive_int, default=5, metavar="N",
                        help="timed rounds per implementation, of which the median counts (default: 5)")
    parser.add_argument("--steps", type=positive_int, default=5, metavar="N",
                        help="training steps per timed round (default: 5)")
    parser.add_argument("--warmup", type=positive_int, default=2, metavar="N",
                        help="untimed steps of each implementation first (default: 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto, the GPU when "
                                                         "there is one)")
    parser.add_argument("--markdown", action="store_true", help="end with the figures as a Markdown table")
    parser.add_argument("--run", metavar="RUN_DIR", help="instead: the images/s and MFU of a finished vit-train "
                        "run's training loop, from its last logged window (a GPU's peak; on the CPU the GEMM rate)")
    return parser


@entry_point
def main(argv=None):
    args = model_step_parser().parse_args(argv)
    if args.override and not args.model:
        raise UserError("--override goes with --model (see python -m vit_train.bench.model_step --help)")
    cases = None
    if args.model:
        overrides = dict(args.override)
        model_config = apply_overrides(get_config(args.model), **overrides)  # a bad name or key fails here
        label = f"{args.model} {overrides}" if overrides else args.model
        cases = [Case(label, lambda: model_config, args.img_size, {"cpu": 64, "cuda": 64})]
    from vit_train.bench import step_timing
    from vit_train.runtime import resolve_device
    device = resolve_device(args.device)
    step_timing.run(cases or [CASES[name] for name in args.case or STANDARD_CASES[device.type]], args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
