"""Named model configurations, in the vocabulary of the original release.

`ViT-B_16` reads "Base size, 16×16 patches". The sizes come from one table (Table 1 of the paper, plus the
Ti and S sizes of the follow-up "How to train your ViT?"); the patch size is parsed from the name, so
`ViT-S_4` or `ViT-Ti_2` need no code of their own. `R50-ViT-B_16` puts a ResNet-50 stem in front of ViT-B:
the stem downsamples 16×, and its feature map is embedded with 1×1 patches, so it sees the same grid as
ViT-B/16. `testing` is a tiny network for the test-suite.

The config layout follows the original (`patches.size`, `hidden_size`, `transformer.*`, `classifier`,
`representation_size`, `resnet.*`) so that recipes and checkpoints read the same as the reference code.
"""
import re

import ml_collections

from vit_train.errors import UserError

# size letter -> (hidden_size D, num_layers, mlp_dim, num_heads)
SIZES = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}
# The six configurations of the original release; any other ViT-<size>_<patch> parses the same way.
ORIGINAL_MODELS = ("ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14", "R50-ViT-B_16")
_NAME = re.compile(r"^(?P<hybrid>R50-)?ViT-(?P<size>Ti|S|B|L|H)_(?P<patch>[1-9][0-9]*)$")

# The flat keys `create_model(..., **overrides)` and the CLI accept, and where each lives in the config.
OVERRIDES = {
    "hidden_size": ("hidden_size",),
    "mlp_dim": ("transformer", "mlp_dim"),
    "num_heads": ("transformer", "num_heads"),
    "num_layers": ("transformer", "num_layers"),
    "patch_size": ("patches", "size"),
    "dropout_rate": ("transformer", "dropout_rate"),
    "attention_dropout_rate": ("transformer", "attention_dropout_rate"),
    "drop_path_rate": ("transformer", "drop_path_rate"),
    "patch_dropout": ("patch_dropout",),
    "classifier": ("classifier",),
    "position_embedding": ("position_embedding",),
    "attention_init": ("attention_init",),
    "representation_size": ("representation_size",),
}


def _vit_config(name, hidden_size, num_layers, mlp_dim, num_heads, patch_size, dropout_rate=0.1):
    config = ml_collections.ConfigDict()
    config.name = name
    config.patches = ml_collections.ConfigDict({"size": (patch_size, patch_size)})
    config.hidden_size = hidden_size
    config.transformer = ml_collections.ConfigDict()
    config.transformer.mlp_dim = mlp_dim
    config.transformer.num_heads = num_heads
    config.transformer.num_layers = num_layers
    config.transformer.attention_dropout_rate = 0.0
    config.transformer.dropout_rate = dropout_rate
    config.transformer.drop_path_rate = 0.0  # stochastic depth of the last block; 0 = off, as in the original
    config.classifier = "token"
    config.position_embedding = "learned"  # or "sincos2d": fixed 2-D sine-cosine (Beyer et al. 2022)
    config.attention_init = "xavier"  # or "mimetic": Q·Kᵀ ≈ identity, V·proj ≈ -identity (Trockman & Kolter 2023)
    config.patch_dropout = 0.0  # fraction of patch tokens left out in training (PatchDropout); 0 = off
    config.representation_size = None
    config.resnet = None
    return config


def get_config(name: str) -> ml_collections.ConfigDict:
    """The model config for a name such as `ViT-B_16`, `ViT-S_4`, `R50-ViT-B_16` or `testing`."""
    if name == "testing":
        return _vit_config("testing", hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=4)
    match = _NAME.match(name)
    if match is None:
        raise UserError(
            f"unknown model {name!r}; use one of {', '.join(('testing',) + ORIGINAL_MODELS)} "
            f"or ViT-<size>_<patch> with size in {'/'.join(SIZES)} (e.g. ViT-S_4)"
        )
    hidden_size, num_layers, mlp_dim, num_heads = SIZES[match["size"]]
    patch_size = int(match["patch"])
    if match["hybrid"]:
        if (match["size"], patch_size) != ("B", 16):
            raise UserError(f"unknown model {name!r}: the only hybrid is R50-ViT-B_16")
        # The ResNet stem already downsamples 16×, so its feature map is embedded with 1×1 patches.
        config = _vit_config(name, hidden_size, num_layers, mlp_dim, num_heads, patch_size=1)
        config.resnet = ml_collections.ConfigDict({"num_layers": (3, 4, 9), "width_factor": 1})
        return config
    return _vit_config(name, hidden_size, num_layers, mlp_dim, num_heads, patch_size)


def apply_overrides(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
    """A copy of `config` with flat keys (`hidden_size=384`, `patch_size=4`, ...) set in their nested place."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        if key not in OVERRIDES:
            raise UserError(f"unknown model setting {key!r}; valid settings: {', '.join(OVERRIDES)}")
        if key == "patch_size":
            value = (int(value), int(value))
        *parents, leaf = OVERRIDES[key]
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def list_models() -> list:
    """Model names: `testing`, the original six, and ViT-<size>_<patch> for every size at common patch sizes."""
    parsed = [f"ViT-{size}_{patch}" for size in SIZES for patch in (4, 8, 16, 32)]
    return ["testing"] + sorted(set(ORIGINAL_MODELS) | set(parsed), key=_sort_key)


def _sort_key(name):
    match = _NAME.match(name)
    return (bool(match["hybrid"]), list(SIZES).index(match["size"]), int(match["patch"]))
