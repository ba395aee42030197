"""`python -m vit_train` and `torchrun --nproc_per_node N -m vit_train`: the vit-train command line."""
import sys

from vit_train.cli import train_main

sys.exit(train_main())
