"""Device augmentation: crop and flip, the policies (RandAugment, TrivialAugmentWide, AutoAugment) against
torchvision image by image, random erasing, and the number of tensor operations a batch costs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import v2

from vit_train.config import default_data_config
from vit_train.data import augment, build_loaders
from vit_train.data.augment import AUGMENT_POLICIES, OP_NAMES, OP_SIGNED, apply_policy_ops
from vit_train.errors import UserError

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors on a busy 2-core machine: one thread keeps this file's run short and steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def varied_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 images that reach the corners of every op: smooth ones of various ranges, grey ones (r = g = b, where
    the blends' rounding is tightest), flat ones (autocontrast and equalize leave them alone) and noise."""
    g = torch.Generator().manual_seed(seed)
    field = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    low, span = torch.rand(n, 1, 1, 1, generator=g) * 120, torch.rand(n, 1, 1, 1, generator=g) * 135 + 1
    images = (low + span * field).round().to(torch.uint8)
    images[1::4] = images[1::4, :1]
    images[2::8] = torch.randint(0, 256, (len(images[2::8]), 1, 1, 1), generator=g, dtype=torch.uint8)
    images[3::4] = torch.randint(0, 256, images[3::4].shape, generator=g, dtype=torch.uint8)
    return images


TORCHVISION = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)


def torchvision_magnitude(name: str, magnitude: float) -> float:
    if name == "Posterize":  # vit_train: bits dropped; torchvision: bits kept
        return 8 - round(magnitude)
    if name == "Solarize":  # vit_train: the fraction of the range inverted; torchvision: the threshold's
        return 1.0 - magnitude
    return magnitude


def torchvision_op(image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """torchvision's own implementation of op `name` as its auto-augment transforms apply it (their private
    dispatch, so this breaks loudly if torchvision changes it), with a magnitude in vit_train's units."""
    return TORCHVISION._apply_image_or_video_transform(image, name, torchvision_magnitude(name, magnitude),
                                                       interpolation=TORCHVISION.interpolation, fill=TORCHVISION._fill)


def one_image_at_a_time(images: torch.Tensor, ops: np.ndarray, magnitudes: np.ndarray) -> torch.Tensor:
    expected = images.clone()
    for i in range(len(images)):
        for op, magnitude in zip(ops[i], magnitudes[i]):
            expected[i] = torchvision_op(expected[i], OP_NAMES[op], float(magnitude))
    return expected


# ---- crop and flip --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_mode, numpy_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_random_crop_flip_is_a_crop_of_the_padded_image(padding_mode, numpy_mode):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 3, 10, 12), dtype=np.uint8)  # not square: rows and columns differ
    offsets = rng.integers(0, 9, (40, 2))
    offsets[:2] = [[0, 0], [8, 8]]  # both extreme corners
    flips = rng.random(40) < 0.5
    out = augment.random_crop_flip(torch.from_numpy(images), torch.from_numpy(offsets), torch.from_numpy(flips),
                                   4, padding_mode).numpy()
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)), mode=numpy_mode)
    for i, (top, left) in enumerate(offsets):
        crop = padded[i, :, top:top + 10, left:left + 12]
        assert np.array_equal(out[i], crop[:, :, ::-1] if flips[i] else crop)


def test_drawn_crop_offsets_stay_inside_the_padding():
    cfg = default_data_config()
    augmentation = augment.DeviceAugmentation(cfg, image_size=32)
    params = augmentation.draw(np.random.default_rng(0), 10_000)
    assert params.offsets.min() == 0 and params.offsets.max() == 2 * cfg.crop_padding
    assert 0.45 < params.flips.mean() < 0.55


def test_the_steps_on_every_patch_draw_their_own_crop_padding_where_one_is_set():
    cfg = default_data_config()
    cfg.crop_padding, cfg.hflip, cfg.all_patches_crop_padding = 0, False, 3
    augmentation = augment.DeviceAugmentation(cfg, image_size=32)
    images = torch.randint(0, 256, (500, 3, 32, 32), dtype=torch.uint8)
    others = augmentation.draw(np.random.default_rng(0), len(images))
    assert others.padding == 0 and not others.offsets.any()
    assert torch.equal(augmentation(images, others), images)
    ending = augmentation.draw(np.random.default_rng(0), len(images), every_patch=True)
    assert ending.padding == 3 and (ending.offsets.min(), ending.offsets.max()) == (0, 6)
    cropped = augmentation(images, ending).numpy()
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (3, 3), (3, 3)), mode="reflect")
    for i, (top, left) in enumerate(ending.offsets):
        assert np.array_equal(cropped[i], padded[i, :, top:top + 32, left:left + 32])
    # unset, the ending crops as the other steps do: the same draws from the same generator
    cfg.crop_padding, cfg.all_patches_crop_padding = 4, None
    augmentation = augment.DeviceAugmentation(cfg, image_size=32)
    same = [augmentation.draw(np.random.default_rng(1), 64, every_patch=flag) for flag in (False, True)]
    assert same[0].padding == same[1].padding == 4 and np.array_equal(same[0].offsets, same[1].offsets)
    cfg.all_patches_crop_padding = 32
    with pytest.raises(UserError, match="data.all_patches_crop_padding=32 is too large for 32-pixel images"):
        augment.DeviceAugmentation(cfg, image_size=32)


def test_flips_flip_and_nothing_else():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    no_offset = torch.zeros(6, 2, dtype=torch.long)
    flip = lambda flips: augment.random_crop_flip(images, no_offset, flips, 0, "reflect")
    assert torch.equal(flip(torch.ones(6, dtype=torch.bool)), images.flip(-1))
    assert torch.equal(flip(torch.zeros(6, dtype=torch.bool)), images)


# ---- the policies against torchvision, image by image -----------------------------------------------------------

@pytest.mark.parametrize("policy, bins", [("randaugment", [9]), ("trivialaugment", range(augment.NUM_BINS))])
def test_every_op_at_every_magnitude_equals_torchvision(policy, bins):
    """All that a policy can draw, each (op, bin, sign) on an image of its own, in one batched call: rotations by
    90 degrees (TrivialAugment's bin 20, which torchvision does by transposing), magnitude 0, both signs."""
    table = AUGMENT_POLICIES[policy].magnitudes(32)
    drawable = range(OP_NAMES.index("Invert"))
    cases = [(op, sign * table[op, b]) for op in drawable for b in bins
             for sign in ((1, -1) if OP_SIGNED[op] else (1,))]
    ops = np.array([[op] for op, _ in cases])
    magnitudes = np.array([[m] for _, m in cases])
    images = varied_images(len(cases))
    assert torch.equal(apply_policy_ops(images.clone(), ops, magnitudes), one_image_at_a_time(images, ops, magnitudes))


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment"])
def test_drawn_policy_equals_torchvision_one_image_at_a_time(policy):
    images = varied_images(384, seed=1)
    ops, magnitudes = AUGMENT_POLICIES[policy].draw(np.random.default_rng(0), len(images), 32)
    assert {OP_NAMES[op] for op in ops.ravel()} >= {name for name in OP_NAMES[:-1] if name != "ShearX"}
    batched = apply_policy_ops(images.clone(), ops, magnitudes)
    assert torch.equal(batched, one_image_at_a_time(images, ops, magnitudes))
    assert not torch.equal(batched, images)


def test_autoaugment_is_torchvisions_cifar10_policy_given_the_same_draws():
    """torchvision's AutoAugment(CIFAR10).forward, image by image, fed the draws vit_train made: the sub-policy,
    then a coin per step (applied when <= its probability), then a coin per step for the sign (negative when
    <= 0.5), with torchvision's own policy table and magnitudes."""
    n = 500
    images = varied_images(n, seed=2)
    ops, magnitudes = AUGMENT_POLICIES["autoaugment"].draw(np.random.default_rng(7), n, 32)
    rng = np.random.default_rng(7)
    chosen, coins, sign_coins = rng.integers(0, len(TORCHVISION._policies), n), rng.random((n, 2)), rng.random((n, 2))
    expected = images.clone()
    for i in range(n):
        for (name, probability, bin), coin, sign_coin in zip(TORCHVISION._policies[chosen[i]], coins[i], sign_coins[i]):
            if not coin <= probability:
                continue
            steps, signed = TORCHVISION._AUGMENTATION_SPACE[name]
            values = steps(10, 32, 32)
            magnitude = 0.0 if values is None else float(values[bin]) * (-1 if signed and sign_coin <= 0.5 else 1)
            expected[i] = TORCHVISION._apply_image_or_video_transform(
                expected[i], name, magnitude, interpolation=TORCHVISION.interpolation, fill=TORCHVISION._fill)
    assert torch.equal(apply_policy_ops(images.clone(), ops, magnitudes), expected)
    assert 0.1 < (ops == OP_NAMES.index("Identity")).mean() < 0.6  # the coins do say no, at about 40% here


def test_autoaugment_policy_is_torchvisions_cifar10_table_with_its_magnitudes():
    assert [list(s) for s in augment.CIFAR10_SUB_POLICIES] == [list(s) for s in TORCHVISION._policies]
    ops, probabilities, magnitudes = AUGMENT_POLICIES["autoaugment"].table(32)
    steps = [step for sub_policy in TORCHVISION._policies for step in sub_policy]
    for (name, probability, bin), op, p, magnitude in zip(steps, ops.flat, probabilities.flat, magnitudes.flat):
        values = TORCHVISION._AUGMENTATION_SPACE[name][0](10, 32, 32)
        assert OP_NAMES[op] == name and p == probability
        assert torchvision_magnitude(name, magnitude) == (0.0 if values is None else float(values[bin]))


def test_randaugment_uses_magnitude_9_of_31():
    ops, magnitudes = AUGMENT_POLICIES["randaugment"].draw(np.random.default_rng(0), 500, 32)
    rotations = magnitudes[ops == OP_NAMES.index("Rotate")]
    assert set(np.abs(rotations)) == {9.0} and (rotations < 0).any()  # 30 degrees * 9/30, either sign


def test_image_folders_get_torchvisions_autoaugment_per_image():
    transform = AUGMENT_POLICIES["autoaugment"].per_image_transform()
    assert isinstance(transform, v2.AutoAugment) and transform.policy == v2.AutoAugmentPolicy.CIFAR10


# ---- random erasing -------------------------------------------------------------------------------------------

def box_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    rows, cols = np.arange(height), np.arange(width)
    top, left, h, w = (boxes[:, k, None] for k in range(4))
    return ((rows >= top) & (rows < top + h))[:, :, None] & ((cols >= left) & (cols < left + w))[:, None, :]


def test_random_erasing_fills_the_drawn_boxes_only_with_noise():
    erasing = augment.RandomErasing(0.5)
    images = torch.rand(400, 3, 32, 32) * 4 + 10  # far from the noise, so every erased pixel shows
    boxes = erasing.draw(np.random.default_rng(0), len(images), 32, 32)
    out = erasing(images.clone(), boxes)
    inside = torch.from_numpy(box_masks(boxes.boxes, 32, 32))[:, None].expand_as(images)
    assert torch.equal(out[~inside], images[~inside])
    noise = out[inside]
    assert (noise < 9).all() and abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02  # standard normal
    assert torch.equal(erasing(images.clone(), boxes), out)  # the seed in `boxes` fixes the noise


def test_random_erasing_draws_torchvisions_boxes_with_the_right_probability():
    n = 20_000
    boxes = augment.RandomErasing(0.25).draw(np.random.default_rng(1), n, 32, 32).boxes
    top, left, h, w = boxes.T
    erased = h > 0
    assert abs(erased.mean() - 0.25) < 0.015
    assert (top + h <= 32).all() and (left + w <= 32).all() and (top >= 0).all() and (left >= 0).all()
    assert (h[erased] < 32).all() and (w[erased] < 32).all()
    area, aspect = h[erased] * w[erased] / 1024, h[erased] / w[erased]
    assert 0.005 < area.min() and area.max() < 0.4 and 0.2 < aspect.min() and aspect.max() < 5  # up to rounding
    assert 0.15 < area.mean() < 0.2  # uniform in [0.02, 0.33]: 0.175
    assert np.corrcoef(top[erased], h[erased])[0, 1] < 0  # a tall box has fewer places to go


def first_batch(batch_size=64, rank=0, world_size=1, **fields) -> torch.Tensor:
    cfg = default_data_config()
    cfg.update(name="synthetic", synthetic_train_size=64, synthetic_test_size=10, **fields)
    train = build_loaders(cfg, img_size=32, batch_size=batch_size, eval_batch_size=10, device=CPU, seed=0,
                          rank=rank, world_size=world_size).train
    return next(train.batches(0))[0]


def test_random_erasing_in_the_loader_changes_only_boxes_and_is_reproducible():
    plain, erased = first_batch(), first_batch(random_erasing=0.5)
    changed = (plain != erased).any(1)  # (n, H, W)
    assert 0.3 < changed.any(2).any(1).float().mean() < 0.7
    rows, cols = changed.any(2), changed.any(1)  # each changed region is one box: its rows x its columns
    assert torch.equal(changed, rows[:, :, None] & cols[:, None, :])
    assert torch.equal(first_batch(random_erasing=0.5), erased)


def test_ranks_erase_the_boxes_one_process_erases():
    erased = first_batch(random_erasing=0.5)
    by_ranks = torch.cat([first_batch(32, rank, 2, random_erasing=0.5) for rank in range(2)])
    assert torch.equal(by_ranks, erased)  # the same boxes, filled with the same noise


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_random_erasing_is_a_probability(value):
    cfg = default_data_config()
    cfg.update(name="synthetic", random_erasing=value)
    with pytest.raises(UserError, match="data.random_erasing"):
        build_loaders(cfg, img_size=32, batch_size=8, eval_batch_size=8, device=CPU, seed=0)


# ---- a fixed number of tensor operations per batch ----------------------------------------------------------------

class CountOps(TorchDispatchMode):
    """Counts the tensor operations (ATen calls: kernels, views, copies) issued while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


PIPELINES = {
    "crop+flip": {},
    "randaugment": {"auto_augment": "randaugment"},
    "trivialaugment": {"auto_augment": "trivialaugment"},
    "autoaugment": {"auto_augment": "autoaugment"},
    "autoaugment+erasing": {"auto_augment": "autoaugment", "random_erasing": 0.25},
    "mixup": {"mixup_alpha": 0.8},
    "cutmix": {"cutmix_alpha": 1.0},
}


def ops_per_batch(fields: dict, batch_size: int) -> int:
    """Tensor operations for one training batch, from the gather of its images to the mixed targets."""
    cfg = default_data_config()
    cfg.update(name="synthetic", synthetic_train_size=2048, synthetic_test_size=10, **fields)
    train = build_loaders(cfg, img_size=32, batch_size=batch_size, eval_batch_size=10, device=CPU, seed=0).train
    batches = train.batches(0)
    next(batches)  # first-use work (cached tables) is not per batch
    with CountOps() as counter:
        next(batches)
    return counter.count


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_tensor_operations_per_batch_do_not_grow_with_the_batch(pipeline):
    small, large = ops_per_batch(PIPELINES[pipeline], 64), ops_per_batch(PIPELINES[pipeline], 1024)
    print(f"{pipeline}: {small} tensor operations at batch 64, {large} at batch 1024")
    assert large <= small


# ---- on a GPU -------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment"])
def test_policies_on_cuda_equal_torchvision_on_cuda(policy):
    images = varied_images(256, seed=3).cuda()
    ops, magnitudes = AUGMENT_POLICIES[policy].draw(np.random.default_rng(0), len(images), 32)
    assert torch.equal(apply_policy_ops(images.clone(), ops, magnitudes), one_image_at_a_time(images, ops, magnitudes))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_erasing_on_cuda_fills_the_boxes_only():
    erasing = augment.RandomErasing(0.5)
    images = torch.full((64, 3, 32, 32), 10.0, device="cuda")
    boxes = erasing.draw(np.random.default_rng(0), len(images), 32, 32)
    out = erasing(images.clone(), boxes)
    inside = torch.from_numpy(box_masks(boxes.boxes, 32, 32))[:, None].expand(images.shape).cuda()
    assert torch.equal(out[~inside], images[~inside]) and (out[inside] < 9).all()
