"""What every model input goes through, in training, evaluation and prediction: uint8 pixels -> float, normalised
by the dataset's mean and std (or Google's [-1, 1] scaling), resized to the model's image size."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vit_train.runtime import device_constant

# Per-channel mean and std of each dataset's training images, on the 0..1 scale. Image folders get ImageNet's, the
# usual guess for photographs of unknown origin; the synthetic set's are those of its uniform colours plus noise.
DATASET_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.3, 0.3, 0.3)),
}
# Google's pretrained ViT weights were trained on inputs scaled to [-1, 1].
INCEPTION_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))




def normalization(data_cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel on the 0..1 scale for this data config."""
    if data_cfg.normalize == "inception":
        return INCEPTION_STATS
    return DATASET_STATS[data_cfg.name]


def preprocess_images(images: torch.Tensor, data_cfg, img_size: int) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float32 (B, 3, img_size, img_size), normalised; resized bilinearly if needed."""
    mean, std = (device_constant(v, images.device).view(1, 3, 1, 1) * 255 for v in normalization(data_cfg))
    x = images.to(torch.float32, copy=True).sub_(mean).div_(std)  # the copy keeps a float input from changing
    # Normalising first is exact (bilinear weights sum to 1) and cheaper when upsampling 32 px to 224 or 384.
    return resize_images(x, img_size)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (B, 3, H, W) at size x size: bilinear with antialiasing; unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


