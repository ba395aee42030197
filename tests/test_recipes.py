"""Every shipped recipe trains (a two-step smoke run on synthetic images), and what it trains is the plain ViT at
inference: patch tokens, transformer blocks, a linear head, which `vit-export` hands to timm with the same logits,
whatever the recipe used while training (Muon, patch dropout, fixed position embeddings, mimetic initialisation,
progressive resizing)."""
import json

import pytest
import torch

from vit_train import evaluate
from vit_train.cli import export_main
from vit_train.config import CONFIGS_DIR, load_recipe
from vit_train.resolve import resolve_config
from vit_train.train import train

RECIPES = sorted(path.stem for path in CONFIGS_DIR.glob("*.py"))
# Recipes of ViT-B_16 run the smoke test with the tiny model (two ViT-B steps at 224 px take a minute on a CPU);
# their training choices are still the recipe's.
LARGE = {"ViT-B_16"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_trains_and_exports_a_plain_vit_that_timm_loads(recipe, tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    torch.set_num_threads(1)
    settings = {"data.name": "synthetic", "data.synthetic_train_size": 64, "data.synthetic_test_size": 16,
                "batch_size": 16, "grad_accum": 1, "eval_batch_size": 16, "schedule.steps": 2, "eval_every": 0,
                "save_every": 0, "quiet": True, "output_dir": str(tmp_path), "name": "smoke"}
    if load_recipe(recipe).model_name in LARGE:
        settings.update({"model_name": "testing", "img_size": 32})
    final = train(resolve_config(settings, recipe=recipe))
    assert final["step"] == 2 and final["eval_accuracy"] is not None

    out = tmp_path / "vit.pth"
    assert export_main(["--checkpoint", str(tmp_path / "smoke"), "--out", str(out)]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    monkeypatch.chdir(tmp_path)  # timm opens the weights' name from the working directory
    ours = evaluate.load_trained_model(tmp_path / "smoke", "cpu").model
    size = card["timm"]["img_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(timm.create_model(**card["timm"]).eval()(x), ours.eval()(x), atol=1e-4, rtol=0)
