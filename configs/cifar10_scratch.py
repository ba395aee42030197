"""CIFAR-10 from scratch: what `vit-train` runs when no --config and no --pretrained are given.

The design card's model, ViT-B_16 at 32x32 (a 2x2 grid of 16x16 patches plus the CLS token), trained with
AdamW: peak lr 1e-3 after 500 warm-up steps, cosine decay to zero, decoupled weight decay 0.05 (not on biases,
norms, position embeddings or the CLS token), gradient-norm clipping at 1.0, label smoothing 0.1, random crops
of the 4-pixel reflect-padded image and horizontal flips, global batch 512 for 100 epochs (9,700 steps).

What to expect on the CIFAR-10 JPEG copy (test accuracy):
- ViT-B_16 at 32 px sees only 4 patches, so it learns little spatial structure: roughly 60-70%, an estimate,
  not a measurement (no GPU was available while this recipe was written).
- Smaller patches do far better given the epochs: `--model ViT-Ti_4` or `ViT-S_4` (8x8 patches of 4 px),
  commonly reported at 80% and more (not measured here).
- Measured on a CPU: ViT-Ti_8 cut to 6 layers (`--set model.transformer.num_layers=6 --set
  model.transformer.mlp_dim=384 --set model.transformer.dropout_rate=0.0`, 1.8M parameters), batch 128, lr 1e-3,
  200 warm-up steps, 5 epochs: 51.9% after 13 minutes on one CPU thread (329 images/s). A 0.8M-parameter ViT
  with 4-px patches (D 128, 4 layers, MLP 512, no dropout), batch 128, 8 epochs: 66.05% after 26 minutes on
  two threads (about 320 images/s); the command is in the README.
"""
from vit_train.config import base_config


def get_config():
    config = base_config()
    config.model_name = "ViT-B_16"
    config.data.name = "cifar10"
    config.data.crop_padding = 4
    config.data.hflip = True
    config.img_size = 32
    config.batch_size = 512
    config.optim.name = "adamw"
    config.optim.lr = 1e-3
    config.optim.weight_decay = 0.05
    config.optim.grad_clip = 1.0
    config.optim.label_smoothing = 0.1
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_steps = 500
    config.schedule.epochs = 100
    config.eval_every = 500
    config.save_every = 500
    return config
