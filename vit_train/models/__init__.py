"""Vision Transformer models by name. Two modules, so that the names are known without importing torch:

    configs.py   named model configs: get_config("ViT-B_16"), list_models(), apply_overrides(config, **flat)
    vit.py       the network: create_model("ViT-B_16", img_size=32, num_classes=10), VisionTransformer, resnet.py's
                 stem for the hybrid

`from vit_train.models import create_model` (the previous release's import) still works: the network's names are
looked up in vit.py when first asked for (PEP 562), so importing this package alone leaves torch unimported.
"""
import importlib

from vit_train.models.configs import apply_overrides, get_config, list_models

__all__ = ["apply_overrides", "get_config", "list_models", "create_model", "VisionTransformer"]
NETWORK_NAMES = ("create_model", "VisionTransformer")


def __getattr__(name):
    if name in NETWORK_NAMES:
        return getattr(importlib.import_module("vit_train.models.vit"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
