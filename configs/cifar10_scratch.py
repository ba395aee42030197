"""CIFAR-10 from scratch: what `vit-train` runs when no --config and no --pretrained are given.

The design card's model, ViT-B_16 at 32x32 (a 2x2 grid of 16x16 patches plus the CLS token), trained with what
the best plain-ViT results from scratch rest on (DeiT; Lee et al. 2021, configs/cifar10_vit_small.py): AdamW,
peak lr 1e-3 at batch 512 after a warm-up of 10% of the run, cosine decay to zero, decoupled weight decay 0.05
(not on biases, norms, position embeddings or the CLS token), gradient-norm clipping at 1.0, label smoothing 0.1;
random crops of the 4-pixel reflect-padded image and flips, AutoAugment (CIFAR-10 policy), mixup 0.8 / cutmix 1.0,
random erasing 0.25, repeated augmentation (3 copies); stochastic depth rising to 0.1 in place of the original's
dropout 0.1; 100 epochs (9,700 steps). It is cifar10_vit_small.py with the design card's model and batch.

What to expect on the CIFAR-10 JPEG copy (test accuracy):
- Not measured: 100 epochs of ViT-B (86M parameters) are a GPU job (about a day on a 2-core CPU), and no GPU was
  lent while this recipe was written; scripts/gpu_check.sh measures it on the first GPU.
- ViT-B_16 at 32 px sees only 4 patches, so it learns little spatial structure; a 16-px-patch ViT on 32-px images
  is commonly reported near 51% (lucidrains/vit-pytorch issue 12). Smaller patches do far better:
  configs/cifar10_vit_small.py (4-px patches, 2.7M parameters) is published at 93.58%.
- On a CPU, run `vit-train --config cifar10_cpu --time-budget 10m` instead (measured in docs/results.md).
"""
from vit_train.config import load_recipe, recipe_model


def get_config():
    config = load_recipe("cifar10_vit_small")  # its regularisers, on the design card's model and batch
    config.model_name = "ViT-B_16"
    config.model = recipe_model("ViT-B_16", dropout_rate=0.0, drop_path_rate=0.1)
    config.batch_size = 512
    config.optim.grad_clip = 1.0
    config.eval_every = 500
    config.save_every = 500
    return config
