"""Muon's optimizer step against AdamW's and against forward + backward, on a recipe's model, in one process.

    python -m vit_train.bench.muon_step                         # cifar10_cpu's model, batch 128, on the CPU
    python -m vit_train.bench.muon_step --config cifar10_cpu --set model.transformer.num_layers=6 --repeats 21

Timed round-robin, medians: forward + backward of one training batch (patch dropout as the recipe has it); our
MuonAdamW step with Muon's orthogonalisation in bf16 and in fp32 (which one optim.muon_precision=auto picks here is
marked); torch.optim.Muon (bf16 whatever the device, one matrix at a time, a fused query-key-value projection as
one matrix) with the same fused AdamW; fused AdamW alone over every parameter; and the Newton-Schulz iterations
alone, batched by shape as ours runs them and one matrix at a time. The flags are parsed here without torch, so
--help answers at once.
"""
import argparse
import sys

from vit_train.bench.options import positive_int
from vit_train.cli import Parser, entry_point


def muon_step_parser():
    parser = Parser(prog="python -m vit_train.bench.muon_step", description=__doc__.splitlines()[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cifar10_cpu", metavar="FILE|NAME",
                        help="the recipe whose model and optimizer settings are timed (default: cifar10_cpu)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="a config key on top of the recipe, as vit-train --set takes it (repeatable)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help="training batch of forward + backward (default: the recipe's)")
    parser.add_argument("--repeats", type=positive_int, default=11, metavar="N",
                        help="timed rounds of each variant, of which the median counts (default: 11)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    return parser


@entry_point
def main(argv=None):
    args = muon_step_parser().parse_args(argv)
    from vit_train.resolve import resolve_config
    config = resolve_config(sets=args.sets, recipe=args.config)  # a bad recipe or key fails here, in one line
    config.optim.name = "muon"  # whatever the recipe trains with, Muon is what is timed
    from vit_train.bench import step_timing
    from vit_train.runtime import resolve_device
    step_timing.time_muon_step(config, args.batch_size or config.batch_size, args.repeats,
                               resolve_device(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
