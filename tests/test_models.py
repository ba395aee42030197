"""The model is the network of the paper and of timm / HF: identical weights give identical logits."""
import re

import numpy as np
import pytest
import torch

from vit_train.errors import UserError
from vit_train.models import apply_overrides, get_config, list_models
from vit_train.models.configs import block_parameters
from vit_train.models.vit import create_model
from vit_train.pretrained import load_pretrained

timm_vit = pytest.importorskip("timm.models.vision_transformer")
pytest.importorskip("transformers")

from vit_train.bench.peers import hf_logits, hf_vit, timm_vit as timm_model  # noqa: E402


def randomize(model, seed=0):
    """Random values everywhere (the default init zeroes the head and CLS token, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:  # fan-in scaling keeps activations O(1) through the layers
                fan_in = p[0].numel() if p.ndim > 1 else 25
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model.eval()


@pytest.mark.parametrize("name,img_size", [("testing", 32), ("ViT-Ti_4", 32), ("ViT-B_16", 32), ("ViT-B_16", 224)])
def test_logits_match_timm_and_hf(name, img_size):
    torch.manual_seed(0)
    ours = randomize(create_model(name, img_size=img_size, num_classes=10))
    cfg = get_config(name)
    images = torch.randn(2, 3, img_size, img_size)
    theirs_timm = timm_model(cfg, img_size, 10).eval()
    theirs_timm.load_state_dict(ours.state_dict())  # same parameter names, no mapping
    theirs_hf = hf_vit(cfg, img_size, 10, ours.state_dict()).eval()
    with torch.no_grad():
        logits = ours(images)
        assert (logits[0] - logits[1]).abs().max() > 0.1  # a real, input-dependent signal
        assert (logits - theirs_timm(images)).abs().max() <= 1e-4
        assert (logits - hf_logits(theirs_hf, images)).abs().max() <= 1e-4


def test_attention_path_gives_the_same_logits_and_rows_sum_to_one():
    model = randomize(create_model("testing", num_classes=10))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = model(images)
        logits, attention = model(images, return_attention=True)
    assert torch.allclose(fused, logits, atol=1e-5)
    assert len(attention) == 2
    assert attention[0].shape == (3, 2, 65, 65)  # (B, heads, 64 patches + CLS, same)
    assert torch.allclose(attention[0].sum(-1), torch.ones(3, 2, 65), atol=1e-5)


def test_bf16_on_a_cpu_writes_attention_out_and_agrees_with_the_fused_kernel_forward_and_backward():
    """Under bf16 autocast on a CPU our attention is written out, its softmax in fp32; timm's runs torch's fused
    kernel in bf16. Given the same weights, both agree with each other and with fp32 to bf16's rounding, in the
    logits and in every gradient (a lost scale, a wrong softmax axis or a transposed product would not)."""
    torch.manual_seed(0)
    ours = randomize(create_model("testing", num_classes=10))
    theirs = timm_model(get_config("testing"), 32, 10).eval()
    theirs.load_state_dict(ours.state_dict())
    images = torch.randn(4, 3, 32, 32)
    fp32 = ours(images)
    with torch.autocast("cpu", torch.bfloat16):
        written_out, fused = ours(images), theirs(images)
    assert written_out.dtype == fused.dtype == torch.bfloat16
    scale = fp32.abs().max()
    assert (written_out.float() - fused.float()).abs().max() <= 0.03 * scale
    assert (written_out.float() - fp32).abs().max() <= 0.03 * scale
    gradients = {}
    for name, model, logits in (("ours", ours, written_out), ("timm", theirs, fused)):
        model.zero_grad()
        (logits.float() * torch.linspace(-1, 1, 10)).sum().backward()
        gradients[name] = {key: p.grad for key, p in model.named_parameters()}
    for key, grad in gradients["ours"].items():
        assert (grad - gradients["timm"][key]).norm() <= 0.05 * grad.norm() + 1e-6, key


@pytest.mark.parametrize("name", ["ViT-B_16", "R50-ViT-B_16"])
def test_design_card_model_sees_four_patches_and_cls_at_32px(name):
    model = create_model(name, img_size=32)
    assert model.pos_embed.shape == (1, 5, 768)
    assert model.embed(torch.zeros(2, 3, 32, 32)).shape == (2, 5, 768)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_hybrid_grid_follows_the_image_size():
    assert create_model("R50-ViT-B_16", img_size=224).pos_embed.shape == (1, 197, 768)


@pytest.mark.parametrize("name,expected", [
    ("ViT-B_16", 85_806_346), ("ViT-B_32", 87_462_922), ("ViT-L_16", 303_311_882), ("ViT-L_32", 305_520_650),
])
def test_parameter_counts_match_the_reference_port(name, expected):
    with torch.device("meta"):  # counts need shapes only; skip allocating 300M floats
        model = create_model(name, img_size=224, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_hybrid_parameter_count():
    with torch.device("meta"):
        model = create_model("R50-ViT-B_16", img_size=224, num_classes=10)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 97.9


def test_sizes_table_parses_any_patch_and_lists_names():
    cfg = get_config("ViT-S_4")
    assert (cfg.hidden_size, cfg.transformer.num_layers, cfg.transformer.mlp_dim, cfg.transformer.num_heads,
            cfg.patches.size) == (384, 12, 1536, 6, (4, 4))
    assert get_config("ViT-H_14").transformer.num_layers == 32
    names = list_models()
    for name in ("testing", "ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14", "R50-ViT-B_16"):
        assert name in names


def test_overrides_reach_the_network():
    model = create_model("ViT-Ti_4", num_classes=100, hidden_size=96, num_heads=4, num_layers=3,
                         representation_size=64, classifier="gap")
    assert len(model.blocks) == 3 and model.cls_token is None
    assert model.pos_embed.shape == (1, 64, 96)
    assert model.head.weight.shape == (100, 64)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="ViT-X_16"), "unknown model 'ViT-X_16'"),
    (dict(name="ViT-B_16", img_size=30), "does not divide the image size 30"),
    (dict(name="R50-ViT-B_16", img_size=40), "does not divide the image size 40"),
    (dict(name="ViT-B_16", num_heads=5), "not divisible by 5 heads"),
    (dict(name="ViT-B_16", classifier="mean"), "classifier must be"),
])
def test_bad_configs_raise_one_line_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message) as error:
        create_model(**kwargs)
    assert "\n" not in str(error.value)


# --- Google .npz checkpoints -------------------------------------------------------------------------------------

def write_google_npz(path, state_dict, num_heads):
    """Write a timm/our state dict under Google's official Flax names and layouts (the inverse of the loader)."""
    sd = {k: v.detach().numpy() for k, v in state_dict.items()}
    D = sd["cls_token"].shape[-1]
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"],
    }
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(layers):
        b, g = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        for j, name in enumerate(("query", "key", "value")):
            w[f"{g}/MultiHeadDotProductAttention_1/{name}/kernel"] = (
                sd[f"{b}.attn.qkv.weight"][j * D:(j + 1) * D].T.reshape(D, num_heads, D // num_heads))
            w[f"{g}/MultiHeadDotProductAttention_1/{name}/bias"] = (
                sd[f"{b}.attn.qkv.bias"][j * D:(j + 1) * D].reshape(num_heads, D // num_heads))
        w[f"{g}/MultiHeadDotProductAttention_1/out/kernel"] = sd[f"{b}.attn.proj.weight"].T.reshape(
            num_heads, D // num_heads, D)
        w[f"{g}/MultiHeadDotProductAttention_1/out/bias"] = sd[f"{b}.attn.proj.bias"]
        for ln, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{g}/{ln}/scale"], w[f"{g}/{ln}/bias"] = sd[f"{b}.{ours}.weight"], sd[f"{b}.{ours}.bias"]
        for j in (0, 1):
            w[f"{g}/MlpBlock_3/Dense_{j}/kernel"] = sd[f"{b}.mlp.fc{j + 1}.weight"].T
            w[f"{g}/MlpBlock_3/Dense_{j}/bias"] = sd[f"{b}.mlp.fc{j + 1}.bias"]
    for key, value in sd.items():  # the hybrid's ResNet stem
        if key.startswith("stem."):
            parts = key.split(".")
            kind = {"weight": "kernel" if value.ndim == 4 else "scale", "bias": "bias"}[parts[-1]]
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
            if parts[1] in ("root_conv", "root_gn"):
                w[f"{'conv_root' if parts[1] == 'root_conv' else 'gn_root'}/{kind}"] = value
            else:
                layer = {"0": "conv_proj", "1": "gn_proj"}[parts[5]] if parts[4] == "downsample" else parts[4]
                w[f"block{int(parts[2]) + 1}/unit{int(parts[3]) + 1}/{layer}/{kind}"] = value
    np.savez(path, **w)


def test_google_npz_reproduces_timm_logits(tmp_path):
    cfg = get_config("testing")
    reference = randomize(timm_model(cfg, 32, 10))
    write_google_npz(tmp_path / "testing.npz", reference.state_dict(), cfg.transformer.num_heads)
    ours = create_model("testing", num_classes=10, dropout_rate=0.0).eval()
    assert load_pretrained(ours, tmp_path / "testing.npz") == []
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(images) - reference(images)).abs().max() <= 1e-4


def test_224px_npz_in_a_32px_model_resizes_position_embeddings_like_timm(tmp_path):
    cfg = get_config("ViT-Ti_16")
    source = randomize(timm_model(cfg, 224, 1000))
    npz = tmp_path / "ViT-Ti_16.npz"
    write_google_npz(npz, source.state_dict(), cfg.transformer.num_heads)
    reference = timm_model(cfg, 32, 1000).eval()
    timm_vit._load_weights(reference, str(npz))  # timm's own .npz loader, the behaviour to match
    ours = create_model("ViT-Ti_16", img_size=32, num_classes=1000).eval()
    notes = load_pretrained(ours, npz)
    assert notes == ["position embeddings resized from a 14×14 grid to 2×2"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(images) - reference(images)).abs().max() <= 1e-4


def test_new_class_count_keeps_a_zero_head_and_says_so(tmp_path):
    source = randomize(create_model("testing", num_classes=1000))
    torch.save(source.state_dict(), tmp_path / "timm_style.pth")
    ours = create_model("testing", num_classes=10)
    notes = load_pretrained(ours, tmp_path / "timm_style.pth")
    assert any("1000 classes" in note for note in notes)
    assert not ours.head.weight.any()
    assert torch.equal(ours.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_mismatched_checkpoint_names_the_tensor_and_both_shapes(tmp_path):
    torch.save(create_model("testing", hidden_size=48).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(UserError, match=r"'cls_token' is \(1, 1, 48\) in the checkpoint and "
                                        r"\(1, 1, 32\) in the model"):
        load_pretrained(create_model("testing"), tmp_path / "wide.pth")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the hostile file's protocol
def test_pickled_objects_and_non_checkpoints_are_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"head.weight": Payload()}, f)
    (tmp_path / "text.npz").write_text("not a zip file")
    for name in ("evil.pth", "text.npz", "missing.npz"):
        with pytest.raises(UserError):
            load_pretrained(create_model("testing"), tmp_path / name)


def test_hybrid_npz_layout_agrees_with_timms_loader(tmp_path):
    """Our reading of Google's hybrid checkpoint agrees with timm's, up to timm's different norm epsilons."""
    timm = pytest.importorskip("timm")
    ours = randomize(create_model("R50-ViT-B_16", img_size=64, num_classes=10, num_layers=1))
    with torch.no_grad():  # GroupNorm scales near 1, as in trained networks, so signals survive 16 units
        for name, p in ours.named_parameters():
            if ".gn" in name or "root_gn" in name or "downsample.1" in name:
                p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
    write_google_npz(tmp_path / "r50.npz", ours.state_dict(), num_heads=12)
    reference = timm.create_model("vit_base_r50_s16_224", img_size=64, num_classes=10, depth=1).eval()
    timm_vit._load_weights(reference, str(tmp_path / "r50.npz"))
    fresh = create_model("R50-ViT-B_16", img_size=64, num_classes=10, num_layers=1).eval()
    load_pretrained(fresh, tmp_path / "r50.npz")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, expected = fresh(images), reference(images)
    assert torch.equal(logits, ours(images))
    assert (logits - expected).abs().max() <= 2e-3 * expected.abs().max()


def test_hybrid_npz_in_the_released_groupnorm_layout_gives_the_same_logits(tmp_path):
    """Google's released R50+ViT-B_16 files keep every GroupNorm scale and bias as (1, 1, 1, C), not (C,)."""
    ours = randomize(create_model("R50-ViT-B_16", img_size=32, num_classes=10, num_layers=1))
    write_google_npz(tmp_path / "flat.npz", ours.state_dict(), num_heads=12)
    with np.load(tmp_path / "flat.npz") as flat:
        released = {key: flat[key] for key in flat.files}
    group_norms = [key for key in released if re.search(r"(^|/)gn[^/]*/(scale|bias)$", key)]
    assert len(group_norms) == 2 * (1 + 3 * (3 + 4 + 9) + 3)  # root, three per unit, one per stage's projection
    released.update({key: released[key].reshape(1, 1, 1, -1) for key in group_norms})
    np.savez(tmp_path / "released.npz", **released)
    images = torch.randn(2, 3, 32, 32)
    logits = []
    for name in ("flat.npz", "released.npz"):
        model = create_model("R50-ViT-B_16", img_size=32, num_classes=10, num_layers=1).eval()
        assert load_pretrained(model, tmp_path / name) == []
        for key, value in ours.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (name, key)
        with torch.no_grad():
            logits.append(model(images))
    assert torch.equal(logits[0], logits[1])


def test_cpu_dropout_drops_p_and_keeps_the_expectation():
    from vit_train.models.vit import Dropout

    torch.manual_seed(0)
    dropout = Dropout(0.1)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 2e-3  # 1e6 draws: std of the fraction is 3e-4
    assert abs(y.mean().item() - 1.0) < 5e-3
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)  # gradients flow exactly where values were kept
    assert torch.equal(dropout.eval()(x), x)
    assert dropout.train()(x.detach().bfloat16()).dtype == torch.bfloat16  # autocast activations stay bf16
    torch.manual_seed(1)
    a = Dropout(0.1).train()(torch.ones(64))
    torch.manual_seed(1)
    assert torch.equal(a, Dropout(0.1).train()(torch.ones(64)))  # seeded like the rest of torch


def test_safetensors_and_vit_train_checkpoints_load(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    source = randomize(create_model("testing", num_classes=10))
    safetensors.save_file(source.state_dict(), tmp_path / "w.safetensors")
    torch.save({"model": source.state_dict(), "step": 3}, tmp_path / "last.pt")  # a vit-train checkpoint's layout
    images = torch.randn(2, 3, 32, 32)
    for name in ("w.safetensors", "last.pt"):
        ours = create_model("testing", num_classes=10).eval()
        assert load_pretrained(ours, tmp_path / name) == []
        with torch.no_grad():
            assert torch.equal(ours(images), source(images))


@pytest.mark.parametrize("name, overrides", [("testing", {}), ("ViT-Ti_4", {"num_layers": 3, "mlp_dim": 200}),
                                             ("R50-ViT-B_16", {"num_layers": 1})])
def test_block_parameters_counts_the_blocks_exactly(name, overrides):
    """The memory check before building (resolve.validate) counts the blocks from the config alone."""
    config = apply_overrides(get_config(name), **overrides)
    model = create_model(name, img_size=224 if "R50" in name else 32, **overrides)
    assert block_parameters(config) == sum(p.numel() for p in model.blocks.parameters())
