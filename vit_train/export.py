"""Export for inference: a checkpoint's weights as a state dict in timm's names, and our config beside it.

    checkpoint ─► timm-named state dict + config JSON (timm.create_model loads it)
"""
import json
from pathlib import Path

from vit_train.checkpoint import check_writable, save_checkpoint, write_atomically
from vit_train.data import normalization
from vit_train.errors import UserError
from vit_train.evaluate import LoadedModel


TIMM_ARCHITECTURE = "vit_base_patch16_224"  # any timm ViT name: the keyword arguments replace its sizes


def timm_arguments(loaded: LoadedModel) -> dict:
    """`timm.create_model` keyword arguments that build the same network, or a UserError saying why timm's
    VisionTransformer cannot: it has no ResNet stem of ours and no pre-logits layer."""
    model_cfg = loaded.config.model
    name = loaded.config.model_name
    if model_cfg.resnet is not None:
        raise UserError(f"{name} has a ResNet stem, which timm's VisionTransformer cannot hold; export a plain ViT")
    if model_cfg.representation_size:
        raise UserError(f"{name} has a pre-logits layer (representation_size), which timm's VisionTransformer "
                        "lacks; export a model trained with representation_size=None")
    mlp_ratio = model_cfg.transformer.mlp_dim / model_cfg.hidden_size
    if int(model_cfg.hidden_size * mlp_ratio) != model_cfg.transformer.mlp_dim:
        raise UserError(f"{name}: timm derives the MLP width as int(hidden_size x mlp_ratio), which cannot give "
                        f"mlp_dim {model_cfg.transformer.mlp_dim} exactly; export a model with another mlp_dim")
    token = model_cfg.classifier == "token"
    return {
        "img_size": loaded.config.img_size, "patch_size": model_cfg.patches.size[0],
        "num_classes": len(loaded.class_names), "embed_dim": model_cfg.hidden_size,
        "depth": model_cfg.transformer.num_layers, "num_heads": model_cfg.transformer.num_heads,
        "mlp_ratio": mlp_ratio, "qkv_bias": True, "class_token": token, "global_pool": "token" if token else "avg",
        # With global_pool='avg' timm would pool before its final LayerNorm; ours normalises, then pools.
        "fc_norm": False,
    }


def export(loaded: LoadedModel, out) -> Path:
    """Write the weights to `out` (a timm-loadable state dict) and our config to `out` with suffix .json.

    The JSON's "timm" entry is the `timm.create_model(**entry)` call that builds the network and loads `out`.
    It names the weights by their file name, relative to the JSON, so that the pair can move together; timm opens
    that name from the working directory (from elsewhere, prefix the JSON's folder: docs/evaluate.md). Its
    preprocessing keys make timm's resolve_data_config + create_transform feed the model what vit-train does
    (preprocess_images): the whole image squashed to img_size x img_size (crop_pct 1, crop_mode 'squash'),
    bilinear, normalised. Returns the JSON's path.
    """
    out = Path(out)
    config_path = out.with_suffix(".json")
    if config_path == out:
        raise UserError(f"--out {out} would hold both the weights and their config; give the weights a .pth name")
    for path in (out, config_path):
        check_writable(path)
    mean, std = normalization(loaded.config.data)
    size = loaded.config.img_size
    card = {
        "model_name": loaded.config.model_name,
        "model": loaded.config.model.to_dict(),
        "img_size": size,
        "class_names": loaded.class_names,
        "normalization": {"mean": list(mean), "std": list(std)},
        "timm": {"model_name": TIMM_ARCHITECTURE, "pretrained": True,
                 # timm reads the file named here; num_classes stops it from dropping the head as foreign
                 "pretrained_cfg_overlay": {"file": out.name, "num_classes": len(loaded.class_names),
                                            "mean": list(mean), "std": list(std), "input_size": [3, size, size],
                                            "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear"},
                 **timm_arguments(loaded)},
    }
    state_dict = {key: value.detach().cpu().contiguous() for key, value in loaded.model.state_dict().items()}
    # The pair changes together: the small card first, put back as it was if the weights cannot be written.
    previous_card = config_path.read_bytes() if config_path.exists() else None
    write_atomically(config_path, lambda f: f.write((json.dumps(card, indent=2) + "\n").encode()))
    try:
        save_checkpoint(state_dict, out)
    except UserError:
        if previous_card is None:
            config_path.unlink()
        else:
            write_atomically(config_path, lambda f: f.write(previous_card))
        raise
    return config_path
