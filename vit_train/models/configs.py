"""Named model configurations, in the vocabulary of the original release.

`ViT-B_16` reads "Base size, 16×16 patches". The sizes come from one table (Table 1 of the paper, plus the
Ti and S sizes of the follow-up "How to train your ViT?"); the patch size is parsed from the name, so
`ViT-S_4` or `ViT-Ti_2` need no code of their own. `R50-ViT-B_16` puts a ResNet-50 stem in front of ViT-B:
the stem downsamples 16×, and its feature map is embedded with 1×1 patches, so it sees the same grid as
ViT-B/16. `testing` is a tiny network for the test-suite.

The config layout follows the original (`patches.size`, `hidden_size`, `transformer.*`, `classifier`,
`representation_size`, `resnet.*`) so that recipes and checkpoints read the same as the reference code.
No torch here: the command line lists and checks models before it imports torch.
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


# ---------------------------------------------------------------------------------------------------------------
# What a config means for the image: checked here, without building anything.

# The largest image side a config may ask for: at 16384 px a 16-px-patch ViT already sees a million tokens.
MAX_IMAGE_SIZE = 16384


def resnet_downsample(num_layers) -> int:
    """How much the hybrid's stem shrinks the image: 2 (root) × 2 (pool) × 2 for every stage after the first."""
    return 2 ** (len(num_layers) + 1)


def patch_stride(config: ml_collections.ConfigDict) -> int:
    """Pixels per patch side in the input image: the patch size, times the hybrid's stem downsampling."""
    downsample = resnet_downsample(config.resnet.num_layers) if config.resnet is not None else 1
    return config.patches.size[0] * downsample


def check_config(config: ml_collections.ConfigDict, img_size: int):
    """Reject configurations that cannot build a network, with a message that says how to fix them."""
    name = config.get("name", "model")
    hidden_size, heads = config.hidden_size, config.transformer.num_heads
    if min(hidden_size, heads, config.transformer.mlp_dim, config.transformer.num_layers) <= 0:
        raise UserError(f"{name}: hidden_size, mlp_dim, num_heads and num_layers must be positive")
    if hidden_size % heads:
        raise UserError(f"{name}: hidden size {hidden_size} is not divisible by {heads} heads; change one of them")
    if config.classifier not in ("token", "gap"):
        raise UserError(f"{name}: classifier must be 'token' or 'gap', not {config.classifier!r}")
    attention_init = config.get("attention_init", "xavier")
    if attention_init not in ("xavier", "mimetic"):
        raise UserError(f"{name}: attention_init must be 'xavier' or 'mimetic', not {attention_init!r}")
    position_embedding = config.get("position_embedding", "learned")
    if position_embedding not in ("learned", "sincos2d"):
        raise UserError(f"{name}: position_embedding must be 'learned' or 'sincos2d', not {position_embedding!r}")
    if position_embedding == "sincos2d" and hidden_size % 4:
        raise UserError(f"{name}: sincos2d position embeddings need a hidden size divisible by 4, not {hidden_size}")
    rates = {f"model.transformer.{key}": config.transformer.get(key, 0.0)
             for key in ("dropout_rate", "attention_dropout_rate", "drop_path_rate")}
    rates["model.patch_dropout"] = config.get("patch_dropout", 0.0)
    for key, rate in rates.items():  # a rate of 1 would drop everything and divide by 0
        if not 0 <= rate < 1:
            raise UserError(f"{key} is a probability in [0, 1), got {rate}")
    representation_size = config.representation_size
    if representation_size is not None and (type(representation_size) is not int or representation_size <= 0):
        raise UserError(f"{name}: representation_size must be a positive integer or None, got {representation_size!r}")
    resnet = config.get("resnet")
    if resnet is not None and not (isinstance(resnet, (dict, ml_collections.ConfigDict))
                                   and {"num_layers", "width_factor"} <= set(resnet)):
        raise UserError(f"model.resnet is the hybrid's ResNet stem, which a model name such as R50-ViT-B_16 sets "
                        f"(num_layers, width_factor); got {resnet!r}")
    if not 0 < img_size <= MAX_IMAGE_SIZE:
        raise UserError(f"image size must be between 1 and {MAX_IMAGE_SIZE} pixels, not {img_size}")
    size = tuple(config.patches.size)
    if len(size) != 2 or size[0] != size[1] or not isinstance(size[0], int):  # a square P×P convolution embeds
        raise UserError(f"model.patches.size must be a square (P, P) of pixels, got {size}; e.g. (4, 4)")
    patch_size = size[0]
    downsample = patch_stride(config) // patch_size if patch_size > 0 else 1
    if patch_size <= 0 or img_size % (patch_size * downsample):
        what = f"the ResNet stem's 16× downsampling times patch size {patch_size}" if downsample > 1 else (
            f"patch size {patch_size}")
        raise UserError(
            f"{name}: {what} does not divide the image size {img_size}; pick an image size that is a multiple "
            f"of {patch_size * downsample} or another patch size"
        )


def block_parameters(config: ml_collections.ConfigDict) -> int:
    """The parameters of the transformer blocks alone, a lower bound on the model's (without embeddings, head or
    stem): per block two LayerNorms, qkv and the output projection, and the MLP's two layers, biases included."""
    width, mlp = config.hidden_size, config.transformer.mlp_dim
    return config.transformer.num_layers * (4 * width * width + 2 * width * mlp + 9 * width + mlp)
