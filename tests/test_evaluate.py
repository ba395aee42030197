"""vit-eval, vit-predict, vit-attention, vit-export on a checkpoint trained for a few steps on real CIFAR-10.

The checkpoint is the tiny `testing` model (8x8 patches of 4 px) trained for 30 steps on the conftest subset
(500 training and 200 test images); its evaluation batch of 64 leaves a partial last batch.
"""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from vit_train import evaluate, export, predict
from vit_train.cli import attention_main, eval_main, export_main, predict_main
from vit_train.resolve import resolve_config
from vit_train.data import load_cifar, preprocess_images
from vit_train.errors import UserError
from vit_train.models.vit import create_model
from vit_train.train import train


@pytest.fixture(scope="module")
def run_dir(cifar10_subset, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("runs")
    train(resolve_config({
        "model_name": "testing", "data.data_dir": str(cifar10_subset), "data.download": False,
        "batch_size": 50, "eval_batch_size": 64, "schedule.steps": 30, "schedule.warmup_steps": 0,
        "optim.lr": 3e-3, "eval_every": 15, "save_every": 15, "quiet": True, "precision": "fp32",
        "output_dir": str(output_dir), "name": "run"}))  # fp32: the tests compare reports with the model's fp32 logits
    return output_dir / "run"


@pytest.fixture
def images(tmp_path):
    """A PNG and a JPEG of sizes no CIFAR model was trained on."""
    rng = np.random.default_rng(0)
    png, jpeg = tmp_path / "wide.png", tmp_path / "tall.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(png)
    Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)).save(jpeg)
    return png, jpeg


def one_line_error(capsys, status, fragment):
    """The command failed with status 2 and said `fragment` in a single line."""
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err


# ---------------------------------------------------------------------------------------------------------------
# vit-eval

def test_eval_json_matches_the_training_log(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert eval_main(["--checkpoint", str(run_dir), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])

    assert logged["step"] == 30
    assert report["accuracy"] == logged["eval_accuracy"]
    assert report["loss"] == pytest.approx(logged["eval_loss"], rel=1e-9)
    assert report["num_samples"] == 200 and report["split"] == "test" and "200 test images" in printed
    confusion = np.array(report["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 200
    assert confusion.trace() / 200 == report["accuracy"]
    for i, name in enumerate(report["class_names"]):
        assert report["per_class_accuracy"][name] == confusion[i, i] / confusion[i].sum()
    assert report["accuracy"] <= report["top5_accuracy"] <= 1
    assert report["accuracy"] > 0.1  # 30 steps learn something; a broken pipeline stays at chance or below
    assert "airplane" in printed and "confusion matrix" in printed and f"{report['accuracy']:.4f}" in printed


def test_flip_averaging_is_an_option_reported_apart_and_averages_each_image_with_its_mirror(run_dir, tmp_path,
                                                                                            capsys):
    out = tmp_path / "flipped.json"
    assert eval_main(["--checkpoint", str(run_dir), "--flip-average", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["flip_average"] and "averaged with its mirror image: --flip-average" in printed
    loaded = evaluate.load_trained_model(run_dir, torch.device("cpu"))
    loaders = evaluate.eval_loaders(loaded.config, torch.device("cpu"))
    correct = 0
    with torch.no_grad():
        for images, targets in loaders.test.batches(0):
            mean = (loaded.model(images) + loaded.model(images.flip(-1))) / 2
            correct += (mean.argmax(dim=1) == targets).sum().item()
    assert report["accuracy"] == correct / 200
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert report["loss"] != pytest.approx(logged["eval_loss"], rel=1e-6)  # not the single view training logged


def test_split_train_reports_the_fit_on_every_training_image_unaugmented(run_dir, tmp_path, cifar10_subset, capsys):
    out = tmp_path / "train.json"
    assert eval_main(["--checkpoint", str(run_dir), "--split", "train", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["split"] == "train" and report["num_samples"] == 500
    assert "500 training (unaugmented) images" in printed
    loaded = evaluate.load_trained_model(run_dir, torch.device("cpu"))
    train_split = load_cifar("cifar10", str(cifar10_subset), download=False)[0]
    with torch.no_grad():
        logits = loaded.model(preprocess_images(train_split.images, loaded.config.data, loaded.config.img_size))
    labels = train_split.labels
    assert report["accuracy"] == (logits.argmax(dim=1) == labels).sum().item() / 500
    assert report["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    cpu = torch.device("cpu")
    test_report = evaluate.evaluate(loaded.model, evaluate.eval_loaders(loaded.config, cpu).test, loaded.class_names,
                                    cpu)
    assert report["loss"] != pytest.approx(test_report.loss, rel=1e-3)  # another split than the test one


def test_precision_flag_evaluates_in_the_precision_it_names_not_the_checkpoints(run_dir, tmp_path):
    out = tmp_path / "bf16.json"
    assert eval_main(["--checkpoint", str(run_dir), "--precision", "bf16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    cpu = torch.device("cpu")
    loaded = evaluate.load_trained_model(run_dir, cpu)
    logits, labels = [], []
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        for images, targets in evaluate.eval_loaders(loaded.config, cpu).test.batches(0):
            logits.append(loaded.model(images).float())
            labels.append(targets)
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert report["accuracy"] == (logits.argmax(dim=1) == labels).sum().item() / 200
    assert report["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])  # the checkpoint's fp32
    assert report["loss"] != pytest.approx(logged["eval_loss"], rel=1e-5)


def test_eval_of_best_checkpoint_matches_its_saved_metrics(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert eval_main(["--checkpoint", str(run_dir / "best.pt"), "--json", str(out)]) == 0
    saved = torch.load(run_dir / "best.pt", weights_only=True)["metrics"]
    assert json.loads(out.read_text())["accuracy"] == saved["eval_accuracy"]


def test_eval_plot_draws_the_confusion_matrix(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "confusion.png"
    assert eval_main(["--checkpoint", str(run_dir), "--plot", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and min(image.size) > 300


def test_eval_plot_without_matplotlib_says_how_to_get_it_and_writes_nothing(run_dir, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    out = tmp_path / "eval.json"
    status = eval_main(["--checkpoint", str(run_dir), "--json", str(out), "--plot", str(tmp_path / "c.png")])
    one_line_error(capsys, status, "pip install 'vit-train[plot]'")
    assert list(tmp_path.iterdir()) == []


def test_eval_of_exported_weights_with_pretrained_matches_the_checkpoint(run_dir, tmp_path):
    weights, out = tmp_path / "weights.pth", tmp_path / "eval.json"
    assert export_main(["--checkpoint", str(run_dir), "--out", str(weights)]) == 0
    data_dir = load_json_config(run_dir)["data"]["data_dir"]
    assert eval_main(["--model", "testing", "--pretrained", str(weights), "--img-size", "32", "--data-dir",
                      data_dir, "--normalize", "dataset", "--json", str(out)]) == 0
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads(out.read_text())["accuracy"] == logged["eval_accuracy"]


def load_json_config(run_dir):
    return json.loads((run_dir / "config.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# vit-predict and vit-attention

def test_predict_prints_top_k_for_a_png_and_a_jpeg(run_dir, images, capsys):
    assert predict_main(["--checkpoint", str(run_dir), "--top-k", "3", *map(str, images)]) == 0
    lines = capsys.readouterr().out.splitlines()
    class_names = evaluate.load_trained_model(run_dir, "cpu").class_names
    assert [lines[0], lines[4]] == [str(images[0]), str(images[1])] and len(lines) == 8
    for block in (lines[1:4], lines[5:8]):
        probabilities = [float(line.split()[0]) for line in block]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001
        assert len({line.split()[1] for line in block} - set(class_names)) == 0


def test_predict_sees_an_image_file_as_evaluation_sees_the_test_split(run_dir, tmp_path):
    """A test image written to a PNG gets the probabilities the model gives it inside the evaluation loader."""
    loaded = evaluate.load_trained_model(run_dir, "cpu")
    _, test, class_names = load_cifar("cifar10", loaded.config.data.data_dir, download=False)
    path = tmp_path / "test0.png"
    Image.fromarray(test.images[0].permute(1, 2, 0).numpy()).save(path)
    predicted = dict(predict.predict(loaded, predict.read_image(path), top_k=10))

    loader = evaluate.eval_loaders(loaded.config, "cpu").test
    with torch.no_grad():
        expected = loaded.model(next(loader.batches(0))[0][:1]).softmax(dim=1)[0]
    assert [predicted[name] for name in class_names] == pytest.approx(expected.tolist(), abs=1e-6)


def test_attention_draws_the_image_beside_its_rollout_for_a_png_and_a_jpeg(run_dir, images, tmp_path, capsys):
    for image in images:
        out = tmp_path / f"{image.stem}_attention.png"
        assert attention_main(["--checkpoint", str(run_dir), str(image), "--out", str(out)]) == 0
        with Image.open(image) as source, Image.open(out) as drawn:
            width, height = source.size
            assert drawn.format == "PNG"
            assert max(drawn.size[0] // 2, drawn.size[1]) == 384  # the longer side of each half
            assert abs(drawn.size[0] / 2 / drawn.size[1] - width / height) < 0.03  # the aspect ratio is kept
    assert "wrote" in capsys.readouterr().out



@pytest.mark.parametrize("suffix, format_name", [(".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP"),
                                                 (".bmp", "BMP")])
def test_attention_writes_the_format_its_suffix_names(suffix, format_name, run_dir, images, tmp_path):
    out = tmp_path / f"attention{suffix}"
    assert attention_main(["--checkpoint", str(run_dir), str(images[0]), "--out", str(out)]) == 0
    with Image.open(out) as drawn:
        assert drawn.format == format_name


@pytest.mark.parametrize("name", ["attention.svg", "attention"])
def test_attention_refuses_a_suffix_that_names_no_picture_format_and_writes_nothing(name, run_dir, images,
                                                                                     tmp_path, capsys):
    before = set(tmp_path.iterdir())
    one_line_error(capsys, attention_main(["--checkpoint", str(run_dir), str(images[0]), "--out",
                                           str(tmp_path / name)]), "cannot tell which picture format")
    assert set(tmp_path.iterdir()) == before, "nothing is written"

def test_rollout_multiplies_residual_averaged_layers():
    torch.manual_seed(0)
    layers = [torch.rand(2, 3, 5, 5).softmax(dim=-1) for _ in range(3)]  # (B, heads, T, T)
    expected = torch.eye(5).expand(2, 5, 5)
    for probs in layers:
        averaged = 0.5 * probs.mean(dim=1) + 0.5 * torch.eye(5)  # rows already sum to 1, so + I halves them
        expected = averaged @ expected
    rollout = predict.attention_rollout(layers)
    torch.testing.assert_close(rollout, expected)
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(2, 5))
    # Attention only to itself at every layer rolls out to the identity: nothing flows between tokens.
    torch.testing.assert_close(predict.attention_rollout([torch.eye(5).expand(1, 2, 5, 5)] * 2), torch.eye(5)[None])


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_attention_map_covers_the_patch_grid_in_zero_to_one(classifier):
    model = create_model("testing", img_size=32, num_classes=10, classifier=classifier).eval()
    logits, heat = predict.attention_map(model, torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10) and heat.shape == (3, 8, 8)
    assert heat.amin(dim=(1, 2)).tolist() == [0, 0, 0] and heat.amax(dim=(1, 2)).tolist() == pytest.approx([1] * 3)


def test_attention_image_for_tensorboard(run_dir):
    loaded = evaluate.load_trained_model(run_dir, "cpu")
    images = next(evaluate.eval_loaders(loaded.config, "cpu").test.batches(0))[0][:4]
    loaded.model.train()
    picture = predict.attention_image(loaded.model, images, loaded.config.data)
    assert picture.shape == (3, 4 * 96, 2 * 96) and 0 <= picture.min() and picture.max() <= 1
    assert loaded.model.training  # left as it was found


def test_training_logs_an_attention_image_at_each_evaluation(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
    assert [event.step for event in events.Images("eval/attention")] == [15, 30]


# ---------------------------------------------------------------------------------------------------------------
# vit-export

def test_export_loads_into_timm_with_our_logits(run_dir, tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    out = tmp_path / "vit.pth"
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out)]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["model_name"] == "testing" and len(card["class_names"]) == 10 and card["img_size"] == 32
    assert card["timm"]["pretrained_cfg_overlay"]["file"] == "vit.pth"  # relative to the card

    ours = evaluate.load_trained_model(run_dir, "cpu").model
    monkeypatch.chdir(tmp_path)  # the card's folder: timm opens the weights' name from the working directory
    assert_same_logits(timm.create_model(**card["timm"]), ours)  # builds the network and loads the file itself
    sizes = {key: card["timm"][key] for key in ("img_size", "patch_size", "num_classes", "embed_dim", "depth",
                                                 "num_heads", "mlp_ratio")}
    plain = timm.create_model("vit_tiny_patch16_224", **sizes)
    plain.load_state_dict(torch.load(out, weights_only=True))
    assert_same_logits(plain, ours)


def test_export_moved_as_a_pair_loads_with_the_documented_lines(run_dir, tmp_path):
    timm = pytest.importorskip("timm")
    assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "made" / "vit.pth")]) == 2  # no folder
    (tmp_path / "made").mkdir()
    assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "made" / "vit.pth")]) == 0
    (tmp_path / "made").rename(tmp_path / "moved")
    # docs/evaluate.md, from a working directory that is not the card's:
    card_path = tmp_path / "moved" / "vit.json"
    card = json.loads(card_path.read_text())
    overlay = card["timm"]["pretrained_cfg_overlay"]
    overlay["file"] = str(card_path.parent / overlay["file"])  # the weights lie beside the card
    assert_same_logits(timm.create_model(**card["timm"]), evaluate.load_trained_model(run_dir, "cpu").model)


@pytest.mark.parametrize("height, width", [(40, 64), (120, 90), (20, 24), (32, 32)])
def test_timms_preprocessing_from_the_card_gives_our_pixels(height, width, run_dir, tmp_path, monkeypatch):
    """timm.data.resolve_data_config + create_transform, fed the export's card, must turn an image into the input
    vit-train gives the model: squashed whole (no crop) to 32x32, bilinear, normalised. timm resizes the 8-bit PIL
    image, and rounds it to 8 bits; ours resizes the float image (antialiased): they may differ by one 8-bit step."""
    timm = pytest.importorskip("timm")
    loaded = evaluate.load_trained_model(run_dir, "cpu")
    export.export(loaded, tmp_path / "vit.pth")
    monkeypatch.chdir(tmp_path)
    card = json.loads((tmp_path / "vit.json").read_text())
    data_config = timm.data.resolve_data_config(model=timm.create_model(**card["timm"]))
    assert (data_config["crop_pct"], data_config["crop_mode"], data_config["interpolation"]) == (1.0, "squash",
                                                                                                 "bilinear")
    image = Image.fromarray(np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8))
    theirs = timm.data.create_transform(**data_config)(image)
    ours = predict.model_input(loaded, pil_to_tensor(image))[0]
    one_step = 1 / 255 / min(card["normalization"]["std"])
    assert theirs.shape == ours.shape == (3, 32, 32)
    assert (theirs - ours).abs().max() <= one_step * 1.001
    if (height, width) == (32, 32):  # no resize: the same numbers
        torch.testing.assert_close(theirs, ours)


def test_export_of_a_global_average_pooling_model_loads_into_timm(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    config = resolve_config({"model_name": "testing", "model.classifier": "gap", "data.name": "synthetic",
                             "output_dir": str(tmp_path)})
    model = create_model("testing", img_size=32, num_classes=10, classifier="gap")
    with torch.no_grad():
        for param in model.parameters():  # the default initialisation zeroes the head: random weights instead
            param.normal_(0, 0.2, generator=torch.Generator().manual_seed(param.numel()))
    loaded = evaluate.LoadedModel(model.eval(), config, [f"class_{i}" for i in range(10)])
    card = json.loads(export.export(loaded, tmp_path / "gap.pth").read_text())
    monkeypatch.chdir(tmp_path)
    assert_same_logits(timm.create_model(**card["timm"]), model)


def assert_same_logits(timm_model, ours):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(timm_model.eval()(x), ours.eval()(x), atol=1e-4, rtol=0)


def test_export_refuses_what_timm_cannot_hold_and_writes_nothing(run_dir, tmp_path):
    loaded = evaluate.load_trained_model(run_dir, "cpu")
    loaded.config.model.representation_size = 16
    with pytest.raises(UserError, match="pre-logits"):
        export.export(loaded, tmp_path / "vit.pth")
    assert list(tmp_path.iterdir()) == []


def test_the_printed_report_aligns_wide_class_names_by_their_terminal_columns():
    names = ["cat", "飛行機", "ｶﾀｶﾅ", "e\u0301clair"]  # CJK (2 columns a character), half-width kana, a combining mark
    confusion = torch.tensor([[3, 0, 1, 0], [0, 2, 0, 0], [1, 0, 5, 0], [0, 0, 0, 4]])
    lines = evaluate.format_report(evaluate.report_from_counts(confusion, 16, 9.0, names)).splitlines()
    header = next(i for i, line in enumerate(lines) if line.endswith("accuracy  images"))
    per_class, matrix = lines[header:header + 1 + len(names)], lines[-1 - len(names):]
    for table in (per_class, matrix):  # every row of a table ends in the same terminal column
        assert len({evaluate.display_width(line) for line in table}) == 1, "\n".join(table)
    assert [evaluate.display_width(name) for name in names] == [3, 6, 4, 6]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2.

def test_missing_checkpoint(tmp_path, capsys):
    one_line_error(capsys, eval_main(["--checkpoint", str(tmp_path / "nope.pt")]), "no checkpoint at")


@pytest.mark.parametrize("main", [eval_main, export_main])
def test_a_file_that_is_not_a_checkpoint(main, tmp_path, capsys):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    args = ["--checkpoint", str(path)] + (["--out", str(tmp_path / "w.pth")] if main is export_main else [])
    one_line_error(capsys, main(args), "is not a vit-train checkpoint")


def test_an_image_that_is_not_an_image(run_dir, tmp_path, capsys):
    fake = tmp_path / "photo.jpg"
    fake.write_text("hello")
    one_line_error(capsys, predict_main(["--checkpoint", str(run_dir), str(fake)]), "cannot read image")
    out = tmp_path / "attention.png"
    one_line_error(capsys, attention_main(["--checkpoint", str(run_dir), str(fake), "--out", str(out)]),
                   "cannot read image")
    assert not out.exists()


def test_a_checkpoint_whose_class_count_does_not_match_the_dataset(run_dir, tmp_path, fake_cifar, capsys):
    fake_cifar(tmp_path, "cifar100")
    status = eval_main(["--checkpoint", str(run_dir), "--dataset", "cifar100", "--data-dir", str(tmp_path),
                        "--no-download"])
    one_line_error(capsys, status, "the model has 10 classes and the cifar100 test split 100")


def test_pretrained_weights_whose_head_does_not_match_the_dataset(tmp_path, fake_cifar, capsys):
    fake_cifar(tmp_path, "cifar100")
    weights = tmp_path / "w.pth"
    torch.save(create_model("testing", img_size=32, num_classes=10).state_dict(), weights)
    status = eval_main(["--model", "testing", "--pretrained", str(weights), "--img-size", "32", "--dataset",
                        "cifar100", "--data-dir", str(tmp_path), "--no-download"])
    one_line_error(capsys, status, "has a head of 10 classes and the model 100")


def test_json_into_a_missing_folder_fails_before_evaluating(run_dir, tmp_path, capsys):
    status = eval_main(["--checkpoint", str(run_dir), "--json", str(tmp_path / "missing" / "eval.json")])
    one_line_error(capsys, status, "does not exist")


def test_checkpoint_and_pretrained_are_alternatives(run_dir, capsys):
    one_line_error(capsys, eval_main([]), "give --checkpoint, or --model and --pretrained")
    one_line_error(capsys, eval_main(["--checkpoint", str(run_dir), "--model", "testing"]), "give --checkpoint")
    one_line_error(capsys, eval_main(["--checkpoint", str(run_dir), "--img-size", "64"]), "goes with --pretrained")

