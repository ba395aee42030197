"""Augmentation on the training device: random crop and flip, the RandAugment family and AutoAugment on uint8
batches, random erasing on normalised ones.

Parameters are drawn on the host for the whole global batch, from a generator keyed by (seed, epoch, batch), so
every rank draws the same ones and takes its slice. The ops then run on the device as a fixed number of batched
tensor operations, whatever the batch size or the draws, and give what torchvision's per-image ops give for the
same parameters, bit for bit (tests/test_augment.py checks every op at every magnitude, on the CPU and on CUDA).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from vit_train.errors import UserError
from vit_train.runtime import device_constant, to_device

PADDING_MODES = ("reflect", "zeros")


def random_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int,
                     padding_mode: str) -> torch.Tensor:
    """Crop image i at offsets[i] (top, left) from itself padded by `padding`, mirrored where flips[i].

    One gather does it all: the padded image is never built. Each output pixel's source row and column are
    computed, mirrored back inside the image ('reflect') or marked as padding ('zeros'), and a flip only reverses
    the order of the columns. Offsets lie in [0, 2 * padding], so a crop stays within the padded image.
    """
    n, c, h, w = images.shape
    rows = offsets[:, :1] - padding + torch.arange(h, device=images.device)  # (n, h), in [-padding, h-1+padding]
    cols = offsets[:, 1:] - padding + torch.arange(w, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    if padding_mode == "reflect":  # -1 -> 1, h -> h-2: the edge pixel is not repeated
        rows = (h - 1) - ((h - 1) - rows.abs()).abs()
        cols = (w - 1) - ((w - 1) - cols.abs()).abs()
    else:
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    pixel = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    out = images.reshape(n, c, h * w).gather(2, pixel).view(n, c, h, w)
    return out if padding_mode == "reflect" else torch.where(inside[:, None], out, 0)


# --------------------------------------------------------------------------------------------------------------
# The image ops of RandAugment, TrivialAugmentWide and AutoAugment, each on a uint8 batch with one row of
# parameters per image (PARAMETERS floats; what they mean is the op's own).
#
# Each reproduces torchvision's op on uint8 tensors exactly, rounding included. torchvision computes in float32,
# clamps to [0, 255] and truncates to uint8. Its blends, `x.mul(factor).add_(other, alpha=1 - factor)`, round
# x * factor to float32 and then add alpha * other with one rounding (torch's add with alpha is a fused
# multiply-add, on the CPU and in CUDA). That second step is evaluated here in float64, where it is exact for 8-bit
# pixels and float32 factors, and rounded once to float32: the same result, with per-image factors.

PARAMETERS = 6  # the widest row: an affine matrix


def affine_resample(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample image i through the inverse affine matrix in row i (2 x 3, pixel units, origin at the image
    centre): nearest neighbour, zeros outside. The sampling grid is built as torchvision's affine and rotate build
    theirs (pixel centres, the matrix in float32 scaled by the half-size, one matmul), so grid_sample picks the
    source pixel torchvision picks."""
    n, c, h, w = images.shape
    device = images.device
    xs = torch.linspace((1 - w) * 0.5, (w - 1) * 0.5, w, device=device)
    ys = torch.linspace((1 - h) * 0.5, (h - 1) * 0.5, h, device=device)
    pixels = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=device)], dim=-1)
    theta = matrices.reshape(n, 2, 3).transpose(1, 2) / device_constant((0.5 * w, 0.5 * h), device)
    grid = pixels.view(1, h * w, 3).expand(n, h * w, 3).bmm(theta).view(n, h, w, 2)
    return F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False).to(torch.uint8)


def brightness(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Scale by the factor in params[:, 0]."""
    return (images.float() * params[:, 0, None, None, None]).clamp_(0, 255).to(torch.uint8)


def blend(images: torch.Tensor, other: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """images * factor + other * (1 - factor), factor in params[:, 0] and 1 - factor in params[:, 1], each rounded
    to float32 as torchvision passes them to torch."""
    scaled = (images.float() * params[:, 0, None, None, None]).double()
    mixed = torch.addcmul(scaled, other.double(), params[:, 1, None, None, None].double())
    return mixed.float().clamp_(0, 255).to(torch.uint8)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma in float32, floored: the grey that torchvision's saturation and contrast blend towards."""
    r, g, b = images.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def color(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Saturation: blend towards the image's grey."""
    return blend(images, grayscale(images), params)


def contrast(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Contrast: blend towards the mean of the image's grey."""
    return blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True), params)


def sharpness(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Blend towards a smoothed image (3 x 3, a 5 amid 1s, over 13; rounded), 1 - factor in params[:, 1]; the
    border pixels, which the smoothing does not reach, keep their values."""
    c = images.shape[1]
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = device_constant(((a, a, a), (a, b, a), (a, a, a)), images.device).expand(c, 1, 3, 3)
    x = images.float()
    smoothed = F.conv2d(x, kernel, groups=c).round_()
    step = F.pad(smoothed - x[:, :, 1:-1, 1:-1], (1, 1, 1, 1))  # towards the smoothed pixel; 0 on the border
    sharpened = torch.addcmul(x.double(), step.double(), params[:, 1, None, None, None].double())
    return sharpened.float().clamp_(0, 255).to(torch.uint8)


def posterize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Keep the bits set in the mask in params[:, 0]."""
    return images & params[:, 0].to(torch.uint8).view(-1, 1, 1, 1)


def solarize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Invert the pixels at or above the threshold in params[:, 0] (compared in float32, as torchvision does);
    a threshold of 0 inverts the whole image."""
    return torch.where(images >= params[:, 0, None, None, None], images.bitwise_not(), images)


def autocontrast(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Stretch each channel's range to [0, 255]; a channel of one value stays as it is."""
    x = images.float()
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    flat = high == low
    inverse_scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255))
    return ((x - torch.where(flat, 0.0, low)) / inverse_scale).clamp_(0, 255).to(torch.uint8)


def equalize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel by PIL's rule: the lookup table counts the pixels below each
    value in steps of 1/255 of the pixels outside the top non-empty bin; with fewer than 255 of those the channel
    stays as it is."""
    n, c, h, w = images.shape
    pixels = images.reshape(n, c, h * w).long()
    histogram = torch.zeros(n, c, 256, dtype=torch.long, device=images.device)
    histogram.scatter_add_(2, pixels, pixels.new_ones(()).expand_as(pixels))
    below = histogram.cumsum(2)
    top_bin = below.argmax(2, keepdim=True)  # the first bin where the count reaches all pixels
    step = (h * w - histogram.gather(2, top_bin)) // 255
    lookup = F.pad(((below[:, :, :-1] + step // 2) // step.clamp(min=1)).clamp_(max=255), (1, 0))
    equalized = lookup.gather(2, pixels).to(torch.uint8).view(n, c, h, w)
    return torch.where(step.view(n, c, 1, 1) > 0, equalized, images)


# The ops by name, with the parameter rows each computes on the host from a magnitude per image. Magnitudes are
# in torchvision's units, except that Posterize's is the number of bits dropped and Solarize's the fraction of
# the range it inverts. `signed` ops get a random sign per image.

def rows(*columns: np.ndarray, count: Optional[int] = None) -> np.ndarray:
    """Parameter rows holding `columns` first, rounded to float32 as torch rounds a Python float for a float32
    tensor."""
    table = np.zeros((len(columns[0]) if columns else count, PARAMETERS), np.float32)
    for i, column in enumerate(columns):
        table[:, i] = column
    return table


def no_parameters(magnitudes: np.ndarray, height: int, width: int) -> np.ndarray:
    return rows(count=len(magnitudes))


def enhance_factors(magnitudes: np.ndarray, height: int, width: int) -> np.ndarray:
    factors = 1.0 + magnitudes
    return rows(factors, 1.0 - factors)


def posterize_masks(magnitudes: np.ndarray, height: int, width: int) -> np.ndarray:
    bits = 8 - np.round(magnitudes).astype(np.int64)
    return rows(((1 << bits) - 1) << (8 - bits))


def solarize_thresholds(magnitudes: np.ndarray, height: int, width: int) -> np.ndarray:
    return rows(255.0 * (1.0 - magnitudes))


def inverse_affine_matrix(angle: float, translate: tuple, shear: tuple, center: tuple) -> tuple[float, ...]:
    """The inverse of the affine map `translate . centre . rotate(angle) . shear . centre^-1` (degrees; positions
    relative to the image centre), as the 6 entries of its top two rows. The float64 operations are torchvision's,
    in its order, so the float32 matrix, and with it the grid, is bit-identical to the one its affine builds."""
    rotation, shear_x, shear_y = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    # The forward rotation-shear [[a, b], [c, d]] has determinant 1: its inverse is [[d, -b], [-c, a]].
    a = math.cos(rotation - shear_y) / math.cos(shear_y)
    b = -(a * math.tan(shear_x) + math.sin(rotation))
    c = math.sin(rotation - shear_y) / math.cos(shear_y)
    d = math.cos(rotation) - c * math.tan(shear_x)
    return d, -b, cx - d * (cx + tx) - -b * (cy + ty), -c, a, cy - -c * (cx + tx) - a * (cy + ty)


@functools.lru_cache(maxsize=4096)
def geometric_matrix(name: str, magnitude: float, height: int, width: int) -> tuple[float, ...]:
    """The inverse affine matrix of torchvision's op `name` at `magnitude`: shears about the top-left corner,
    translations by whole pixels, rotations about the centre."""
    corner = (0.0 - width * 0.5, 0.0 - height * 0.5)
    no_shift = (0.0, 0.0)
    if name == "ShearX":
        return inverse_affine_matrix(0.0, no_shift, (math.degrees(math.atan(magnitude)), 0.0), corner)
    if name == "ShearY":
        return inverse_affine_matrix(0.0, no_shift, (0.0, math.degrees(math.atan(magnitude))), corner)
    if name == "TranslateX":
        return inverse_affine_matrix(0.0, (float(int(magnitude)), 0.0), no_shift, no_shift)
    if name == "TranslateY":
        return inverse_affine_matrix(0.0, (0.0, float(int(magnitude))), no_shift, no_shift)
    return inverse_affine_matrix(-(magnitude % 360), no_shift, no_shift, no_shift)  # Rotate, counter-clockwise


def geometric_matrices(name: str, magnitudes: np.ndarray, height: int, width: int) -> np.ndarray:
    values, index = np.unique(magnitudes, return_inverse=True)  # a handful of distinct magnitudes per batch
    return rows(*np.array([geometric_matrix(name, float(m), height, width) for m in values]).T)[index.ravel()]


ParameterRows = Callable[[np.ndarray, int, int], np.ndarray]
BatchedOp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AUGMENT_OPS: dict[str, tuple[bool, Optional[BatchedOp], ParameterRows]] = {  # name: (signed, op, its parameters)
    "Identity": (False, None, no_parameters),
    "ShearX": (True, affine_resample, functools.partial(geometric_matrices, "ShearX")),
    "ShearY": (True, affine_resample, functools.partial(geometric_matrices, "ShearY")),
    "TranslateX": (True, affine_resample, functools.partial(geometric_matrices, "TranslateX")),
    "TranslateY": (True, affine_resample, functools.partial(geometric_matrices, "TranslateY")),
    "Rotate": (True, affine_resample, functools.partial(geometric_matrices, "Rotate")),
    "Brightness": (True, brightness, enhance_factors),
    "Color": (True, color, enhance_factors),
    "Contrast": (True, contrast, enhance_factors),
    "Sharpness": (True, sharpness, enhance_factors),
    "Posterize": (False, posterize, posterize_masks),
    "Solarize": (False, solarize, solarize_thresholds),
    "AutoContrast": (False, autocontrast, no_parameters),
    "Equalize": (False, equalize, no_parameters),
    "Invert": (False, solarize, no_parameters),  # threshold 0: every pixel
}
OP_NAMES = list(AUGMENT_OPS)
OP_SIGNED = np.array([signed for signed, _, _ in AUGMENT_OPS.values()])
IDENTITY = OP_NAMES.index("Identity")
# Each batched op runs once a round, on the images drawn for any of its names (the five geometric ops are one).
BATCHED_OPS = list(dict.fromkeys(op for _, op, _ in AUGMENT_OPS.values() if op is not None))
OP_BATCH = np.array([BATCHED_OPS.index(op) if op else len(BATCHED_OPS) for _, op, _ in AUGMENT_OPS.values()])


def round_plan(ops: np.ndarray, magnitudes: np.ndarray, height: int, width: int):
    """One round's (order, parameter rows, bounds): images order[bounds[j]:bounds[j + 1]] get BATCHED_OPS[j] with
    parameter rows [bounds[j]:bounds[j + 1]]; the images after bounds[-1] get Identity."""
    batched_op = OP_BATCH[ops]
    order = np.argsort(batched_op, kind="stable")
    bounds = np.searchsorted(batched_op[order], np.arange(len(BATCHED_OPS) + 1))
    ops, magnitudes = ops[order], magnitudes[order]
    parameters = rows(count=len(ops))
    for op in np.unique(ops):
        drawn = ops == op
        parameters[drawn] = AUGMENT_OPS[OP_NAMES[op]][2](magnitudes[drawn], height, width)
    return order, parameters, bounds


def apply_policy_ops(images: torch.Tensor, ops: np.ndarray, magnitudes: np.ndarray) -> torch.Tensor:
    """Give image i op ops[i, k] at magnitudes[i, k], round k after round k-1.

    A round sorts the images by the batched op they get (one gather), runs every batched op once on its
    contiguous run of images (none, some or all) with their parameter rows, and puts the images back in their
    order (one more gather). So a round is a fixed number of tensor operations whatever the batch size or the
    draws, and no op computes an image that does not get it.
    """
    if ops.shape[1] == 0:
        return images
    height, width = images.shape[-2:]
    plans = [round_plan(ops[:, k], magnitudes[:, k], height, width) for k in range(ops.shape[1])]
    orders = to_device(np.stack([(order, np.argsort(order)) for order, _, _ in plans]), images.device)
    parameters = to_device(np.stack([plan[1] for plan in plans]), images.device)
    for k, (_, _, bounds) in enumerate(plans):
        grouped = images.index_select(0, orders[k, 0])
        done = [op(grouped[start:end], parameters[k, start:end])
                for op, start, end in zip(BATCHED_OPS, bounds[:-1], bounds[1:])]
        images = torch.cat([*done, grouped[bounds[-1]:]]).index_select(0, orders[k, 1])
    return images


# --------------------------------------------------------------------------------------------------------------
# Policies: how each image's ops and magnitudes are drawn.

NUM_BINS = 31  # RandAugment's magnitudes come in 31 steps from 0 to the op's maximum, as in torchvision


def magnitude_space(shear: float, translate: float, rotate: float, enhance: float, posterize: float) -> dict:
    return {"ShearX": shear, "ShearY": shear, "TranslateX": translate, "TranslateY": translate, "Rotate": rotate,
            "Brightness": enhance, "Color": enhance, "Contrast": enhance, "Sharpness": enhance,
            "Posterize": posterize, "Solarize": 1.0}


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A search space in the RandAugment family: each image gets `num_ops` ops, each drawn uniformly from the 14
    before Invert."""
    num_ops: int
    magnitude_bin: Optional[int]  # a fixed bin of NUM_BINS, or None for a uniformly random bin per op
    max_magnitudes: dict          # op name -> magnitude of the top bin; translation as a fraction of the width
    per_image_transform: Callable  # the same policy as torchvision's per-image transform, for image folders

    def magnitudes(self, width: int) -> np.ndarray:
        """(ops, NUM_BINS): the magnitude of each op at each bin, before its sign."""
        top = np.array([self.max_magnitudes.get(name, 0.0) for name in OP_NAMES])
        top[[OP_NAMES.index("TranslateX"), OP_NAMES.index("TranslateY")]] *= width
        return np.arange(NUM_BINS) / (NUM_BINS - 1) * top[:, None]

    def draw(self, rng: np.random.Generator, n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(ops, magnitudes), each (n, num_ops): which op every image gets in each round, and how strong."""
        shape = (n, self.num_ops)
        ops = rng.integers(0, OP_NAMES.index("Invert"), shape)
        if self.magnitude_bin is None:
            bins = rng.integers(0, NUM_BINS, shape)
        else:
            bins = np.full(shape, self.magnitude_bin)
        signs = np.where(OP_SIGNED[ops] & (rng.random(shape) < 0.5), -1.0, 1.0)
        return ops, self.magnitudes(width)[ops, bins] * signs


# AutoAugment's policy learnt on reduced CIFAR-10 (Cubuk et al. 2019, appendix A), as torchvision lists it:
# sub-policies of two (op, probability, magnitude bin of 10) steps.
CIFAR10_SUB_POLICIES = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
AUTOAUGMENT_BINS = 10


@dataclass(frozen=True, eq=False)  # hashed by identity, for the cache of its table
class AutoAugmentPolicy:
    """AutoAugment: each image gets one sub-policy, drawn uniformly; each of its two ops is applied with its
    probability, a signed op with a random sign."""
    sub_policies: tuple
    max_magnitudes: dict
    per_image_transform: Callable

    def magnitude(self, name: str, bin: Optional[int], width: int) -> float:
        """torchvision's magnitude for `bin`, in this module's units: 10 float32 steps (torch.linspace) from 0 to
        the top, Solarize's threshold from 1 down to 0."""
        if bin is None:
            return 0.0
        if name == "Posterize":  # torchvision keeps round(8 - bin * 4 / 9) bits
            return bin / (AUTOAUGMENT_BINS - 1) * self.max_magnitudes[name]
        if name == "Solarize":
            return 1.0 - float(torch.linspace(1.0, 0.0, AUTOAUGMENT_BINS)[bin])
        top = self.max_magnitudes[name] * (width if name.startswith("Translate") else 1)
        return float(torch.linspace(0.0, top, AUTOAUGMENT_BINS)[bin])

    @functools.lru_cache(maxsize=8)
    def table(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ops, probabilities, magnitudes), each (sub-policies, 2)."""
        steps = [step for sub_policy in self.sub_policies for step in sub_policy]
        ops = np.array([OP_NAMES.index(name) for name, _, _ in steps]).reshape(-1, 2)
        probabilities = np.array([p for _, p, _ in steps]).reshape(-1, 2)
        magnitudes = np.array([self.magnitude(name, bin, width) for name, _, bin in steps]).reshape(-1, 2)
        return ops, probabilities, magnitudes

    def draw(self, rng: np.random.Generator, n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(ops, magnitudes), each (n, 2); a step whose coin says no is Identity."""
        ops, probabilities, magnitudes = self.table(width)
        chosen = rng.integers(0, len(self.sub_policies), n)
        applied = rng.random((n, 2)) <= probabilities[chosen]  # torchvision: applied when rand() <= p
        negative = rng.random((n, 2)) <= 0.5
        ops, magnitudes = ops[chosen], magnitudes[chosen]
        signs = np.where(OP_SIGNED[ops] & negative, -1.0, 1.0)
        return np.where(applied, ops, IDENTITY), np.where(applied, magnitudes * signs, 0.0)


RANDAUGMENT_SPACE = magnitude_space(0.3, 150 / 331, 30.0, 0.9, 4)
AUGMENT_POLICIES = {
    # Cubuk et al. 2019 as torchvision implements it: two ops at magnitude 9 of 31.
    "randaugment": RandAugmentPolicy(2, 9, RANDAUGMENT_SPACE, v2.RandAugment),
    # Mueller & Hutter 2021, the "wide" space: one op at a random magnitude (translation up to 32 px = the width).
    "trivialaugment": RandAugmentPolicy(1, None, magnitude_space(0.99, 1.0, 135.0, 0.99, 6), v2.TrivialAugmentWide),
    # Cubuk et al. 2019, the policy learnt on CIFAR-10, in RandAugment's magnitude space.
    "autoaugment": AutoAugmentPolicy(CIFAR10_SUB_POLICIES, RANDAUGMENT_SPACE,
                                     functools.partial(v2.AutoAugment, v2.AutoAugmentPolicy.CIFAR10)),
}


@dataclass
class SampleAugmentation:
    """Per-sample augmentation parameters of a batch, drawn on the host."""
    padding: int            # the crop's padding, the same for the whole batch
    offsets: np.ndarray     # (n, 2) top-left corner of the crop in the padded image
    flips: np.ndarray       # (n,) bool
    ops: np.ndarray         # (n, rounds) indices into OP_NAMES
    magnitudes: np.ndarray  # (n, rounds)

    def __getitem__(self, rows: slice) -> "SampleAugmentation":
        return SampleAugmentation(self.padding, self.offsets[rows], self.flips[rows], self.ops[rows],
                                  self.magnitudes[rows])


class DeviceAugmentation:
    """Random crop, horizontal flip and an optional auto-augment policy, for uint8 batches on the device.

    A batch for a step on every patch (schedule.all_patches_*) is cropped with data.all_patches_crop_padding where
    that is set: on the whole sequence the network fits the training images faster than on a share of it, so those
    steps may want more augmentation than the patch-dropout steps before them."""

    def __init__(self, data_cfg, image_size: int):
        ending = data_cfg.get("all_patches_crop_padding")
        self.paddings = {False: data_cfg.crop_padding, True: data_cfg.crop_padding if ending is None else ending}
        for key, padding in (("crop_padding", self.paddings[False]), ("all_patches_crop_padding", ending)):
            if padding is not None and padding >= image_size:
                raise UserError(f"data.{key}={padding} is too large for {image_size}-pixel images; use a value "
                                f"below {image_size} (4 is usual)")
        self.padding_mode = data_cfg.padding_mode
        self.hflip = data_cfg.hflip
        self.policy = AUGMENT_POLICIES.get(data_cfg.auto_augment)
        self.image_size = image_size

    def draw(self, rng: np.random.Generator, n: int, every_patch: bool = False) -> SampleAugmentation:
        padding = self.paddings[every_patch]
        offsets = rng.integers(0, 2 * padding + 1, (n, 2))
        flips = (rng.random(n) < 0.5) & self.hflip
        if self.policy is None:
            return SampleAugmentation(padding, offsets, flips, np.zeros((n, 0), np.int64), np.zeros((n, 0)))
        return SampleAugmentation(padding, offsets, flips, *self.policy.draw(rng, n, self.image_size))

    def __call__(self, images: torch.Tensor, params: SampleAugmentation) -> torch.Tensor:
        if params.padding or self.hflip:
            images = random_crop_flip(images, to_device(params.offsets, images.device),
                                      to_device(params.flips, images.device), params.padding, self.padding_mode)
        return apply_policy_ops(images, params.ops, params.magnitudes)


# --------------------------------------------------------------------------------------------------------------
# Random erasing, on normalised float batches.

@dataclass
class ErasingBoxes:
    """The boxes of the global batch, one row (top, left, height, width) per image, height 0 where nothing is
    erased; the seed of the noise that fills them; and the rows of this rank's images."""
    boxes: np.ndarray
    noise_seed: int
    mine: slice = field(default_factory=lambda: slice(None))

    def __getitem__(self, rows: slice) -> "ErasingBoxes":
        return ErasingBoxes(self.boxes, self.noise_seed, rows)


class RandomErasing:
    """Random erasing (Zhong et al. 2020) with torchvision's RandomErasing defaults: with probability p an image
    gets one box of 2-33% of its area, aspect ratio 0.3-3.3 (the first of 10 tries that fits; none fitting, no
    box), filled with standard normal noise per pixel and channel. The noise is timm's mode='pixel', which the
    plain-ViT baseline of Lee et al. 2021 uses, rather than torchvision's default of zeros. Like timm, it runs
    after normalisation, so the noise has the statistics of a normalised pixel."""
    SCALE, RATIO, TRIES = (0.02, 0.33), (0.3, 3.3), 10

    def __init__(self, probability: float):
        self.probability = probability

    def draw(self, rng: np.random.Generator, n: int, height: int, width: int) -> ErasingBoxes:
        erased = rng.random(n) < self.probability
        areas = rng.uniform(*self.SCALE, (n, self.TRIES)) * (height * width)
        aspects = np.exp(rng.uniform(math.log(self.RATIO[0]), math.log(self.RATIO[1]), (n, self.TRIES)))
        heights = np.round(np.sqrt(areas * aspects)).astype(np.int64)
        widths = np.round(np.sqrt(areas / aspects)).astype(np.int64)
        fits = (heights < height) & (widths < width)
        first, every = fits.argmax(1), np.arange(n)
        erased &= fits[every, first]
        heights = np.where(erased, heights[every, first], 0)
        widths = np.where(erased, widths[every, first], 0)
        tops, lefts = rng.integers(0, height - heights + 1), rng.integers(0, width - widths + 1)
        return ErasingBoxes(np.stack([tops, lefts, heights, widths], axis=1), int(rng.integers(2 ** 62)))

    def __call__(self, images: torch.Tensor, boxes: ErasingBoxes) -> torch.Tensor:
        """Fill this rank's boxes with noise, drawn on the device for the erased images only. Changes `images` in
        place. The noise is drawn for the erased images of the whole global batch and this rank's rows taken, so
        N ranks erase with exactly the noise one process would (a p-th of a batch of noise: cheap)."""
        n, c, h, w = images.shape
        first = boxes.mine.start or 0
        erased_anywhere = np.flatnonzero(boxes.boxes[:, 2] > 0)
        is_mine = (erased_anywhere >= first) & (erased_anywhere < first + n)
        erased = erased_anywhere[is_mine]
        drawn = to_device(np.concatenate([erased[:, None] - first, boxes.boxes[erased]], axis=1), images.device)
        rows, top, left, height, width = drawn.unbind(1)
        ys, xs = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
        in_rows = (ys >= top[:, None]) & (ys < (top + height)[:, None])
        in_cols = (xs >= left[:, None]) & (xs < (left + width)[:, None])
        inside = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
        noise = torch.randn((len(erased_anywhere), c, h, w), device=images.device, dtype=images.dtype,
                            generator=torch.Generator(images.device).manual_seed(boxes.noise_seed))
        noise = noise[to_device(np.flatnonzero(is_mine), images.device)]
        images.index_copy_(0, rows, torch.where(inside, noise, images.index_select(0, rows)))
        return images
