"""What the training pipeline costs on top of the model: vit-train's images/s against its bare step.

    python -m vit_train.bench.pipeline_overhead --data-dir data          # real CIFAR-10 (make_cifar10.py data)
    python -m vit_train.bench.pipeline_overhead --dataset synthetic

End to end is a real vit-train run on a small ViT: data gathered and augmented each step, logging. The bare step
is the same training step on one fixed batch already on the device. The two alternate for --rounds rounds in one
process; the medians give the overhead, 1 - end-to-end / bare (how: vit_train/bench/pipeline_timing.py). The
flags are parsed here without torch, so --help answers at once.
"""
import sys

from vit_train.bench.options import positive_int
from vit_train.cli import Parser, entry_point, path


def pipeline_overhead_parser():
    parser = Parser(prog="python -m vit_train.bench.pipeline_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10", choices=("cifar10", "synthetic"),
                        help="real CIFAR-10 from --data-dir, or the synthetic set (no files) (default: cifar10)")
    parser.add_argument("--data-dir", default="./data", type=path("--data-dir"), metavar="DIR",
                        help="holds cifar-10-batches-py/ (default: ./data)")
    parser.add_argument("--model", metavar="NAME", help="the model of both (default: ViT-Ti_8 with 6 layers and "
                        "MLP 384, 1.8M parameters)")
    parser.add_argument("--batch-size", type=positive_int, default=128, metavar="N", help="(default: 128)")
    parser.add_argument("--steps", type=positive_int, default=100, metavar="N",
                        help="training steps per round, timed in windows of 50 (default: 100)")
    parser.add_argument("--rounds", type=positive_int, default=3, metavar="N", help="(default: 3)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    return parser


@entry_point
def main(argv=None):
    args = pipeline_overhead_parser().parse_args(argv)
    from vit_train.bench import pipeline_timing
    pipeline_timing.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
