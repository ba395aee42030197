"""Vision Transformer models by name. Two modules, so that the names are known without importing torch:

    configs.py   named model configs: get_config("ViT-B_16"), list_models(), apply_overrides(config, **flat)
    vit.py       the network: create_model("ViT-B_16", img_size=32, num_classes=10), VisionTransformer, resnet.py's
                 stem for the hybrid
"""
from vit_train.models.configs import apply_overrides, get_config, list_models

__all__ = ["apply_overrides", "get_config", "list_models"]
