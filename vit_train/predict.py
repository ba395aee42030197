"""The per-image tools: a trained model's top classes for image files, and where it looks (attention rollout).

    image files ─► preprocess_images, as the test split is ─► model ─► top-k classes | attention rollout

Training uses `attention_image` too, for the picture it logs to TensorBoard at each evaluation.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from vit_train.checkpoint import write_atomically
from vit_train.data import load_rgb, normalization, preprocess_images
from vit_train.errors import UserError
from vit_train.evaluate import LoadedModel
from vit_train.runtime import device_constant


def read_image(path) -> torch.Tensor:
    """An image file of any size and format PIL reads, as uint8 (3, H, W) RGB."""
    return pil_to_tensor(load_rgb(str(path)))


def model_input(loaded: LoadedModel, image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> the normalised (1, 3, S, S) batch the model takes, resized and normalised as the
    test split is."""
    device = next(loaded.model.parameters()).device
    return preprocess_images(image[None].to(device), loaded.config.data, loaded.config.img_size)


@torch.no_grad()
def predict(loaded: LoadedModel, image: torch.Tensor, top_k=5) -> list:
    """[(class name, probability), ...] for the top_k classes of one uint8 (3, H, W) image, most likely first."""
    return top_classes(loaded.model(model_input(loaded, image))[0], loaded.class_names, top_k)


def top_classes(logits: torch.Tensor, class_names: list, k: int) -> list:
    """[(class name, probability), ...] for the k most likely classes of one image's logits."""
    values, indices = logits.float().softmax(dim=0).topk(min(k, len(class_names)))
    return [(class_names[i], p) for i, p in zip(indices.tolist(), values.tolist())]


# ---------------------------------------------------------------------------------------------------------------
# Attention rollout (Abnar & Zuidema 2020): how much each input patch flows into the classifier's token.

def attention_rollout(attentions: list) -> torch.Tensor:
    """Per-layer attention probabilities [(B, heads, T, T), ...] -> rolled-out attention (B, T, T).

    Each layer's heads are averaged and the identity added for the residual connection (half of what reaches a
    token is the token itself), rows renormalised; the layers' matrices multiplied, first layer rightmost.
    """
    rollout = None
    for probs in attentions:
        layer = probs.float().mean(dim=1)
        layer = layer + torch.eye(layer.shape[-1], device=layer.device)
        layer = layer / layer.sum(dim=-1, keepdim=True)
        rollout = layer if rollout is None else layer @ rollout
    return rollout


@torch.no_grad()
def attention_map(model, images: torch.Tensor) -> tuple:
    """(logits, heat (B, grid, grid) in 0..1): the rollout from the classifier's input over the patches.

    The classifier reads the CLS token, or with classifier='gap' the mean of all tokens, so the heat is the CLS
    row, or the mean of the rows. Each map is stretched to 0..1: rollout values differ little between patches.
    """
    logits, attentions = model(images, return_attention=True)
    rollout = attention_rollout(attentions)
    rows = rollout[:, 0] if model.use_cls_token else rollout.mean(dim=1)
    heat = rows[:, model.num_prefix_tokens:].reshape(-1, model.grid_size, model.grid_size)
    low = heat.amin(dim=(1, 2), keepdim=True)
    high = heat.amax(dim=(1, 2), keepdim=True)
    return logits, (heat - low) / (high - low).clamp(min=1e-12)


def jet(heat: torch.Tensor) -> torch.Tensor:
    """The 'jet' colour map, blue (0) to red (1), for a (H, W) map in 0..1 -> (3, H, W)."""
    centres = torch.tensor([3.0, 2.0, 1.0], device=heat.device).view(3, 1, 1)  # red, green and blue peaks
    return (1.5 - (4 * heat - centres).abs()).clamp(0, 1)


def attention_panel(image: torch.Tensor, heat: torch.Tensor, longer_side: int) -> torch.Tensor:
    """[image | image with the heat map blended over it], float (3, h, 2w) in 0..1, the image scaled so that its
    longer side is `longer_side` pixels. `image` is float (3, H, W) in 0..1; `heat` the (grid, grid) map, which
    covers the whole image, as the model saw it squeezed into its square input."""
    height, width = image.shape[-2:]
    scale = longer_side / max(height, width)
    size = (round(height * scale), round(width * scale))
    # Small images (CIFAR's 32 px) are enlarged pixel by pixel, so they look like what the model saw.
    mode = "nearest-exact" if scale > 1 else "bilinear"
    shown = F.interpolate(image[None], size, mode=mode, antialias=scale < 1)[0]
    heat = F.interpolate(heat[None, None], size, mode="bilinear", align_corners=False)[0, 0]
    return torch.cat([shown, 0.5 * shown + 0.5 * jet(heat)], dim=2)


def attention_figure(loaded: LoadedModel, image: torch.Tensor, longer_side=384) -> tuple:
    """(panel (3, h, 2w) float in 0..1, [(class, probability)] top 3) for one uint8 (3, H, W) image."""
    logits, heat = attention_map(loaded.model, model_input(loaded, image))
    panel = attention_panel(image.float().div(255).to(heat.device), heat[0], longer_side)
    return panel.cpu(), top_classes(logits[0], loaded.class_names, 3)


def attention_image(model, images: torch.Tensor, data_cfg, longer_side=96) -> torch.Tensor:
    """For TensorBoard: normalised test images (B, 3, S, S) -> one float (3, H, W) image in 0..1 with a row
    [image | attention rollout] per image. `SummaryWriter.add_image(tag, attention_image(...), step)`."""
    mean, std = (device_constant(v, images.device).view(1, 3, 1, 1) for v in normalization(data_cfg))
    was_training = model.training
    model.eval()
    try:
        _, heat = attention_map(model, images)
    finally:
        model.train(was_training)
    originals = (images * std + mean).clamp(0, 1)
    return torch.cat([attention_panel(x, h, longer_side) for x, h in zip(originals, heat)], dim=1).cpu()


# The suffixes vit-attention writes, and the format each names: a picture called x.jpg must hold JPEG bytes.
PICTURE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF",
                   ".tif": "TIFF", ".tiff": "TIFF"}


def image_format(path) -> str:
    """The format the suffix of `path` names ('.jpg' -> 'JPEG'), or a UserError listing the suffixes known."""
    if name := PICTURE_FORMATS.get(Path(path).suffix.lower()):
        return name
    raise UserError(f"cannot tell which picture format to write from the name {str(path)!r}: end it with "
                    f"{', '.join(PICTURE_FORMATS)}")


def save_image(image: torch.Tensor, path):
    """Write a float (3, H, W) image in 0..1 in the format its suffix names (image_format)."""
    pixels = image.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    write_atomically(path, lambda f: Image.fromarray(pixels).save(f, format=image_format(path)))
