"""Fine-tune ImageNet-21k weights on CIFAR-10: the reference PyTorch port's recipe (jeonsworld/ViT-pytorch),
which `vit-train --pretrained WEIGHTS.npz` runs when no --config is given.

SGD with momentum 0.9, peak lr 3e-2 after 500 warm-up steps, cosine decay to zero, no weight decay,
gradient-norm clipping at 1.0, global batch 512 for 10,000 steps, evaluated every 100 steps, at 224x224 (the
32-pixel images are upsampled), inputs scaled to [-1, 1] as Google's checkpoints expect. The reference crops
with RandomResizedCrop(scale=(0.05, 1)); here the crop is the 4-pixel padded crop plus flip done on the device.
For 384 px, add `--img-size 384` (the position embeddings are resized from the checkpoint's grid).

What to expect (reference port, ViT-B_16 ImageNet-21k, official CIFAR release): 99.08% on CIFAR-10 at 224 px,
99.06% at 384 px; 92.3% on CIFAR-100 at 224 px (`--dataset cifar100`). The JPEG copy used by the tests scores
a little lower. A 40 GB GPU needs `--grad-accum 4` for batch 512 at 224 px; about 3 hours on one A100-class GPU.
"""
from vit_train.config import base_config


def get_config():
    config = base_config()
    config.model_name = "ViT-B_16"
    config.data.name = "cifar10"
    config.data.normalize = "inception"
    config.img_size = 224
    config.batch_size = 512
    config.eval_batch_size = 256
    config.optim.name = "sgd"
    config.optim.lr = 3e-2
    config.optim.momentum = 0.9
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 1.0
    config.schedule.name = "warmup_cosine"
    config.schedule.warmup_steps = 500
    config.schedule.steps = 10_000
    config.eval_every = 100
    config.save_every = 500
    return config
