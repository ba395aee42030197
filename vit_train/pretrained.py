"""Load pretrained weights into our ViT: Google's official `.npz` files, timm state dicts, vit-train checkpoints,
from a path or by the name of a Google release (vit_train/hub.py downloads it into a cache).

Google's checkpoints are Flax parameter trees flattened to `/`-joined names. Flax keeps kernels as
(in, out) — (kh, kw, in, out) for convolutions — and attention kernels split by head, so every weight is
transposed or reshaped on its way in; each line of `npz_to_state_dict` shows which. Our parameter names are
timm's, so timm state dicts need no renaming.

Two adaptations are made, and reported, rather than refused:
- a different patch grid (e.g. a 224-px checkpoint in a 32-px model): the position embeddings are resized
  bilinearly without antialiasing, the CLS row kept, as timm's `.npz` loader does;
- a different class count: the classifier head keeps its fresh zero initialisation (fine-tuning).
Any other mismatch is an error naming the tensor and both shapes: never a silent partial load.
"""
import pickle
import zipfile

import numpy as np
import torch

from vit_train.errors import UserError, first_line
from vit_train.hub import weights_file
from vit_train.models.vit import resize_position_grid


def load_pretrained(model: torch.nn.Module, path, new_head: bool = True) -> list:
    """Load the weights at `path`, a file or a released name, into `model` in place; returns notes on what was
    adapted, for the user.

    new_head=False (evaluation) refuses a head of another class count instead of starting it from zeros.
    """
    state_dict = read_weights(path)
    notes = []
    if "pos_embed" in state_dict:
        state_dict["pos_embed"], note = resize_pos_embed(state_dict["pos_embed"], model)
        notes += [note] if note else []
    own = model.state_dict()
    head_shape = tuple(state_dict.get("head.weight", torch.empty(0)).shape)
    # Only another class count is the head's own mismatch; any other shape is check_compatible's to name.
    if "head.weight" in state_dict and head_shape[:1] != tuple(own["head.weight"].shape[:1]):
        if not new_head:
            raise UserError(f"{path} has a head of {head_shape[0]} classes and the model {model.num_classes}; "
                            "give weights fine-tuned on this dataset, or fine-tune these with vit-train --pretrained")
        del state_dict["head.weight"], state_dict["head.bias"]
        notes.append(f"the checkpoint's head has {head_shape[0]} classes and the model {model.num_classes}: "
                     f"the head starts from zeros (fine-tuning)")
        state_dict.update({k: own[k] for k in ("head.weight", "head.bias")})
    if "pre_logits.0.weight" in state_dict and "pre_logits.0.weight" not in own:
        del state_dict["pre_logits.0.weight"], state_dict["pre_logits.0.bias"]
        notes.append("the checkpoint's pre-logits layer is dropped (the model has no representation_size), "
                     "as the reference fine-tuning code does")
    check_compatible(own, state_dict, path)
    model.load_state_dict(state_dict)
    return notes


def read_weights(path) -> dict:
    """A state dict in our (timm's) naming from any supported file, or from a released name's file."""
    path = weights_file(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return npz_to_state_dict({key: npz[key] for key in npz.files})
        except (ValueError, OSError, zipfile.BadZipFile) as error:
            # numpy's own words for a file that is no .npz of arrays advise allow_pickle, which is never right here
            why = "not a .npz archive of arrays" if "pickle" in str(error) else first_line(error)
            raise UserError(f"{path} is not a readable .npz checkpoint ({why})") from None
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"reading {path} needs safetensors: pip install safetensors") from None
        return load_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise UserError(f"{path} is not a loadable weights file: {first_line(error)}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]  # a vit-train checkpoint
    elif isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return {key.removeprefix("module.").removeprefix("_orig_mod."): value for key, value in loaded.items()}


def npz_to_state_dict(w: dict) -> dict:
    """Google's Flax names and layouts -> ours. Kernels (in, out) become weights (out, in)."""
    def dense(name):  # Flax Dense kernel (in, out) -> Linear weight (out, in)
        return tensor(w[f"{name}/kernel"]).T

    def conv(name):  # Flax conv kernel (kh, kw, in, out) -> Conv2d weight (out, in, kh, kw)
        return tensor(w[f"{name}/kernel"]).permute(3, 2, 0, 1)

    def norm(ours, theirs):
        return {f"{ours}.weight": tensor(w[f"{theirs}/scale"]), f"{ours}.bias": tensor(w[f"{theirs}/bias"])}

    sd = {"patch_embed.proj.weight": conv("embedding"), "patch_embed.proj.bias": tensor(w["embedding/bias"])}
    if "cls" in w:
        sd["cls_token"] = tensor(w["cls"])
    sd["pos_embed"] = tensor(w["Transformer/posembed_input/pos_embedding"])
    num_layers = len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")})
    for i in range(num_layers):
        theirs, ours = f"Transformer/encoderblock_{i}", f"blocks.{i}"
        attn = f"{theirs}/MultiHeadDotProductAttention_1"
        # q, k, v kernels are (D, heads, head_dim): flatten the heads, transpose, stack into one qkv Linear.
        sd[f"{ours}.attn.qkv.weight"] = torch.cat(
            [tensor(w[f"{attn}/{n}/kernel"]).flatten(1).T for n in ("query", "key", "value")])
        sd[f"{ours}.attn.qkv.bias"] = torch.cat(
            [tensor(w[f"{attn}/{n}/bias"]).flatten() for n in ("query", "key", "value")])
        # the output kernel is (heads, head_dim, D)
        sd[f"{ours}.attn.proj.weight"] = tensor(w[f"{attn}/out/kernel"]).flatten(0, 1).T
        sd[f"{ours}.attn.proj.bias"] = tensor(w[f"{attn}/out/bias"])
        sd.update(norm(f"{ours}.norm1", f"{theirs}/LayerNorm_0"))
        sd.update(norm(f"{ours}.norm2", f"{theirs}/LayerNorm_2"))
        for j in (0, 1):
            sd[f"{ours}.mlp.fc{j + 1}.weight"] = dense(f"{theirs}/MlpBlock_3/Dense_{j}")
            sd[f"{ours}.mlp.fc{j + 1}.bias"] = tensor(w[f"{theirs}/MlpBlock_3/Dense_{j}/bias"])
    sd.update(norm("norm", "Transformer/encoder_norm"))
    if "pre_logits/kernel" in w:
        sd["pre_logits.0.weight"], sd["pre_logits.0.bias"] = dense("pre_logits"), tensor(w["pre_logits/bias"])
    sd["head.weight"], sd["head.bias"] = dense("head"), tensor(w["head/bias"])
    if "conv_root/kernel" in w:
        sd.update(_resnet_npz_to_state_dict(w, conv, norm))
    return sd


def _resnet_npz_to_state_dict(w, conv, norm) -> dict:
    """The hybrid's ResNet stem: `conv_root`, `gn_root`, `block{s}/unit{u}/{conv,gn}{1,2,3}` and the projection."""
    def group_norm(ours, theirs):
        # Google's released R50+ViT-B_16 files keep GroupNorm scale and bias as (1, 1, 1, C), the layout of Flax
        # before 0.3.6 (google-research/vision_transformer issue 156); later Flax keeps (C,).
        return {key: value.squeeze((0, 1, 2)) if value.ndim == 4 else value
                for key, value in norm(ours, theirs).items()}

    sd = {"stem.root_conv.weight": conv("conv_root"), **group_norm("stem.root_gn", "gn_root")}
    units = sorted({tuple(k.split("/")[:2]) for k in w if k.startswith("block")})
    for block, unit in units:
        theirs = f"{block}/{unit}"
        ours = f"stem.stages.{int(block[5:]) - 1}.{int(unit[4:]) - 1}"
        for r in (1, 2, 3):
            sd[f"{ours}.conv{r}.weight"] = conv(f"{theirs}/conv{r}")
            sd.update(group_norm(f"{ours}.gn{r}", f"{theirs}/gn{r}"))
        if f"{theirs}/conv_proj/kernel" in w:
            sd[f"{ours}.downsample.0.weight"] = conv(f"{theirs}/conv_proj")
            sd.update(group_norm(f"{ours}.downsample.1", f"{theirs}/gn_proj"))
    return sd


def tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def resize_pos_embed(pos_embed: torch.Tensor, model) -> tuple:
    """Position embeddings for the model's grid: bilinear, no antialias, prefix (CLS) rows unchanged."""
    target = model.pos_embed.shape
    if pos_embed.shape == target:
        return pos_embed, None
    prefix = model.num_prefix_tokens
    old_tokens = pos_embed.shape[1] - prefix
    old_grid = int(round(old_tokens**0.5))
    if pos_embed.ndim != 3 or pos_embed.shape[2] != target[2] or old_grid**2 != old_tokens:
        return pos_embed, None  # not a grid change: `check_compatible` names the mismatch
    grid = model.grid_size
    resized = resize_position_grid(pos_embed, prefix, grid)
    return resized, f"position embeddings resized from a {old_grid}×{old_grid} grid to {grid}×{grid}"


def check_compatible(own: dict, incoming: dict, path):
    """Refuse any missing, unexpected or differently shaped tensor, naming the first one."""
    for key, value in own.items():
        if key not in incoming:
            raise UserError(f"{path} does not fit the model: it has no tensor {key!r} {tuple(value.shape)}; "
                            f"is it the same model name?")
        if incoming[key].shape != value.shape:
            raise UserError(f"{path} does not fit the model: {key!r} is {tuple(incoming[key].shape)} in the "
                            f"checkpoint and {tuple(value.shape)} in the model; is it the same model name?")
    unexpected = [key for key in incoming if key not in own]
    if unexpected:
        raise UserError(f"{path} does not fit the model: it has {len(unexpected)} tensors the model lacks, "
                        f"first {unexpected[0]!r}; is it the same model name?")
