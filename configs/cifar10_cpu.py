"""CIFAR-10 on a CPU in minutes: the best plain ViT a 2-core machine trains in a time budget (draft)."""
from vit_train.config import base_config, recipe_model


def get_config():
    config = base_config()
    config.model_name = "ViT-Ti_4"
    config.model = recipe_model("ViT-Ti_4", hidden_size=128, num_layers=6, mlp_dim=256, num_heads=4, dropout_rate=0.0)
    config.data.name = "cifar10"
    config.img_size = 32
    config.batch_size = 128
    config.eval_batch_size = 500
    config.optim.name = "adamw"
    config.optim.lr = 2e-3
    config.optim.weight_decay = 0.05
    config.optim.label_smoothing = 0.1
    config.schedule.warmup_fraction = 0.05
    config.time_budget = "10m"
    config.eval_every = 0
    config.save_every = 0
    config.log_every = 100
    return config
