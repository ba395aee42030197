"""The resolved config: recipes, flags, --set, validation. The table of bad inputs to every command is in
tests/test_bad_input.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_train.checkpoint import load_checkpoint
from vit_train import __version__
from vit_train.cli import attention_main, eval_main, export_main, predict_main, train_main, train_parser
from vit_train.config import CONFIGS_DIR
from vit_train.resolve import resolve_config
from vit_train.errors import UserError

TINY = {"model_name": "testing", "data.name": "synthetic", "batch_size": 32, "schedule.steps": 5}


def test_default_recipe_is_from_scratch_adamw(tmp_path):
    config = resolve_config({"output_dir": str(tmp_path)})
    assert config.model_name == "ViT-B_16" and config.model.patches.size == (16, 16)
    assert config.model.hidden_size == 768 and config.img_size == 32  # the design card: 2x2 patches + CLS
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == ("adamw", 1e-3, 0.05)
    assert config.optim.label_smoothing == 0.1 and config.data.crop_padding == 4 and config.data.hflip
    assert config.batch_size == 512 and config.schedule.epochs == 100 and config.schedule.steps is None
    assert config.name.startswith("ViT-B_16_cifar10_")


def test_pretrained_selects_the_reference_fine_tuning_recipe(tmp_path):
    weights = tmp_path / "ViT-B_16.npz"
    weights.write_bytes(b"")
    config = resolve_config({"pretrained": str(weights), "output_dir": str(tmp_path)})
    optim, schedule = config.optim, config.schedule
    assert (optim.name, optim.lr, optim.momentum, optim.weight_decay, optim.grad_clip) == ("sgd", 3e-2, 0.9, 0.0, 1.0)
    assert (schedule.name, schedule.steps, schedule.warmup_steps) == ("warmup_cosine", 10_000, 500)
    assert config.batch_size == 512 and config.img_size == 224 and config.data.normalize == "inception"


@pytest.mark.parametrize("recipe", sorted(CONFIGS_DIR.glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_recipe_resolves(recipe, tmp_path):
    config = resolve_config({"output_dir": str(tmp_path)}, recipe=str(recipe))
    assert config.model is not None and config.optim.lr > 0


def test_flags_then_sets_override_the_recipe(tmp_path):
    config = resolve_config(
        {**TINY, "optim.lr": 0.01, "output_dir": str(tmp_path), "name": "x"},
        sets=["optim.weight_decay=0.5", "model.transformer.dropout_rate=0.0", "model.patches.size=(8, 8)",
              "data.name=cifar100", "optim.lr=0.02", "schedule.epochs=3"],
    )
    assert config.optim.lr == 0.02 and config.optim.weight_decay == 0.5
    assert config.model.transformer.dropout_rate == 0.0 and config.model.patches.size == (8, 8)
    assert config.data.name == "cifar100"
    assert config.schedule.epochs == 3 and config.schedule.steps is None  # epochs replaced the given steps


@pytest.mark.parametrize("word, value", [("true", True), ("False", False), ("yes", True), ("off", False),
                                         ("1", True), ("0", False), ("True", True)])
def test_a_boolean_is_set_as_a_shell_user_writes_it(word, value, tmp_path):
    config = resolve_config({**TINY, "output_dir": str(tmp_path)}, sets=[f"data.hflip={word}",
                                                                         f"data.download={word}"])
    assert config.data.hflip is value and config.data.download is value


@pytest.mark.parametrize("assignment, message", [
    ("data.hflip=maybe", "data.hflip takes True or False"),
    ("optim.weight_decy=0.1", "unknown config key 'optim.weight_decy'"),
    ("nonsense=1", "unknown config key 'nonsense'"),
    ("optim.lr=fast", "optim.lr takes a number"),
    ("no_equals_sign", "--set takes KEY=VALUE"),
])
def test_bad_set_is_a_user_error(assignment, message, tmp_path):
    with pytest.raises(UserError, match=message):
        resolve_config({**TINY, "output_dir": str(tmp_path)}, sets=[assignment])


def pickled_object_file(path):
    class RunsCode:
        def __reduce__(self):
            return (Path.mkdir, (path.parent / "code_ran",))

    torch.save({"model": RunsCode()}, path)
    return path


def test_a_checkpoint_holding_a_pickled_object_is_refused_unrun(tmp_path):
    path = pickled_object_file(tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"refusing .*evil\.pt: it holds a pickled Python object \(\S+\)"):
        load_checkpoint(path)
    assert not (tmp_path / "code_ran").exists()


def test_batch_must_divide_by_accumulation_times_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UserError, match="not divisible by grad accumulation 2 x 4 processes"):
        resolve_config({**TINY, "batch_size": 36, "grad_accum": 2, "output_dir": str(tmp_path)})


def test_an_existing_run_is_not_overwritten(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "last.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"already holds a run \(last.pt\); continue it with --resume"):
        resolve_config({**TINY, "output_dir": str(tmp_path), "name": "x"})


def test_console_script_prints_one_line_without_traceback(tmp_path):
    script = Path(sys.executable).with_name("vit-train")
    done = subprocess.run([str(script), "--model", "ViT-Q_16"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown model 'ViT-Q_16'") and done.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_help_documents_every_flag_and_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = [a for a in train_parser()._actions
               if a.option_strings and a.dest not in ("help", "version", "list_models", "list_pretrained")]
    for action in options:
        assert action.option_strings[0] in text
        assert "default" in action.help, action.option_strings
    for flag in ("--model", "--dataset", "--data-dir", "--no-download", "--img-size", "--batch-size", "--lr",
                 "--steps", "--epochs", "--warmup-steps", "--eval-every", "--save-every", "--grad-accum", "--seed",
                 "--name", "--output-dir", "--pretrained", "--resume", "--device", "--precision", "--compile",
                 "--quiet", "--config", "--set", "--list-models"):
        assert flag in text
    assert "(default: 0.001; 0.03 with --pretrained)" in text
    assert "a bare number is seconds" in text


@pytest.mark.parametrize("main, prog", [(train_main, "vit-train"), (eval_main, "vit-eval"),
                                        (predict_main, "vit-predict"), (attention_main, "vit-attention"),
                                        (export_main, "vit-export")])
def test_every_tool_says_its_version(main, prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"{prog} {__version__}\n"


def test_list_models(capsys):
    assert train_main(["--list-models"]) == 0
    names = capsys.readouterr().out.split()
    assert "ViT-B_16" in names and "testing" in names and "R50-ViT-B_16" in names
