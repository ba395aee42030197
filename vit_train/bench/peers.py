"""timm's and HF's ViT built from one of our model configs, with our weights copied in.

Used by the fidelity tests (same weights must give the same logits) and by the speed benchmark (same
network, same batch, different implementation). timm and transformers come with the `test` extra.
"""
from functools import partial

import ml_collections
import torch
from torch import nn


def timm_vit(config: ml_collections.ConfigDict, img_size: int, num_classes: int) -> nn.Module:
    """timm's VisionTransformer with our hyper-parameters; its parameter names are ours, no mapping needed."""
    from timm.models.vision_transformer import VisionTransformer

    t = config.transformer
    return VisionTransformer(
        img_size=img_size, patch_size=config.patches.size[0], num_classes=num_classes,
        embed_dim=config.hidden_size, depth=t.num_layers, num_heads=t.num_heads,
        mlp_ratio=t.mlp_dim / config.hidden_size, qkv_bias=True, class_token=True, global_pool="token",
        norm_layer=partial(nn.LayerNorm, eps=1e-6), pos_drop_rate=t.dropout_rate, proj_drop_rate=t.dropout_rate,
        attn_drop_rate=t.attention_dropout_rate,
    )


def hf_vit(config: ml_collections.ConfigDict, img_size: int, num_classes: int, state_dict: dict = None) -> nn.Module:
    """HF's ViTForImageClassification with our hyper-parameters, optionally loaded from our state dict."""
    import transformers

    t = config.transformer
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=config.hidden_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        intermediate_size=t.mlp_dim, hidden_act="gelu", layer_norm_eps=1e-6, image_size=img_size,
        patch_size=config.patches.size[0], num_labels=num_classes, qkv_bias=True,
        hidden_dropout_prob=t.dropout_rate, attention_probs_dropout_prob=t.attention_dropout_rate,
        attn_implementation="sdpa",
    ))
    if state_dict is not None:
        model.load_state_dict(to_hf_state_dict(state_dict, model.state_dict().keys(), config))
    return model


def to_hf_state_dict(ours: dict, hf_keys, config) -> dict:
    """Our (timm) names -> HF's. transformers 5 renamed the encoder's modules; follow the installed naming."""
    v5 = "vit.layers.0.attention.q_proj.weight" in hf_keys
    layer = "vit.layers.{}." if v5 else "vit.encoder.layer.{}."
    names = dict(zip(
        ("q", "k", "v", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2"),
        ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2",
         "layernorm_before", "layernorm_after") if v5 else
        ("attention.attention.query", "attention.attention.key", "attention.attention.value",
         "attention.output.dense", "intermediate.dense", "output.dense", "layernorm_before", "layernorm_after")))
    sd = {
        "vit.embeddings.cls_token": ours["cls_token"],
        "vit.embeddings.position_embeddings": ours["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": ours["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": ours["patch_embed.proj.bias"],
        "vit.layernorm.weight": ours["norm.weight"], "vit.layernorm.bias": ours["norm.bias"],
        "classifier.weight": ours["head.weight"], "classifier.bias": ours["head.bias"],
    }
    for i in range(config.transformer.num_layers):
        for kind in ("weight", "bias"):
            block = {name: ours[f"blocks.{i}.{name}.{kind}"]
                     for name in ("attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2")}
            block.update(zip("qkv", ours[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)))
            sd.update({f"{layer.format(i)}{names[name]}.{kind}": value for name, value in block.items()})
    return sd


def hf_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=images).logits
