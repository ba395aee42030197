"""CIFAR-10 on a CPU in a time budget: `vit-train --config cifar10_cpu` (10 minutes; `--time-budget 30m` for more).

The best plain ViT we found for a 2-core CPU in 10 minutes, chosen by measurement (what each choice reached:
docs/results.md, "What a CPU reaches"):
- model: 4x4-pixel patches (an 8x8 grid), width 128, 4 layers, MLP 512, 2 heads of 64, no dropout: 0.8M
  parameters (8-pixel patches run twice the epochs and learn far less; at the same FLOPs, 4 layers with a wide MLP
  and 2 heads step faster than 6 layers of MLP 256 and 4 heads, and learn as much or more);
- patch dropout 0.75: until the last steps each training image keeps 16 of its 64 patch tokens, so a step costs
  about a quarter as much and the budget holds about four times the epochs (evaluation sees every patch: the
  network is the plain ViT);
- fixed 2-D sine-cosine position embeddings, mimetic attention initialisation (query-key products near the
  identity, value-projection products near minus the identity) and global average pooling instead of the CLS
  token: together attention starts out local, as a convolution's, and learns in fewer epochs;
- Muon for the weight matrices of the transformer blocks, AdamW for the rest (optim.name=muon; its
  orthogonalisation in bf16 only where the CPU has bf16 instructions, fp32 elsewhere), lr 2e-3 (Muon wants more
  than AdamW's 1e-3), weight decay 0.1, batch 128, warm-up 5% of the run, cosine to zero, label smoothing 0.1
  (0.2, linear decay, an EMA and a small translate were tried again and did not help);
- flips only, no random crop: with a couple of dozen epochs the model under-fits, and crops cost accuracy (in 30
  minutes they pay: configs/cifar10_cpu_30m.py); no mixing, no auto-augment, no EMA (all help long runs, not this
  one); alternating flips, batch 256 and --compile (11% faster steps once compiled) each landed where the number
  of images seen put them;
- the last steps on every patch (4% of the steps as first planned, about 3% of a run the re-plans lengthen), the
  learning rate restarting at a tenth of its peak and decaying to zero again: a short fine-tuning to the 64 tokens
  the network is evaluated on (each of these steps costs about 3.4 of the others, so they take about a tenth of
  the budget, and gain more than a point over spending it on patch-dropout steps).
Precision: auto, bf16 autocast on a CPU with bf16 instructions (steps take 0.45 of their fp32 time, so the
budget holds about twice the epochs), fp32 elsewhere. The number of steps comes from the time budget: steps are
timed, the schedule is planned to end within it, and re-planned as the run goes, from a fifth of it on
(docs/training.md).
"""
from vit_train.config import base_config, recipe_model


def get_config():
    config = base_config()
    config.model_name = "ViT-Ti_4"
    config.model = recipe_model("ViT-Ti_4", hidden_size=128, num_layers=4, mlp_dim=512, num_heads=2,
                                dropout_rate=0.0, patch_dropout=0.75, position_embedding="sincos2d",
                                attention_init="mimetic", classifier="gap")
    config.data.name = "cifar10"
    config.data.crop_padding = 0
    config.data.hflip = True
    config.img_size = 32
    config.batch_size = 128
    config.eval_batch_size = 500
    config.optim.name = "muon"
    config.optim.lr = 2e-3
    config.optim.weight_decay = 0.1
    config.optim.label_smoothing = 0.1
    config.schedule.warmup_fraction = 0.05
    config.schedule.all_patches_fraction = 0.04
    config.schedule.all_patches_lr = 0.1
    config.time_budget = "10m"
    config.eval_every = 0
    config.save_every = 0
    config.log_every = 100
    return config
