"""Vision Transformer models by name: `create_model("ViT-B_16", img_size=32, num_classes=10)`."""
from torch import nn

from vit_train.models.configs import apply_overrides, get_config, list_models
from vit_train.models.vit import VisionTransformer

__all__ = ["VisionTransformer", "apply_overrides", "create_model", "get_config", "list_models"]


def create_model(name: str, img_size: int = 32, num_classes: int = 10, **overrides) -> nn.Module:
    """A freshly initialised ViT for the named config, with flat overrides such as `patch_size=4`."""
    return VisionTransformer(apply_overrides(get_config(name), **overrides), img_size, num_classes)
