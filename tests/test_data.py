"""Datasets, label mixing, sharding and the errors users see for bad data (augmentation: test_augment.py)."""
import hashlib
import http.server
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import tracemalloc

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from vit_train.data import cifar, mixing
from vit_train.data.synthetic import make_synthetic
from vit_train.config import default_data_config
from vit_train.data import build_loaders, normalization, preprocess_images
from vit_train.errors import UserError

CPU = torch.device("cpu")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny, and on a busy 2-core machine every 2-thread op can wait milliseconds on a thread
    that is not running: one thread keeps this file's run short and steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**fields):
    cfg = default_data_config()
    cfg.update(fields)
    return cfg


def loaders(cfg, *, img_size=32, batch_size=16, eval_batch_size=32, seed=0, rank=0, world_size=1):
    return build_loaders(cfg, img_size=img_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         device=CPU, seed=seed, rank=rank, world_size=world_size)


def synthetic(**fields):
    return config(**{"name": "synthetic", "synthetic_train_size": 96, "synthetic_test_size": 50, **fields})


def one_line_error(call, *expected: str) -> str:
    """Run call, expecting a UserError whose one-line message names each of `expected`."""
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(part in message for part in expected), message
    return message


def planes_to_images(rows: np.ndarray) -> np.ndarray:
    """CIFAR's row layout spelt out: 1024 red, then 1024 green, then 1024 blue bytes, each plane row-major."""
    return np.stack([rows[:, c * 1024:(c + 1) * 1024].reshape(-1, 32, 32) for c in range(3)], axis=1)


def epoch(loader, index=0, start=0):
    return list(loader.batches(index, start))


# ---- CIFAR files ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bytes_keys", [False, True], ids=["str-keys", "bytes-keys"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_reads_official_layouts(tmp_path, fake_cifar, name, bytes_keys):
    written = fake_cifar(tmp_path, name, bytes_keys=bytes_keys)
    train, test, class_names = cifar.load_cifar(name, str(tmp_path), download=False)
    assert class_names == written["class_names"]
    for split, (rows, labels) in ((train, written["train"]), (test, written["test"])):
        assert split.images.dtype == torch.uint8 and split.images.shape == (len(rows), 3, 32, 32)
        assert split.labels.dtype == torch.int64 and split.labels.tolist() == labels.tolist()
        assert np.array_equal(split.images.numpy(), planes_to_images(rows))
    # One pixel by hand: green plane (offset 1024), row 5, column 7 of the second test image.
    assert test.images[1, 1, 5, 7] == written["test"][0][1, 1024 + 5 * 32 + 7]


def test_real_cifar10_subset(cifar10_subset, shared_dir):
    built = loaders(config(data_dir=str(cifar10_subset), download=False), batch_size=100)
    assert built.num_classes == 10 and built.class_names == CIFAR10_CLASSES
    assert len(built.train) == 5 and built.test.num_samples == 200
    train, test, _ = cifar.load_cifar("cifar10", str(cifar10_subset), download=False)
    assert train.images.shape == (500, 3, 32, 32) and test.images.shape == (200, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [50] * 10 and torch.bincount(test.labels).tolist() == [20] * 10

    with open(cifar10_subset / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    assert np.array_equal(test.images[:8].numpy(), planes_to_images(batch["data"][:8]))
    assert test.labels[:8].tolist() == batch["labels"][:8]
    # And against the JPEG the first test image came from, decoded by PIL as an (H, W, RGB) array.
    cls, number = batch["filenames"][0].split("_", 1)
    with tarfile.open(shared_dir / "data" / "cifar10-jpeg.tar.gz", "r|gz") as tar:
        jpeg = next(tar.extractfile(m).read() for m in tar if m.name == f"test/{cls}/{number}")
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert np.array_equal(test.images[0].permute(1, 2, 0).numpy(), rgb)
    assert CIFAR10_CLASSES[test.labels[0]] == cls


def truncate(path):
    path.write_bytes(path.read_bytes()[:5000])


def not_a_pickle(path):
    path.write_bytes(b"this is not a pickle at all")


def wrong_shape(path):
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, f)


def no_labels(path):
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8)}, f)


def remove(path):
    path.unlink()


@pytest.mark.parametrize("damage", [truncate, not_a_pickle, wrong_shape, no_labels, remove])
def test_damaged_batch_file_is_one_line_error(tmp_path, fake_cifar, damage):
    fake_cifar(tmp_path)
    damage(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    one_line_error(lambda: loaders(config(data_dir=str(tmp_path))), "data_batch_3")


def test_missing_folder_without_download(tmp_path):
    one_line_error(lambda: loaders(config(data_dir=str(tmp_path), download=False)),
                   "cifar-10-python.tar.gz", "cifar-10-batches-py", str(tmp_path))


def test_extracts_an_archive_put_in_data_dir(tmp_path, fake_cifar):
    written = fake_cifar(tmp_path / "made")
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "made" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    train, _, _ = cifar.load_cifar("cifar10", str(tmp_path / "data"), download=False)
    assert train.labels.tolist() == written["train"][1].tolist()


def cifar10_archive(tmp_path, fake_cifar) -> tuple[bytes, list]:
    """A real cifar-10-python.tar.gz of fake_cifar's files, and the training labels it holds."""
    written = fake_cifar(tmp_path / "made")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp_path / "made" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buffer.getvalue(), written["train"][1].tolist()


@pytest.fixture
def archive_server(monkeypatch):
    """serve(name, body, announced_length=None) -> URL: a real HTTP server on 127.0.0.1 sends `body` for /name
    under a Content-Length of announced_length (default: its length; a larger one makes a cut-off download)."""
    files = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in files:
                self.send_error(404)
                return
            body, length = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def serve(name, body, announced_length=None):
        files[f"/{name}"] = (body, announced_length or len(body))
        return f"http://127.0.0.1:{server.server_address[1]}/{name}"

    yield serve
    server.shutdown()
    server.server_close()


def point_cifar10_at(monkeypatch, url, body):
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", url)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", hashlib.md5(body).hexdigest())


def test_downloads_checks_and_extracts_cifar(tmp_path, fake_cifar, archive_server, monkeypatch):
    body, labels = cifar10_archive(tmp_path, fake_cifar)
    point_cifar10_at(monkeypatch, archive_server("cifar-10-python.tar.gz", body), body)
    train, _, _ = cifar.load_cifar("cifar10", str(tmp_path / "data"), download=True)
    assert train.labels.tolist() == labels
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_failed_download_is_one_line_error(tmp_path, monkeypatch):
    with socket.socket() as closed:  # a port nothing listens on: the connection is refused, as when offline
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "url", f"http://127.0.0.1:{port}/cifar-100-python.tar.gz")
    one_line_error(lambda: loaders(config(name="cifar100", data_dir=str(tmp_path))),
                   "cifar-100-python.tar.gz", str(tmp_path), "URLError")


@pytest.mark.parametrize("damage", ["cut off", "wrong checksum"])
def test_interrupted_download_leaves_nothing_behind(damage, tmp_path, fake_cifar, archive_server, monkeypatch):
    body, _ = cifar10_archive(tmp_path, fake_cifar)
    if damage == "cut off":  # the server hangs up half-way through the announced length
        url = archive_server("cifar-10-python.tar.gz", body[:len(body) // 2], announced_length=len(body))
    else:
        url = archive_server("cifar-10-python.tar.gz", body[:len(body) // 2])
    point_cifar10_at(monkeypatch, url, body)
    fresh = tmp_path / "data"
    one_line_error(lambda: loaders(config(data_dir=str(fresh))), "cifar-10-python.tar.gz", "downloading")
    assert not fresh.exists()  # no partial archive that the next run would take for the user's own


def test_a_truncated_archive_leaves_no_half_extracted_folder(tmp_path, fake_cifar):
    body, labels = cifar10_archive(tmp_path, fake_cifar)
    data = tmp_path / "data"
    data.mkdir()
    (data / "cifar-10-python.tar.gz").write_bytes(body[:len(body) * 3 // 5])  # the first batches are whole
    one_line_error(lambda: loaders(config(data_dir=str(data), download=False)),
                   "cannot extract", "cifar-10-python.tar.gz")
    assert [p.name for p in data.iterdir()] == ["cifar-10-python.tar.gz"]  # no cifar-10-batches-py/, no staging
    (data / "cifar-10-python.tar.gz").write_bytes(body)  # the whole archive then extracts as usual
    assert cifar.load_cifar("cifar10", str(data), download=False)[0].labels.tolist() == labels


@pytest.mark.parametrize("field, value", [("name", "imagenet"), ("padding_mode", "edge"),
                                          ("auto_augment", "augmix"), ("normalize", "imagenet"),
                                          ("crop_padding", -1), ("crop_padding", 32), ("mixup_alpha", -0.5)])
def test_bad_config_is_one_line_error(field, value):
    one_line_error(lambda: loaders(synthetic(**{field: value})), f"data.{field}")


def test_batch_larger_than_shard_is_one_line_error():
    one_line_error(lambda: loaders(synthetic(), batch_size=32, world_size=4), "128", "96")


# ---- label mixing (augmentation: test_augment.py) ------------------------------------------------------------

def test_mixup_targets_match_mixed_pixels():
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 4, 4)  # image i is all i
    labels = torch.arange(8)
    mixed, targets = mixing.LabelMixing(1.0, 0.0, 10)(images, labels, np.random.default_rng(0))
    lam = targets[0, 0].item()
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0))
    assert targets[0, 7].item() == pytest.approx(1 - lam)


def test_cutmix_targets_match_pasted_area():
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 16, 16)
    mixed, targets = mixing.LabelMixing(0.0, 1.0, 8)(images, torch.arange(8), np.random.default_rng(3))
    pasted = (mixed[0] == 7).float().mean().item()
    assert set(mixed[0].unique().tolist()) <= {0.0, 7.0} and 0 < pasted < 1
    assert targets[0, 7].item() == pytest.approx(pasted) and targets[0, 0].item() == pytest.approx(1 - pasted)


def test_mixing_gives_soft_targets():
    train = loaders(synthetic(mixup_alpha=0.8, cutmix_alpha=1.0)).train
    for images, targets in epoch(train):
        assert images.shape == (16, 3, 32, 32) and targets.shape == (16, 10) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(16))


# ---- loaders: determinism, sharding, evaluation -----------------------------------------------------------------

def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_same_seed_same_batches_and_resume_from_any_batch():
    cfg = synthetic(auto_augment="randaugment")
    first = epoch(loaders(cfg).train, 1)
    assert len(first) == 6 and first[0][0].dtype == torch.float32 and first[0][1].dtype == torch.int64
    assert_same_batches(epoch(loaders(cfg).train, 1), first)
    assert_same_batches(epoch(loaders(cfg).train, 1, start=4), first[4:])
    assert not torch.equal(next(loaders(cfg, seed=1).train.batches(1))[0], first[0][0])
    assert not torch.equal(next(loaders(cfg).train.batches(2))[0], first[0][0])


def flipped_per_epoch(cfg, epochs=4):
    """For each epoch, {image index: whether the loader showed it mirrored}, found by comparing each image with
    the same loader's output without flips."""
    seen = []
    for e in range(epochs):
        plain = torch.cat([x for x, _ in epoch(loaders(config(**{**cfg, "hflip": False,
                                                                   "alternate_flips": False})).train, e)])
        shown = torch.cat([x for x, _ in epoch(loaders(cfg).train, e)])
        indices = np.concatenate(loaders(cfg).train.batch_indices(e))
        mirrored = [torch.equal(s, p.flip(-1)) and not torch.equal(s, p) for s, p in zip(shown, plain)]
        assert all(m or torch.equal(s, p) for m, s, p in zip(mirrored, shown, plain))
        seen.append(dict(zip(indices.tolist(), mirrored)))
    return seen


def test_alternating_flips_show_each_image_the_other_way_each_epoch_and_resume_exactly():
    cfg = synthetic(crop_padding=0, alternate_flips=True)
    seen = flipped_per_epoch(cfg)
    images = set(seen[0]) & set(seen[1]) & set(seen[2]) & set(seen[3])
    assert len(images) > 60
    assert all(seen[e][i] != seen[e + 1][i] for e in range(3) for i in images)
    assert 0.25 < np.mean(list(seen[0].values())) < 0.75  # a random side to start from, not all one way
    assert_same_batches(epoch(loaders(cfg).train, 3, start=2), epoch(loaders(cfg).train, 3)[2:])
    coins = flipped_per_epoch(synthetic(crop_padding=0))  # the default: a coin each epoch repeats sides
    assert any(coins[0][i] == coins[1][i] for i in set(coins[0]) & set(coins[1]))


@pytest.mark.parametrize("fields, named", [({"hflip": False}, "data.hflip"),
                                           ({"repeated_augmentation": 3}, "data.repeated_augmentation")])
def test_alternating_flips_without_flips_or_with_repeats_is_one_line_error(fields, named):
    one_line_error(lambda: loaders(synthetic(alternate_flips=True, **fields)), "data.alternate_flips", named)


def test_ranks_get_disjoint_equal_shards_that_cover_the_epoch():
    world = 4
    shards = [loaders(synthetic(), batch_size=8, rank=r, world_size=world).train.batch_indices(epoch=3)
              for r in range(world)]
    for step in range(3):  # 96 samples / (8 x 4) = 3 global batches
        parts = [shards[r][step] for r in range(world)]
        assert all(len(p) == 8 for p in parts) and len(set(np.concatenate(parts))) == 32
    assert sorted(np.concatenate([np.concatenate(s) for s in shards]).tolist()) == list(range(96))


def test_ranks_together_see_what_one_process_sees():
    cfg = synthetic(auto_augment="trivialaugment")
    single = epoch(loaders(cfg, batch_size=16).train)
    ranks = [epoch(loaders(cfg, batch_size=8, rank=r, world_size=2).train) for r in range(2)]
    assert_same_batches(single, [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*ranks)])


def test_eval_sees_every_sample_once_unaugmented():
    cfg = synthetic()
    _, test, _ = make_synthetic(cfg)
    parts = [loaders(cfg, eval_batch_size=7, rank=r, world_size=3).test for r in range(3)]
    assert [p.num_samples for p in parts] == [16, 17, 17] and [len(p) for p in parts] == [3, 3, 3]
    images, labels = (torch.cat(t) for t in zip(*[batch for p in parts for batch in epoch(p)]))
    assert torch.equal(labels, test.labels)
    assert torch.equal(images, preprocess_images(test.images, cfg, 32))


def test_preprocess_normalises_and_resizes():
    cfg = config()
    mean, std = normalization(cfg)
    mean_colour = torch.tensor(mean).mul(255).round().to(torch.uint8).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    assert preprocess_images(mean_colour, cfg, 32).abs().max() < 0.01
    black_white = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 32, 32)
    scaled = preprocess_images(black_white, config(normalize="inception"), 224)
    assert scaled.shape == (2, 3, 224, 224)
    assert torch.allclose(scaled[0], torch.tensor(-1.0)) and torch.allclose(scaled[1], torch.tensor(1.0))


def test_loaders_resize_to_img_size():
    built = loaders(synthetic(), img_size=48)
    assert next(built.train.batches(0))[0].shape == (16, 3, 48, 48)
    assert next(built.test.batches())[0].shape == (32, 3, 48, 48)


def test_synthetic_is_deterministic_balanced_and_learnable():
    cfg = synthetic()
    train, test, names = make_synthetic(cfg)
    again, _, _ = make_synthetic(cfg)
    assert torch.equal(train.images, again.images) and names[0] == "class_0"
    assert torch.bincount(test.labels).tolist() == [5] * 10
    # A nearest-class-mean rule fitted on the training images already classifies the test images.
    means = torch.stack([train.images[train.labels == c].float().mean(0) for c in range(10)]).flatten(1)
    predicted = torch.cdist(test.images.float().flatten(1), means).argmin(1)
    assert (predicted == test.labels).float().mean() > 0.9


# ---- image folders --------------------------------------------------------------------------------------------

def write_image_folder(root, per_class_train=6, per_class_val=3):
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_imagefolder_loaders(tmp_path):
    write_image_folder(tmp_path)
    built = loaders(config(name="imagefolder", data_dir=str(tmp_path), num_workers=0, auto_augment="randaugment"),
                    img_size=24, batch_size=4, eval_batch_size=4)
    assert built.class_names == ["cat", "dog"] and len(built.train) == 3
    batches = epoch(built.train, 0)
    assert [x.shape for x, _ in batches] == [(4, 3, 24, 24)] * 3 and batches[0][0].dtype == torch.float32
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == [0] * 6 + [1] * 6
    assert [y.tolist() for _, y in epoch(built.train, 0, start=2)] == [batches[2][1].tolist()]
    assert torch.cat([y for _, y in epoch(built.test)]).tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "workers"])
def test_the_training_split_evaluated_is_every_training_image_unaugmented_as_the_test_split_is_seen(tmp_path,
                                                                                                    in_memory):
    """vit-eval --split train: the training images, in order, with the test split's preprocessing (no crop, no
    flip, no augmentation policy), for a folder held in memory and one read by workers."""
    write_image_folder(tmp_path)
    fields = dict(name="imagefolder", data_dir=str(tmp_path), num_workers=0, auto_augment="randaugment",
                  folder_in_memory=in_memory)
    evaluated = build_loaders(config(**fields), img_size=24, batch_size=1, eval_batch_size=5, device=CPU, seed=0,
                              with_train=False, eval_split="train")
    assert evaluated.train is None and evaluated.test.split == "train"
    images, labels = (torch.cat(parts) for parts in zip(*epoch(evaluated.test)))
    assert labels.tolist() == [0] * 6 + [1] * 6
    # the same files as a test split: a tree whose val/ is this one's train/
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "train").symlink_to(tmp_path / "train")
    (tmp_path / "copy" / "val").symlink_to(tmp_path / "train")
    as_test = build_loaders(config(**{**fields, "data_dir": str(tmp_path / "copy")}), img_size=24, batch_size=1,
                            eval_batch_size=5, device=CPU, seed=0, with_train=False)
    assert as_test.test.split == "test"
    assert torch.equal(images, torch.cat([x for x, _ in epoch(as_test.test)]))
    assert torch.equal(images, torch.cat([x for x, _ in epoch(evaluated.test, 3)]))  # every epoch alike


def test_the_training_split_evaluated_from_cifar_is_its_training_images_in_order(tmp_path, fake_cifar):
    written = fake_cifar(tmp_path)
    cfg = config(data_dir=str(tmp_path), download=False)
    evaluated = build_loaders(cfg, img_size=32, batch_size=1, eval_batch_size=64, device=CPU, seed=0,
                              with_train=False, eval_split="train")
    images, labels = (torch.cat(parts) for parts in zip(*epoch(evaluated.test)))
    rows, expected_labels = written["train"]
    assert labels.tolist() == list(expected_labels)
    assert torch.equal(images, preprocess_images(torch.from_numpy(rows).view(-1, 3, 32, 32), cfg, 32))
    with pytest.raises(ValueError, match="eval_split"):  # training evaluates on the test split only
        build_loaders(cfg, img_size=32, batch_size=8, eval_batch_size=64, device=CPU, seed=0, eval_split="train")


def test_alternating_flips_on_a_folder_read_by_workers_is_one_line_error_and_fine_in_memory(tmp_path):
    write_image_folder(tmp_path)
    fields = dict(name="imagefolder", data_dir=str(tmp_path), num_workers=0, alternate_flips=True)
    one_line_error(lambda: loaders(config(folder_in_memory=False, **fields), batch_size=4), "data.alternate_flips",
                   "workers")
    assert len(epoch(loaders(config(**fields), img_size=24, batch_size=4).train)) == 3


def test_unreadable_image_is_one_line_error_from_a_worker(tmp_path):
    write_image_folder(tmp_path, per_class_train=1)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    built = loaders(config(name="imagefolder", data_dir=str(tmp_path), num_workers=1, folder_in_memory=False),
                    batch_size=3)
    one_line_error(lambda: epoch(built.train), "broken.png")
    # decoded in memory, the same image is the same one line, before any batch
    one_line_error(lambda: loaders(config(name="imagefolder", data_dir=str(tmp_path)), batch_size=3), "broken.png")


def test_imagefolder_without_train_folder(tmp_path):
    one_line_error(lambda: loaders(config(name="imagefolder", data_dir=str(tmp_path))), "train", str(tmp_path))


def test_a_folder_that_fits_is_decoded_once_cached_and_decoded_anew_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_TRAIN_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "folder"
    rng = np.random.default_rng(1)
    pixels = {}
    for split, count in (("train", 8), ("val", 4)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels[split, cls, i] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels[split, cls, i]).save(root / split / cls / f"{i}.png")
    cfg = config(name="imagefolder", data_dir=str(root), crop_padding=0, hflip=False)
    old_format = tmp_path / "cache" / "folders" / f"{'0' * 32}.npz"  # what the release before .npy left behind
    old_format.parent.mkdir(parents=True)
    np.savez(old_format, images=np.zeros((1, 3, 32, 32), np.uint8))
    first = loaders(cfg, batch_size=4, eval_batch_size=8)
    assert first.note.startswith("train: 16 images decoded and cached; val: 8 images decoded and cached (")
    assert not old_format.exists()
    # at the image's own size the pixels are the files' exactly: the same data CIFAR's arrays would be
    stored = first.test.source.images
    assert torch.equal(stored[0], torch.from_numpy(pixels["val", "cat", 0]).permute(2, 0, 1))
    assert torch.equal(stored[4], torch.from_numpy(pixels["val", "dog", 0]).permute(2, 0, 1))
    again = loaders(cfg, batch_size=4, eval_batch_size=8)
    assert again.note.startswith("train: 16 images from the cache; val: 8 images from the cache (")
    assert torch.equal(again.train.source.images, first.train.source.images)
    cached = sorted((tmp_path / "cache" / "folders").glob("*.npy"))
    Image.fromarray(pixels["train", "cat", 0][::-1].copy()).save(root / "train" / "cat" / "0.png")  # changed
    changed = loaders(cfg, batch_size=4, eval_batch_size=8)
    assert changed.note.startswith("train: 16 images decoded and cached; val: 8 images from the cache (")
    assert not torch.equal(changed.train.source.images, first.train.source.images)
    now = sorted((tmp_path / "cache" / "folders").glob("*.npy"))  # the train split's old file is gone
    assert len(now) == 2 and len(set(now) & set(cached)) == 1
    # rewritten in place with its size and modification time put back: its change time still tells
    image = root / "train" / "dog" / "1.png"
    stat = image.stat()
    Image.fromarray(pixels["train", "dog", 1][:, ::-1].copy()).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size
    rewritten = loaders(cfg, batch_size=4, eval_batch_size=8)
    assert rewritten.note.startswith("train: 16 images decoded and cached;")
    assert torch.equal(rewritten.train.source.images[9],
                       torch.from_numpy(pixels["train", "dog", 1][:, ::-1].copy()).permute(2, 0, 1))
    larger = loaders(cfg, img_size=48, batch_size=4, eval_batch_size=8)  # another size: decoded for it, kept beside
    assert larger.train.source.images.shape[-2:] == (48, 48) and larger.note.startswith("train: 16 images decoded")
    assert len(list((tmp_path / "cache" / "folders").glob("*.npy"))) == 4


@pytest.mark.parametrize("damage", ["truncated", "garbage", "another shape", "a pickle"])
def test_a_damaged_cache_file_is_named_in_a_warning_and_decoded_again(damage, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VIT_TRAIN_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "folder")
    cfg = config(name="imagefolder", data_dir=str(tmp_path / "folder"))
    first = loaders(cfg, batch_size=4)
    train_file = next(path for path in (tmp_path / "cache" / "folders").glob("*.npy")
                      if np.load(path).shape[0] == 12)
    whole = train_file.read_bytes()
    damaged = {"truncated": lambda: whole[:len(whole) // 2], "garbage": lambda: b"\x93NUMPY garbage" * 40,
               "another shape": lambda: save_bytes(np.zeros((3, 3, 32, 32), np.uint8)),
               "a pickle": lambda: save_bytes(np.array([{"x": 1}], dtype=object))}[damage]()
    train_file.write_bytes(damaged)
    capsys.readouterr()
    rebuilt = loaders(cfg, batch_size=4)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: the decoded-image cache {train_file} is damaged (") and err.count("\n") == 1
    assert "decoding the folder again" in err and "allow_pickle" not in err, err
    assert torch.equal(rebuilt.train.source.images, first.train.source.images)
    assert train_file.read_bytes() == whole  # rebuilt in place
    assert "train: 12 images from the cache" in loaders(cfg, batch_size=4).note


def save_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_the_folder_cache_decodes_and_loads_in_about_the_memory_of_the_decoded_pixels(tmp_path, monkeypatch):
    """Peak host memory (numpy's allocations, which tracemalloc follows) against the decoded size: decoding fills
    one array in place and writes it from there; loading reads the file into one array."""
    monkeypatch.setenv("VIT_TRAIN_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "folder", per_class_train=60, per_class_val=20)
    cfg = config(name="imagefolder", data_dir=str(tmp_path / "folder"))
    decoded_bytes = 160 * 3 * 96 * 96
    for action in ("decoding", "loading"):
        tracemalloc.start()
        try:
            built = loaders(cfg, img_size=96, batch_size=4)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert built.note.startswith("train: 120 images " + ("decoded" if action == "decoding" else "from the"))
        assert peak < 1.2 * decoded_bytes, f"{action}: peak {peak} bytes for {decoded_bytes} decoded"


BUILD_SLOWLY = """
import io, sys, time
from pathlib import Path
import numpy as np
import torch
from vit_train.config import default_data_config
from vit_train.data import build_loaders

folder, out, ready, other = sys.argv[1:]
real_write = np.lib.format.write_array

def write_slowly(f, array, **kwargs):  # the two writes overlap for certain: each takes a second, in pieces
    whole = io.BytesIO()
    real_write(whole, array, **kwargs)
    data = whole.getvalue()
    for start in range(0, len(data), len(data) // 10 + 1):
        f.write(data[start:start + len(data) // 10 + 1])
        f.flush()
        time.sleep(0.1)

np.lib.format.write_array = write_slowly
Path(ready).touch()
while not Path(other).exists():  # start together
    time.sleep(0.01)
cfg = default_data_config()
cfg.update(name="imagefolder", data_dir=folder)
built = build_loaders(cfg, img_size=64, batch_size=4, eval_batch_size=4, device="cpu", seed=0)
print(built.note)
torch.save(built.train.source.images, out)
"""


def test_two_processes_building_one_cache_each_publish_a_complete_file(tmp_path):
    """Two real processes decode the same folder at once and write its cache file at the same time, slowly: each
    writes a temporary file of its own, so the published one is whole whichever rename comes last."""
    write_image_folder(tmp_path / "folder", per_class_train=60, per_class_val=20)
    env = {**os.environ, "VIT_TRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", BUILD_SLOWLY, str(tmp_path / "folder"),
                                   str(tmp_path / f"{i}.pt"), str(tmp_path / f"ready{i}"), str(tmp_path / f"ready{1 - i}")],
                                  env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert all(out.startswith("train: 120 images decoded and cached") for out, _ in outputs), outputs
    folder = tmp_path / "cache" / "folders"
    assert not [path for path in folder.iterdir() if path.suffix == ".tmp"]
    decoded = torch.load(tmp_path / "0.pt")
    assert torch.equal(decoded, torch.load(tmp_path / "1.pt"))
    published = {len(array): array for array in map(np.load, folder.glob("*.npy"))}
    assert sorted(published) == [40, 120] and np.array_equal(published[120], decoded.numpy())


def test_files_torchvision_does_not_read_are_counted_in_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VIT_TRAIN_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "cat" / "moving.gif")
    (tmp_path / "val" / "dog" / "notes.txt").write_text("not an image")
    built = loaders(config(name="imagefolder", data_dir=str(tmp_path)), batch_size=4)
    assert len(built.train.source) == 12 and len(built.test.source) == 6
    err = capsys.readouterr().err
    assert err.startswith(f"warning: skipped 2 files in {tmp_path} that torchvision does not read as images (.gif, "
                          ".txt; it reads .jpg ") and err.count("\n") == 1, err
    assert str(tmp_path / "train" / "cat" / "moving.gif") in err


def test_a_broken_symbolic_link_is_one_line_on_both_folder_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_TRAIN_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path, per_class_train=2)
    (tmp_path / "train" / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    expected = f"cannot read image {tmp_path / 'train' / 'cat' / 'gone.png'} (a broken symbolic link); remove"
    one_line_error(lambda: loaders(config(name="imagefolder", data_dir=str(tmp_path)), batch_size=4), expected)
    built = loaders(config(name="imagefolder", data_dir=str(tmp_path), num_workers=0, folder_in_memory=False),
                    batch_size=5)
    one_line_error(lambda: epoch(built.train), expected)


def test_num_workers_on_a_folder_decoded_in_memory_is_named_in_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VIT_TRAIN_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path)
    loaders(config(name="imagefolder", data_dir=str(tmp_path), num_workers=8), batch_size=4)
    err = capsys.readouterr().err
    assert err.startswith("warning: data.num_workers is read only when an image folder is read by DataLoader "
                          "workers") and "does nothing" in err and err.count("\n") == 1, err
    loaders(config(name="imagefolder", data_dir=str(tmp_path), num_workers=8, folder_in_memory=False), batch_size=4)
    loaders(config(name="imagefolder", data_dir=str(tmp_path)), batch_size=4)  # the default: not the user's doing
    assert capsys.readouterr().err == ""
