"""Label mixing: mixup and cutmix on normalised batches, with soft targets."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

class LabelMixing:
    """Mixup and cutmix with soft targets, one of them per batch (50/50 when both are on), as timm does.

    Each image is mixed with its mirror in the (per-rank) batch, image i with image n-1-i. The returned targets
    are class probabilities, so `F.cross_entropy(logits, targets)` is the label-mixing loss.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int):
        self.alphas = [(mode, alpha) for mode, alpha in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if alpha > 0]
        self.num_classes = num_classes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        mode, alpha = self.alphas[rng.integers(len(self.alphas))]
        lam = float(rng.beta(alpha, alpha))
        partner = images.flip(0)
        if mode == "mixup":
            images = images.mul(lam).add_(partner, alpha=1.0 - lam)
        else:
            (top, bottom), (left, right) = cutmix_box(rng, lam, images.shape[-2:])
            images = images.clone()
            images[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
        one_hot = F.one_hot(labels, self.num_classes).float()
        return images, one_hot.mul(lam).add_(one_hot.flip(0), alpha=1.0 - lam)


def cutmix_box(rng: np.random.Generator, lam: float, size) -> list[tuple[int, int]]:
    """[(top, bottom), (left, right)] of a box covering about 1 - lam of the image, centred uniformly, clipped."""
    side = math.sqrt(1.0 - lam)
    spans = []
    for length in size:
        half, centre = int(length * side) // 2, int(rng.integers(length))
        spans.append((max(centre - half, 0), min(centre + half, length)))
    return spans


