"""The ResNet stem of the hybrid R50-ViT-B_16 (section 3.1 of the paper, "Hybrid Architecture").

It is the BiT flavour of ResNet used by the original code: convolutions with standardised weights, GroupNorm
with 32 groups instead of BatchNorm, a 7×7/2 root convolution and a 3×3/2 max-pool, then bottleneck units.
With three stages of (3, 4, 9) units the map is downsampled 16× (2 root, 2 pool, 1, 2, 2), so at 32 px it is
2×2 and at 224 px 14×14; the transformer then embeds it with 1×1 patches.

Convolutions pad like TensorFlow's 'SAME' (the extra pixel goes after, not before), so Google's weights see the
same pixels they were trained on.
"""
import torch
import torch.nn.functional as F
from torch import nn

from vit_train.models.configs import resnet_downsample

GROUP_NORM_EPS = 1e-6  # Flax's GroupNorm default
WEIGHT_STD_EPS = 1e-5  # as in the original StdConv: (w - mean) / (std + eps)


def pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad so that a kernel/stride window gives ceil(size / stride) outputs, the extra pixel after (TF 'SAME')."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension first
        total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2d(nn.Conv2d):
    """Weight-standardised convolution (Qiao et al. 2019): each filter is normalised to zero mean, unit std."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
                                                        + WEIGHT_STD_EPS)
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=GROUP_NORM_EPS)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided) → 1×1 convolutions, each followed by GroupNorm, ReLU after the residual sum."""

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = 4 * width
        self.conv1 = StdConv2d(in_channels, width, 1, bias=False)
        self.gn1 = group_norm(width)
        self.conv2 = StdConv2d(width, width, 3, stride=stride, bias=False)
        self.gn2 = group_norm(width)
        self.conv3 = StdConv2d(width, out_channels, 1, bias=False)
        self.gn3 = group_norm(out_channels)
        nn.init.zeros_(self.gn3.weight)  # each unit starts as the identity, as in the original
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                StdConv2d(in_channels, out_channels, 1, stride=stride, bias=False), group_norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class ResNetV2(nn.Module):
    """Root (conv 7×7/2, GroupNorm, ReLU, max-pool 3×3/2) and stages of bottleneck units; stage i has width
    64·2^i·width_factor and all but the first start with stride 2."""

    def __init__(self, num_layers=(3, 4, 9), width_factor: int = 1):
        super().__init__()
        width = int(64 * width_factor)
        self.root_conv = StdConv2d(3, width, 7, stride=2, bias=False)
        self.root_gn = group_norm(width)
        stages, in_channels = [], width
        for i, units in enumerate(num_layers):
            stage_width = width * 2**i
            stage = [Bottleneck(in_channels, stage_width, stride=1 if i == 0 else 2)]
            stage += [Bottleneck(4 * stage_width, stage_width, stride=1) for _ in range(units - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = 4 * stage_width
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_channels
        self.downsample = resnet_downsample(num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.root_gn(self.root_conv(x)))
        x = F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)
        return self.stages(x)
