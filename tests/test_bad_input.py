"""Bad input to the five commands: each case must exit with status 2, print exactly one line, `error: ...`, on
stderr, no traceback, and write nothing (no run directory, no report, no export, no change to the inputs).

The table covers every class of mistake docs/reliability.md promises to catch before anything is written:
out-of-range values (probabilities, rates, optimizer hyper-parameters, seeds), shapes the model cannot take, names
and folders that cannot be written, checkpoints that are missing, foreign, unsafe or of another network, recipes that fail,
and flags that do not exist or are abbreviated.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit_train.cli import attention_main, eval_main, export_main, predict_main, train_main
from vit_train.resolve import resolve_config
from vit_train.train import train

from test_data import write_image_folder

COMMANDS = {"vit-train": train_main, "vit-eval": eval_main, "vit-predict": predict_main,
            "vit-attention": attention_main, "vit-export": export_main}
# A valid tiny run; each vit-train case adds its mistake. {tmp} is the test's own folder, {made} the inputs below.
TRAIN = ["--model", "testing", "--dataset", "synthetic", "--steps", "5", "--batch-size", "32",
         "--output-dir", "{tmp}/runs", "--name", "run"]
DONE = "{made}/runs/done"  # a real checkpoint of the testing model
RECIPES = {
    "syntax_error.py": "def get_config(:\n",
    "missing_import.py": "import not_a_module\n",
    "raises.py": "from vit_train.config import base_config\n\ndef get_config():\n    config = base_config()\n"
                 "    config.optim.learning_rate = 0.1  # not a key: the locked config refuses it\n    return config\n",
    "no_get_config.py": "CONFIG = {}\n",
    "not_a_config.py": "def get_config():\n    return {'optim': {'lr': 0.1}}\n",
}

CASES = [
    # vit-train: values out of range
    ("vit-train", "unknown model", [*TRAIN, "--model", "ViT-Q_16"], "unknown model"),
    ("vit-train", "unknown dataset", [*TRAIN, "--dataset", "mnist"], "invalid choice"),
    ("vit-train", "unknown position embedding", [*TRAIN, "--set", "model.position_embedding=rope"],
     "position_embedding must be 'learned' or 'sincos2d'"),
    ("vit-train", "sincos2d on a width not divisible by 4", [*TRAIN, "--set", "model.position_embedding=sincos2d",
                                                             "--set", "model.hidden_size=30",
                                                             "--set", "model.transformer.num_heads=2"],
     "divisible by 4"),
    ("vit-train", "unknown attention init", [*TRAIN, "--set", "model.attention_init=identity"],
     "attention_init must be 'xavier' or 'mimetic'"),
    ("vit-train", "zero lr", [*TRAIN, "--lr", "0"], "learning rate"),
    ("vit-train", "negative lr", [*TRAIN, "--lr", "-0.1"], "learning rate"),
    ("vit-train", "infinite lr", [*TRAIN, "--lr", "inf"], "learning rate"),
    ("vit-train", "nan lr", [*TRAIN, "--lr", "nan"], "learning rate"),
    ("vit-train", "zero steps", [*TRAIN, "--steps", "0"], "--steps must be positive"),
    ("vit-train", "zero batch", [*TRAIN, "--batch-size", "0"], "--batch-size must be positive"),
    ("vit-train", "zero accumulation", [*TRAIN, "--grad-accum", "0"], "--grad-accum must be positive"),
    ("vit-train", "batch not divisible by accumulation", [*TRAIN, "--batch-size", "30", "--grad-accum", "4"],
     "not divisible"),
    ("vit-train", "negative warm-up", [*TRAIN, "--warmup-steps", "-1"], "--warmup-steps"),
    ("vit-train", "patch does not divide image", [*TRAIN, "--img-size", "30"], "does not divide"),
    ("vit-train", "dropout 1.5", [*TRAIN, "--set", "model.transformer.dropout_rate=1.5"], "dropout_rate"),
    ("vit-train", "dropout -0.5", [*TRAIN, "--set", "model.transformer.dropout_rate=-0.5"], "dropout_rate"),
    ("vit-train", "dropout 1", [*TRAIN, "--set", "model.transformer.dropout_rate=1"], "dropout_rate"),
    ("vit-train", "attention dropout 2", [*TRAIN, "--set", "model.transformer.attention_dropout_rate=2"],
     "attention_dropout_rate"),
    ("vit-train", "non-square patches", [*TRAIN, "--set", "model.patches.size=(4,8)"], "square"),
    ("vit-train", "negative representation size", [*TRAIN, "--set", "model.representation_size=-5"],
     "representation_size"),
    ("vit-train", "beta above 1", [*TRAIN, "--set", "optim.betas=(2.0,0.999)"], "optim.betas"),
    ("vit-train", "one beta", [*TRAIN, "--set", "optim.betas=(0.9,)"], "optim.betas"),
    ("vit-train", "negative momentum", [*TRAIN, "--set", "optim.momentum=-1"], "optim.momentum"),
    ("vit-train", "infinite weight decay", [*TRAIN, "--set", "optim.weight_decay=inf"], "optim.weight_decay"),
    ("vit-train", "nan gradient clip", [*TRAIN, "--set", "optim.grad_clip=nan"], "optim.grad_clip"),
    ("vit-train", "label smoothing 1", [*TRAIN, "--set", "optim.label_smoothing=1.0"], "label_smoothing"),
    ("vit-train", "negative mixup", [*TRAIN, "--set", "data.mixup_alpha=-1"], "data.mixup_alpha"),
    ("vit-train", "negative seed", [*TRAIN, "--seed", "-1"], "--seed"),
    ("vit-train", "seed past numpy's range", [*TRAIN, "--seed", str(2**32)], "--seed"),
    ("vit-train", "unknown precision", [*TRAIN, "--precision", "fp8"], "invalid choice"),
    ("vit-train", "unknown device", [*TRAIN, "--device", "tpu"], "device"),
    ("vit-train", "infinite cutmix strength", [*TRAIN, "--set", "data.cutmix_alpha=1e999"],
     "data.cutmix_alpha must be a finite number"),
    ("vit-train", "nan stochastic depth", [*TRAIN, "--set", "model.transformer.drop_path_rate=nan"],
     "drop_path_rate is a probability in [0, 1), got nan"),
    ("vit-train", "low-resolution share without a size", [*TRAIN, "--set", "schedule.low_res_fraction=0.5"],
     "need schedule.low_res_size"),
    ("vit-train", "low resolution not in whole patches", [*TRAIN, "--set", "schedule.low_res_size=14"],
     "schedule.low_res_size 14 does not split into whole 4-pixel patches"),
    ("vit-train", "1000 repeats of each image", [*TRAIN, "--set", "data.repeated_augmentation=1000"],
     "repeats each image more times than a batch of 32 holds"),
    # vit-train: names and folders
    ("vit-train", "name with a slash", [*TRAIN, "--name", "a/b"], "cannot be a folder name"),
    ("vit-train", "name ..", [*TRAIN, "--name", ".."], "cannot be a folder name"),
    ("vit-train", "empty name", [*TRAIN, "--name", ""], "cannot be a folder name"),
    ("vit-train", "name with NUL", [*TRAIN, "--name", "a\0b"], "cannot be a folder name"),
    ("vit-train", "name of 300 bytes", [*TRAIN, "--name", "x" * 300], "cannot be a folder name"),
    ("vit-train", "output dir under a file", [*TRAIN, "--output-dir", "{made}/notes.txt/runs"], "not a directory"),
    ("vit-train", "output dir in /proc", [*TRAIN, "--output-dir", "/proc/vit-train-runs"], "not writable"),
    ("vit-train", "CIFAR missing, download off", [*TRAIN, "--dataset", "cifar10", "--data-dir", "{tmp}/empty",
                                                   "--no-download"], "downloading is off"),
    ("vit-train", "missing pretrained file", [*TRAIN, "--pretrained", "{tmp}/nowhere.npz"], "nowhere.npz"),
    # vit-train: resuming
    ("vit-train", "resume of a missing file", ["--resume", "{tmp}/nowhere/last.pt"], "no checkpoint at"),
    ("vit-train", "resume of a non-checkpoint", ["--resume", "{made}/notes.txt"], "not a vit-train checkpoint"),
    ("vit-train", "resume of a pickled object", ["--resume", "{made}/evil.pt"], "refusing"),
    ("vit-train", "resume with another hidden size", ["--resume", DONE, "--set", "model.hidden_size=64"],
     "model.hidden_size cannot change when resuming"),
    ("vit-train", "resume with other patches", ["--resume", DONE, "--set", "model.patches.size=(8,8)"],
     "model.patches.size cannot change when resuming"),
    ("vit-train", "resume at another image size", ["--resume", DONE, "--img-size", "64"],
     "img_size cannot change when resuming"),
    ("vit-train", "resume with a recipe", ["--resume", DONE, "--config", "cifar10_scratch"], "cannot be combined"),
    ("vit-train", "resume under another name", ["--resume", DONE, "--name", "other"],
     "--name other would write another run's folder"),
    ("vit-train", "resume into another folder", ["--resume", DONE, "--output-dir", "{tmp}/elsewhere"],
     "would write another run's folder"),
    ("vit-train", "resume with weights it ignores", ["--resume", DONE, "--pretrained", "{made}/notes.txt"],
     "--pretrained is not used when resuming"),
    ("vit-train", "resume to fewer steps than done", ["--resume", DONE, "--steps", "1"],
     "is at step 2, past the 1 steps asked for"),
    ("vit-train", "resume of a run planned by steps with a time budget", ["--resume", DONE, "--time-budget", "1h"],
     "a resumed run keeps its length, its --steps or --epochs; give --steps N"),
    ("vit-train", "resume of a budget run with another budget", ["--resume", "{made}/budget.pt", "--time-budget",
                                                                 "1h"], "keeps its length, the steps its time budget"),
    # vit-train: a run folder holding another run's files but no last.pt
    ("vit-train", "a folder of a run stopped before its first checkpoint",
     [*TRAIN, "--output-dir", "{made}/runs", "--name", "unsaved"],
     "unsaved already holds a run (config.json, TensorBoard events); remove the folder to start it over, or choose "
     "another --name"),
    ("vit-train", "a folder of a run with best.pt only", [*TRAIN, "--output-dir", "{made}/runs", "--name", "best_only"],
     "best_only already holds a run (best.pt, config.json); continue it from its best checkpoint with --resume "),
    # vit-train: image folders
    ("vit-train", "a broken symbolic link in an image folder",
     [*TRAIN, "--dataset", "imagefolder", "--data-dir", "{made}/linked"], "gone.png (a broken symbolic link); remove"),
    # vit-train: the command line and recipes
    ("vit-train", "unknown --set key", [*TRAIN, "--set", "optim.momentun=0.8"], "unknown config key"),
    ("vit-train", "--set of the wrong type", [*TRAIN, "--set", "optim.lr=fast"], "optim.lr takes a number"),
    ("vit-train", "--set without =", [*TRAIN, "--set", "lr"], "--set takes KEY=VALUE"),
    ("vit-train", "unknown flag", [*TRAIN, "--learning-rate", "0.1"], "unrecognized arguments: --learning-rate"),
    ("vit-train", "abbreviated flag", [*TRAIN, "--batch", "32"], "unrecognized arguments: --batch"),
    ("vit-train", "--steps with --epochs", [*TRAIN, "--epochs", "3"], "not allowed with argument"),
    ("vit-train", "missing recipe", [*TRAIN, "--config", "{tmp}/nowhere.py"], "not found"),
    ("vit-train", "recipe with a syntax error", [*TRAIN, "--config", "{made}/syntax_error.py"],
     "syntax_error.py failed: SyntaxError"),
    ("vit-train", "recipe importing a missing module", [*TRAIN, "--config", "{made}/missing_import.py"],
     "missing_import.py failed: ModuleNotFoundError"),
    ("vit-train", "recipe setting an unknown key", [*TRAIN, "--config", "{made}/raises.py"],
     "raises.py failed: AttributeError"),
    ("vit-train", "recipe without get_config", [*TRAIN, "--config", "{made}/no_get_config.py"], "no get_config"),
    ("vit-train", "recipe returning a dict", [*TRAIN, "--config", "{made}/not_a_config.py"], "must return"),
    ("vit-train", "image side beyond any device", [*TRAIN, "--img-size", "1000000000000"],
     "image size must be between 1 and 16384"),
    ("vit-train", "fractional representation size", [*TRAIN, "--set", "model.representation_size=0.5"],
     "representation_size must be a positive integer"),
    ("vit-train", "a number as the ResNet stem", [*TRAIN, "--set", "model.resnet=2"], "model.resnet is the hybrid's"),
    ("vit-train", "a model that cannot fit in memory", [*TRAIN, "--set", "model.transformer.num_layers=10000000000"],
     "training needs at least"),
    ("vit-train", "num_classes set by hand", [*TRAIN, "--set", "num_classes=3"], "num_classes is the dataset's"),
    # vit-train: empty paths (an unset shell variable, quoted) are not "no value" nor the current folder
    ("vit-train", "empty --resume", [*TRAIN, "--resume", ""], "--resume (resume) is an empty path"),
    ("vit-train", "empty --set resume", [*TRAIN, "--set", "resume="], "--resume (resume) is an empty path"),
    ("vit-train", "empty --pretrained", [*TRAIN, "--pretrained", ""], "--pretrained (pretrained) is an empty path"),
    ("vit-train", "empty --set pretrained", [*TRAIN, "--set", "pretrained="],
     "--pretrained (pretrained) is an empty path"),
    ("vit-train", "empty --config", [*TRAIN, "--config", ""], "--config is an empty path"),
    ("vit-train", "empty --output-dir", [*TRAIN, "--output-dir", ""], "--output-dir (output_dir) is an empty path"),
    ("vit-train", "empty --data-dir", [*TRAIN, "--data-dir", ""], "--data-dir (data.data_dir) is an empty path"),
    ("vit-train", "CIFAR to download into a file", [*TRAIN, "--dataset", "cifar10", "--data-dir", "{made}/notes.txt"],
     "cannot download into"),
    ("vit-train", "CIFAR to download below a file", [*TRAIN, "--dataset", "cifar10", "--data-dir",
                                                     "{made}/notes.txt/cifar"], "notes.txt is not a directory"),
    # vit-eval
    ("vit-eval", "missing checkpoint", ["--checkpoint", "{tmp}/nope.pt"], "no checkpoint at"),
    ("vit-eval", "not a checkpoint", ["--checkpoint", "{made}/notes.txt"], "not a vit-train checkpoint"),
    ("vit-eval", "neither checkpoint nor weights", [], "give --checkpoint"),
    ("vit-eval", "--img-size with a checkpoint", ["--checkpoint", DONE, "--img-size", "64"], "--img-size"),
    ("vit-eval", "--json in a missing folder", ["--checkpoint", DONE, "--json", "{tmp}/no/eval.json"],
     "does not exist"),
    ("vit-eval", "--json names a folder", ["--checkpoint", DONE, "--json", "{tmp}"], "is a folder"),
    ("vit-eval", "--json in /proc", ["--checkpoint", DONE, "--json", "/proc/eval.json"], "not writable"),
    ("vit-eval", "batch size 0", ["--checkpoint", DONE, "--batch-size", "0"], "--batch-size must be at least 1"),
    ("vit-eval", "image size 0 for foreign weights", ["--model", "testing", "--pretrained", DONE + "/last.pt",
                                                      "--dataset", "synthetic", "--img-size", "0"],
     "--img-size must be at least 1"),
    ("vit-eval", "a .npz that is no archive of arrays", ["--model", "testing", "--pretrained", "{made}/garbage.npz",
                                                         "--dataset", "synthetic", "--img-size", "32"],
     "not a .npz archive of arrays"),
    ("vit-eval", "unknown dataset", ["--checkpoint", DONE, "--dataset", "mnist"], "invalid choice"),
    ("vit-eval", "weights of another width", ["--model", "ViT-Ti_4", "--pretrained", DONE + "/last.pt", "--dataset",
                                              "synthetic", "--img-size", "32"],
     "does not fit the model: 'cls_token' is (1, 1, 32) in the checkpoint and (1, 1, 192) in the model"),
    ("vit-eval", "unknown model for weights", ["--model", "ViT-Q_16", "--pretrained", "{made}/notes.txt"],
     "unknown model"),
    ("vit-eval", "unknown device", ["--checkpoint", DONE, "--device", "tpu"], "device"),
    ("vit-eval", "abbreviated flag", ["--check", DONE], "unrecognized arguments: --check"),
    ("vit-eval", "empty --checkpoint", ["--checkpoint", ""], "--checkpoint is an empty path"),
    ("vit-eval", "empty --json", ["--checkpoint", DONE, "--json", ""], "--json is an empty path"),
    ("vit-eval", "empty --data-dir", ["--checkpoint", DONE, "--data-dir", ""], "--data-dir is an empty path"),
    # vit-predict
    ("vit-predict", "missing image", ["--checkpoint", DONE, "{tmp}/nope.png"], "cannot read image"),
    ("vit-predict", "not an image", ["--checkpoint", DONE, "{made}/notes.txt"], "cannot read image"),
    ("vit-predict", "top-k 0", ["--checkpoint", DONE, "{made}/horse.png", "--top-k", "0"], "--top-k"),
    ("vit-predict", "no image", ["--checkpoint", DONE], "required: IMAGE"),
    ("vit-predict", "missing checkpoint", ["--checkpoint", "{tmp}/nope", "{made}/horse.png"], "no checkpoint at"),
    ("vit-predict", "empty image path", ["--checkpoint", DONE, ""], "IMAGE is an empty path"),
    # vit-attention
    ("vit-attention", "empty --out", ["--checkpoint", DONE, "{made}/horse.png", "--out", ""], "--out is an empty path"),
    ("vit-attention", "--out in a missing folder", ["--checkpoint", DONE, "{made}/horse.png", "--out",
                                                    "{tmp}/no/a.png"], "does not exist"),
    ("vit-attention", "--out names a folder", ["--checkpoint", DONE, "{made}/horse.png", "--out", "{tmp}"],
     "is a folder"),
    ("vit-attention", "not an image", ["--checkpoint", DONE, "{made}/notes.txt", "--out", "{tmp}/a.png"],
     "cannot read image"),
    ("vit-attention", "no --out", ["--checkpoint", DONE, "{made}/horse.png"], "required: --out"),
    # vit-export
    ("vit-export", "empty --out", ["--checkpoint", DONE, "--out", ""], "--out is an empty path"),
    ("vit-export", "--out with the card's name", ["--checkpoint", DONE, "--out", "{tmp}/vit.json"], "would hold both"),
    ("vit-export", "--out in a missing folder", ["--checkpoint", DONE, "--out", "{tmp}/no/vit.pth"], "does not exist"),
    ("vit-export", "--out names a folder", ["--checkpoint", DONE, "--out", "{tmp}"], "is a folder"),
    ("vit-export", "--out in /proc", ["--checkpoint", DONE, "--out", "/proc/vit.pth"], "not writable"),
    ("vit-export", "not a checkpoint", ["--checkpoint", "{made}/notes.txt", "--out", "{tmp}/vit.pth"],
     "not a vit-train checkpoint"),
]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """The inputs the cases point at: a real checkpoint, a text file, an unsafe pickle, an image, broken recipes."""
    made = tmp_path_factory.mktemp("made")
    train(resolve_config({"model_name": "testing", "data.name": "synthetic", "data.synthetic_train_size": 64,
                          "data.synthetic_test_size": 32, "batch_size": 32, "schedule.steps": 2, "optim.lr": 1e-3,
                          "quiet": True, "output_dir": str(made / "runs"), "name": "done"}))
    (made / "notes.txt").write_text("not a checkpoint")
    budget = torch.load(made / "runs" / "done" / "last.pt", weights_only=True)
    budget["config"]["time_budget"] = "1m"  # as a --time-budget run records it
    torch.save(budget, made / "budget.pt")
    for name, files in {"unsaved": ("config.json", "events.out.tfevents.1.host.1.0"),
                        "best_only": ("config.json", "best.pt")}.items():
        (made / "runs" / name).mkdir()
        for file in files:
            (made / "runs" / name / file).write_bytes((made / "runs" / "done" / "config.json").read_bytes())
    write_image_folder(made / "linked", per_class_train=2, per_class_val=1)
    (made / "linked" / "train" / "cat" / "gone.png").symlink_to(made / "nowhere.png")
    (made / "garbage.npz").write_bytes(b"\x00not an archive" * 10)

    class RunsCode:  # a pickle that would create a folder when loaded
        def __reduce__(self):
            return (Path.mkdir, (made / "code_ran",))

    torch.save({"model": RunsCode()}, made / "evil.pt")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(made / "horse.png")
    for name, text in RECIPES.items():
        (made / name).write_text(text)
    return made


def snapshot(*folders):
    """Every path under the folders with its size and modification time: any write changes it."""
    return {path: (path.lstat().st_size, path.lstat().st_mtime_ns) for folder in folders for path in folder.rglob("*")}


@pytest.mark.parametrize("command, argv, fragment", [(command, argv, fragment) for command, _, argv, fragment in CASES],
                         ids=[f"{command}: {what}" for command, what, _, _ in CASES])
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(command, argv, fragment, made, tmp_path, capsys):
    before = snapshot(tmp_path, made)
    status = COMMANDS[command]([arg.format(tmp=tmp_path, made=made) for arg in argv])
    out, err = capsys.readouterr()
    assert status == 2, out + err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err, err
    assert snapshot(tmp_path, made) == before  # no run directory, report or export; the inputs untouched
    assert not (made / "code_ran").exists()  # the unsafe pickle's code never ran


def test_the_table_has_at_least_40_cases_over_all_five_commands():
    assert len(CASES) >= 40 and {case[0] for case in CASES} == set(COMMANDS)
