"""The from-scratch regularisers (stochastic depth, weight EMA, repeated augmentation) and time budgets: each
does what it claims, is off by default, and survives an interrupted run bit for bit."""
import json
import math
import os
import re
import signal

import numpy as np
import pytest
import torch

import vit_train.budget
import vit_train.train
from vit_train.checkpoint import load_checkpoint
from vit_train.cli import eval_main
from vit_train.config import default_data_config
from vit_train.data import build_loaders
from vit_train.errors import UserError
from vit_train.models.vit import Block, DropPath, VisionTransformer, create_model, resize_position_grid
from vit_train.budget import Calibration, budget_seconds, budget_steps, seconds_to_go
from vit_train.optim import Plan, WeightEMA
from vit_train.report import duration_line, format_duration
from vit_train.resolve import resolve_config
from vit_train.train import train

TINY = {"model_name": "testing", "data.name": "synthetic", "data.synthetic_train_size": 512,
        "data.auto_augment": "none", "data.random_erasing": 0.0, "data.mixup_alpha": 0.0, "data.cutmix_alpha": 0.0,
        "data.synthetic_test_size": 128, "batch_size": 32, "schedule.steps": 30, "schedule.warmup_steps": 3,
        "optim.lr": 3e-3, "eval_every": 10, "save_every": 10, "log_every": 5, "quiet": True}
ALL_ON = {"model.transformer.drop_path_rate": 0.2, "optim.ema_decay": 0.9, "data.repeated_augmentation": 3,
          "data.auto_augment": "autoaugment", "data.mixup_alpha": 0.8, "data.cutmix_alpha": 1.0,
          "data.random_erasing": 0.25, "model.patch_dropout": 0.25, "schedule.low_res_size": 16,
          "schedule.low_res_fraction": 0.5, "schedule.all_patches_fraction": 0.2, "data.all_patches_crop_padding": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(tmp_path, name, **settings):
    return train(resolve_config({**TINY, "output_dir": str(tmp_path), "name": name, **settings}))


# ---------------------------------------------------------------------------------------------------------------
# Stochastic depth

def test_drop_path_keeps_the_expectation_drops_whole_samples_and_is_identity_in_eval():
    torch.manual_seed(0)
    drop = DropPath(0.25)
    branch = torch.randn(4000, 5, 8) + 3.0
    out = drop(branch)
    kept = (out != 0).flatten(1)
    assert (kept.all(dim=1) | (~kept).all(dim=1)).all()  # a sample keeps its whole branch or none of it
    assert abs((~kept[:, 0]).float().mean().item() - 0.25) < 0.03
    assert torch.allclose(out[kept[:, 0]], branch[kept[:, 0]] / 0.75)
    assert abs(out.mean().item() - branch.mean().item()) < 0.05 * branch.mean().item()
    drop.eval()
    assert drop(branch) is branch


def test_a_recipe_keeps_its_model_when_model_names_it_and_loses_it_for_another():
    assert resolve_config({"model_name": "ViT-B_16"}).model.transformer.drop_path_rate == 0.1  # the recipe's
    assert resolve_config({"model_name": "ViT-B_32"}).model.transformer.drop_path_rate == 0.0  # the original's


def test_drop_path_rises_linearly_over_the_blocks_and_adds_no_parameters():
    plain = create_model("ViT-Ti_4", num_layers=5)
    deep = create_model("ViT-Ti_4", num_layers=5, drop_path_rate=0.2)
    assert [block.drop_path.p for block in deep.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert plain.state_dict().keys() == deep.state_dict().keys()  # exports and timm loading are unchanged
    deep.load_state_dict(plain.state_dict())
    images = torch.randn(3, 3, 32, 32)
    assert torch.equal(plain.eval()(images), deep.eval()(images))  # identity in evaluation


def test_drop_path_changes_training_outputs():
    torch.manual_seed(0)
    model = create_model("testing", drop_path_rate=0.5, dropout_rate=0.0).train()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)  # the head starts at zero: give the branches something to say
    images = torch.randn(64, 3, 32, 32)
    assert not torch.allclose(model(images), model(images))


# ---------------------------------------------------------------------------------------------------------------
# Patch dropout and training at a lower resolution first

def test_patch_dropout_keeps_the_cls_token_and_a_share_of_the_patches_in_training_only():
    torch.manual_seed(0)
    model = create_model("testing", patch_dropout=0.75).train()
    tokens = torch.randn(6, 65, 32)
    tokens[:, 0] = 100.0  # the CLS token, recognisable
    kept = model.drop_patches(tokens)
    assert kept.shape == (6, 1 + 16, 32) and (kept[:, 0] == 100.0).all()
    for image, rows in zip(tokens, kept):  # each kept token is one of the image's own patches, none twice
        matches = (rows[1:, None, :] == image[None, 1:, :]).all(dim=2)
        assert (matches.sum(dim=1) == 1).all() and (matches.sum(dim=0) <= 1).all()
    model.eval()
    assert model.drop_patches(tokens) is tokens


def test_sincos2d_position_embeddings_follow_the_formula_per_entry():
    model = create_model("testing", position_embedding="sincos2d", hidden_size=32)  # 8x8 grid, 8 frequencies
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(32))  # the CLS token has no position
    for row, column in [(0, 0), (0, 5), (3, 1), (7, 7)]:
        embedding = model.pos_embed[0, 1 + row * 8 + column].double()
        for k in range(8):
            frequency = 10000.0 ** (-k / 7)
            expected = [math.sin(column * frequency), math.cos(column * frequency),
                        math.sin(row * frequency), math.cos(row * frequency)]
            assert embedding[[k, 8 + k, 16 + k, 24 + k]].tolist() == pytest.approx(expected, abs=1e-6)


def test_fixed_position_embeddings_stay_fixed_in_training_and_keep_the_state_dict(tmp_path):
    learned = create_model("testing")
    fixed = create_model("testing", position_embedding="sincos2d")
    assert {k: v.shape for k, v in fixed.state_dict().items()} == {k: v.shape for k, v in learned.state_dict().items()}
    assert not fixed.pos_embed.requires_grad and learned.pos_embed.requires_grad
    run(tmp_path, "fixed", **{"model.position_embedding": "sincos2d"})
    trained = load_checkpoint(tmp_path / "fixed" / "last.pt")["model"]
    assert torch.equal(trained["pos_embed"], fixed.pos_embed.detach())  # same formula, never updated
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], fixed.state_dict()["blocks.0.attn.qkv.weight"])


def test_mimetic_attention_products_are_the_papers_identity_plus_noise():
    torch.manual_seed(0)
    model = create_model("testing", hidden_size=64, num_heads=1, attention_init="mimetic")  # full-rank heads
    for block in model.blocks:
        query, key, value = block.attn.qkv.weight.detach().chunk(3)
        for product, scale, identity in ((query.T @ key, 0.7, 0.7),
                                         (value.T @ block.attn.proj.weight.detach().T, 0.4, -0.4)):
            noise = product - identity * torch.eye(64)  # scale * Z with Z ~ N(0, 1/64)
            assert abs(noise.mean()) < 0.02 and noise.std() == pytest.approx(scale / 8, rel=0.1)
        assert torch.equal(block.attn.qkv.bias.detach(), torch.zeros(192))
    heads = create_model("testing", hidden_size=64, num_heads=4, attention_init="mimetic").blocks[0].attn
    query, key, _ = heads.qkv.weight.detach().chunk(3)
    for head in range(4):  # each head's rank-16 share of the identity: a positive trace, as in trained ViTs
        rows = slice(16 * head, 16 * (head + 1))
        assert torch.linalg.matrix_rank(query[rows].T @ key[rows]) == 16
        assert (query[rows].T @ key[rows]).trace() > 0.2 * 64
    with pytest.raises(UserError, match="attention_init must be 'xavier' or 'mimetic'"):
        create_model("testing", attention_init="identity")


def test_a_model_takes_images_of_a_lower_resolution_with_its_position_grid_resized():
    model = create_model("testing").eval()  # 4-px patches: an 8x8 grid at 32 px
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    small = torch.randn(2, 3, 16, 16)
    expected_pos = resize_position_grid(model.pos_embed, 1, 4)
    assert expected_pos.shape == (1, 1 + 16, 32) and torch.equal(expected_pos[:, 0], model.pos_embed[:, 0])
    x = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(small)], dim=1) + expected_pos
    for block in model.blocks:
        x, _ = block(x)
    assert torch.allclose(model(small), model.head(model.norm(x)[:, 0]), atol=1e-6)
    grid = model.pos_embed[:, 1:].reshape(8, 8, -1)  # downsampling by 2 averages each 2x2 block
    assert torch.allclose(expected_pos[0, 1], grid[:2, :2].mean(dim=(0, 1)), atol=1e-6)


def test_the_low_resolution_share_comes_first():
    config = resolve_config({**TINY, "schedule.low_res_size": 16, "schedule.low_res_fraction": 0.25})
    plan = Plan.from_config(config, steps_per_epoch=16, total_steps=40)
    sizes = [plan.phase(step)[0] for step in range(40)]
    assert sizes == [16] * 10 + [32] * 30
    with pytest.raises(UserError, match="low_res_size 14 does not split into whole 4-pixel patches"):
        resolve_config({**TINY, "schedule.low_res_size": 14})  # 4-px patches
    with pytest.raises(UserError, match="low_res_size"):
        resolve_config({**TINY, "schedule.low_res_size": 48})


def test_the_last_steps_train_on_every_patch_from_a_restarted_learning_rate(tmp_path):
    settings = {"model.patch_dropout": 0.75, "schedule.all_patches_fraction": 0.1, "schedule.all_patches_lr": 0.2,
                "schedule.steps": 40, "eval_every": 0, "save_every": 0}
    plan = Plan.from_config(resolve_config({**TINY, **settings}), steps_per_epoch=16)
    assert [plan.phase(step) for step in range(40)] == [(32, False)] * 36 + [(32, True)] * 4
    assert plan.lr_factor(35) < 0.01 and plan.lr_factor(36) == pytest.approx(0.2)  # the main decay ends, then
    assert 0.2 > plan.lr_factor(37) > plan.lr_factor(38) > plan.lr_factor(39) > 0  # the restart decays again
    tokens = []  # the sequence each block trains on: the CLS token and 16 of 64 patches, then all 64 at the end

    def record(module, args):
        if isinstance(module, Block) and module.training:
            tokens.append(args[0].shape[1])
    with torch.nn.modules.module.register_module_forward_pre_hook(record):
        run(tmp_path, "last-on-all", **settings)
    layers = create_model("testing").blocks.__len__()
    assert tokens == [17] * 36 * layers + [65] * 4 * layers


def test_the_steps_on_every_patch_and_only_they_train_on_batches_cropped_with_their_own_padding(tmp_path):
    settings = {"model.patch_dropout": 0.75, "schedule.all_patches_fraction": 0.1, "schedule.steps": 40,
                "data.crop_padding": 0, "eval_every": 0, "save_every": 0}
    seen = {}  # each run's training batches, as the model gets them

    def record(module, args):
        if isinstance(module, VisionTransformer) and module.training:
            seen[name].append(args[0].clone())
    with torch.nn.modules.module.register_module_forward_pre_hook(record):
        for name, crop in (("plain", None), ("cropped", 2)):
            seen[name] = []
            run(tmp_path, name, **settings, **{"data.all_patches_crop_padding": crop})
    same = [torch.equal(a, b) for a, b in zip(seen["plain"], seen["cropped"], strict=True)]
    assert same == [True] * 36 + [False] * 4  # the plan's last 4 steps are on every patch


def test_an_ending_on_every_patch_needs_patch_dropout_and_a_learning_rate_factor_in_range():
    # without patch dropout every step is on every patch, so there is no ending (a recipe's model swapped for one
    # without patch dropout keeps working)
    config = resolve_config({**TINY, "schedule.all_patches_fraction": 0.1, "schedule.steps": 40})
    plan = Plan.from_config(config, steps_per_epoch=16)
    assert plan.all_patches_steps == 0 and plan.lr_factor(39) == pytest.approx(Plan.from_config(
        resolve_config({**TINY, "schedule.steps": 40}), steps_per_epoch=16).lr_factor(39))
    for lr in (0.0, 1.5, math.nan):
        with pytest.raises(UserError, match="schedule.all_patches_lr is a factor of the peak learning rate"):
            resolve_config({**TINY, "model.patch_dropout": 0.5, "schedule.all_patches_fraction": 0.1,
                            "schedule.all_patches_lr": lr})
    with pytest.raises(UserError, match="data.all_patches_crop_padding must be >= 0, got -1"):
        resolve_config({**TINY, "model.patch_dropout": 0.5, "schedule.all_patches_fraction": 0.1,
                        "data.all_patches_crop_padding": -1})
    with pytest.raises(UserError, match="data.crop_padding must be >= 0, got None"):  # only the ending's may be unset
        resolve_config({**TINY, "data.crop_padding": None})


def test_an_ending_crop_padding_in_a_run_without_an_ending_is_named_as_doing_nothing(capsys):
    resolve_config({**TINY, "model.patch_dropout": 0.5, "schedule.all_patches_fraction": 0.1,
                    "data.all_patches_crop_padding": 2})
    assert capsys.readouterr().err == ""
    resolve_config({**TINY, "data.all_patches_crop_padding": 2})  # no patch dropout: no ending
    assert capsys.readouterr().err.startswith("warning: data.all_patches_crop_padding is read only with steps on "
                                              "every patch")


# ---------------------------------------------------------------------------------------------------------------
# Weight EMA

def test_ema_after_k_updates_is_the_closed_form():
    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema, decay = WeightEMA(model, 0.9), 0.9
    seen = []
    for k in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model)
    for key in start:  # ema_k = d^k w_0 + sum_i (1 - d) d^(k - i) w_i
        expected = decay**5 * start[key] + sum((1 - decay) * decay**(5 - i) * seen[i - 1][key] for i in range(1, 6))
        assert torch.allclose(ema.model.state_dict()[key], expected, atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_ema_is_evaluated_saved_and_used_by_vit_eval(tmp_path, capsys):
    final = run(tmp_path, "ema", **{"optim.ema_decay": 0.8, "schedule.steps": 20})
    records = [json.loads(line) for line in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()]
    assert all({"eval_accuracy", "eval_ema_accuracy", "eval_ema_loss"} <= r.keys() for r in records)
    checkpoint = load_checkpoint(tmp_path / "ema")
    raw, averaged = checkpoint["model"], checkpoint["ema"]
    assert raw.keys() == averaged.keys() and not all(torch.equal(raw[k], averaged[k]) for k in raw)
    best = max(r["eval_ema_accuracy"] for r in records)
    assert final["best_accuracy"] == best  # best.pt is chosen on the EMA's accuracy, the weights vit-eval uses
    assert load_checkpoint(tmp_path / "ema" / "best.pt")["metrics"]["eval_ema_accuracy"] == best

    capsys.readouterr()
    assert eval_main(["--checkpoint", str(tmp_path / "ema"), "--device", "cpu"]) == 0
    assert f"{final['eval_ema_accuracy']:.4f}" in capsys.readouterr().out.split("accuracy")[1]
    assert eval_main(["--checkpoint", str(tmp_path / "ema"), "--device", "cpu", "--weights", "raw"]) == 0
    assert f"{final['eval_accuracy']:.4f}" in capsys.readouterr().out.split("accuracy")[1]


def test_weights_ema_without_an_average_is_a_one_line_error(tmp_path, capsys):
    run(tmp_path, "plain", **{"schedule.steps": 4, "eval_every": 0, "save_every": 0})
    assert eval_main(["--checkpoint", str(tmp_path / "plain"), "--device", "cpu", "--weights", "ema"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--weights raw" in err


# ---------------------------------------------------------------------------------------------------------------
# Repeated augmentation

def loaders(world_size=1, rank=0, repeats=3, batch_size=24):
    cfg = default_data_config()
    cfg.update({"name": "synthetic", "synthetic_train_size": 240, "repeated_augmentation": repeats})
    return build_loaders(cfg, img_size=32, batch_size=batch_size, eval_batch_size=50, device="cpu", seed=5,
                         rank=rank, world_size=world_size)


def test_repeated_augmentation_repeats_each_image_with_different_augmentations():
    train_loader = loaders().train
    batches = train_loader.batch_indices(epoch=0)
    assert len(batches) == len(loaders(repeats=0).train)  # the epoch keeps its length
    flat = np.concatenate(batches)
    assert (flat.reshape(-1, 3) == flat.reshape(-1, 3)[:, :1]).all()  # three copies in a row
    assert len(np.unique(flat)) == len(flat) // 3
    images, _ = next(train_loader.batches(0))
    assert not torch.equal(images[0], images[1])  # the copies are augmented apart


def test_repeated_augmentation_gives_ranks_disjoint_positions_that_cover_the_global_batch():
    single = loaders(batch_size=24).train.batch_indices(epoch=2)
    shards = [loaders(world_size=4, rank=r, batch_size=6).train.batch_indices(epoch=2) for r in range(4)]
    for b, whole in enumerate(single):
        assert np.array_equal(np.concatenate([shard[b] for shard in shards]), whole)


# ---------------------------------------------------------------------------------------------------------------
# Time budgets and durations

@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1.5h", 5400), ("45", 45),
                                           ("1d", 86400)])
def test_budget_durations_parse(text, seconds):
    assert budget_seconds(text) == seconds


@pytest.mark.parametrize("text", ["10 minutes", "-5m", "0s", "infs", "m", ""])
def test_bad_budget_durations_are_one_line_errors(text):
    with pytest.raises(UserError, match="--time-budget takes a duration"):
        budget_seconds(text)


def test_budget_steps_fit_training_evaluations_and_saves():
    steps = budget_steps(100.0, step_seconds=0.1, eval_seconds=2.0, save_seconds=0.5, eval_every=200, save_every=0)
    cost = lambda n: n * 0.1 + (1 + n // 200) * 2.0 + 0.5
    assert cost(steps) <= 100.0 < cost(steps + 1)
    assert budget_steps(1.0, step_seconds=0.1, eval_seconds=2.0, save_seconds=0.5, eval_every=0, save_every=0) == 0
    # after 150 steps the evaluation at step 200 still comes: it is counted, the one at 0 is not
    later = budget_steps(10.0, step_seconds=0.1, eval_seconds=2.0, save_seconds=0.5, eval_every=200, save_every=0,
                         done=150)
    assert later == 55  # 55 steps to 205: 5.5 s + evaluations at 200 and the end, 4 s + the final save, 0.5 s


def test_a_replan_scales_the_steps_still_to_come_by_how_much_slower_the_first_ran():
    config = resolve_config({**TINY, "schedule.low_res_size": 16, "schedule.low_res_fraction": 0.25,
                             "eval_every": 0, "save_every": 0})
    plan = Plan.from_config(config, steps_per_epoch=16, total_steps=400)
    calibration = Calibration(budget=100.0, step_seconds={(16, False): 0.05, (32, False): 0.2}, eval_seconds=1.0,
                              save_seconds=0.5)

    def replan(seconds_left, seconds_trained):
        return calibration.replan(plan, step=200, seconds_left=seconds_left, seconds_trained=seconds_trained,
                                  first_step=0, eval_every=0, save_every=0)
    # 200 of 400 planned steps done (100 at 16 px, 100 at 32 px: 25 s calibrated) in 50 s: twice as slow
    new, slowdown = replan(54.6, 50.0)
    assert slowdown == pytest.approx(2.0)
    # 54.6 s less a 6% reserve (3.3 s) and the final evaluation and save, twice as slow too (3 s): 48.3 s at
    # 0.4 s a step (all at 32 px by now)
    assert new.total_steps == 200 + 120
    assert (new.low_res_steps, new.warmup_steps) == (plan.low_res_steps, plan.warmup_steps)  # already committed
    assert replan(54.6, 25.0)[0].total_steps == 200 + 249 and replan(54.6, 25.0)[1] == pytest.approx(1.0)
    assert replan(1.0, 50.0)[0].total_steps == 201  # out of time: one more step, then the end


def test_a_new_length_keeps_the_boundaries_it_reaches_and_moves_only_those_it_no_longer_does():
    plan = Plan("warmup_cosine", total_steps=1000, warmup_steps=300, img_size=32, low_res_size=16, low_res_steps=500)
    longer = plan.lengthened(1400, step=200)  # inside the warm-up: a longer run keeps both boundaries
    assert (longer.total_steps, longer.warmup_steps, longer.low_res_steps) == (1400, 300, 500)
    shorter = plan.lengthened(800, step=200)  # both boundaries still inside the new length
    assert (shorter.warmup_steps, shorter.low_res_steps) == (300, 500)
    much_shorter = plan.lengthened(400, step=350)  # the warm-up is over; the low-res phase keeps its half
    assert (much_shorter.warmup_steps, much_shorter.low_res_steps) == (300, 350)
    assert [longer.phase(s)[0] for s in (499, 500, 1399)] == [16, 32, 32]  # never back to low resolution
    assert plan.lengthened(5000, step=600).low_res_steps == 500


def test_a_new_length_keeps_the_steps_on_every_patch_last_and_the_budget_prices_them_at_their_cost():
    plan = Plan("warmup_cosine", total_steps=1000, warmup_steps=50, img_size=32, all_patches_steps=20,
                all_patches_lr=0.1)
    longer = plan.lengthened(1400, step=500)
    assert (longer.all_patches_steps, longer.all_patches_from) == (20, 1380)
    assert longer.lr_factor(500) == pytest.approx(plan.lr_factor(500))  # the learning rate never jumps
    assert longer.lr_factor(1379) < 1e-4 and longer.lr_factor(1380) == pytest.approx(0.1)
    assert plan.lengthened(510, step=500).all_patches_steps == 10  # as many as still fit
    assert plan.lengthened(1400, step=985) is plan  # they began: the length stays
    calibration = Calibration(budget=1000.0, step_seconds={(32, False): 0.1, (32, True): 0.4}, eval_seconds=1.0,
                              save_seconds=0.5)
    assert calibration.calibrated_seconds(plan, 900, 1000) == pytest.approx(80 * 0.1 + 20 * 0.4)
    new, _ = calibration.replan(plan, step=200, seconds_left=100.0, seconds_trained=20.0, first_step=0,
                                eval_every=0, save_every=0)
    assert new.all_patches_steps == 20
    spent = calibration.calibrated_seconds(new, 200, new.total_steps) + 1.0 + 0.5
    assert spent <= 94.0 < spent + 0.1  # fits the time less a 6% reserve; one more step would not
    assert calibration.replan(plan, step=990, seconds_left=100.0, seconds_trained=1.0, first_step=900,
                              eval_every=0, save_every=0)[0] is plan


def test_a_replan_after_steps_faster_than_calibrated_expects_the_untimed_ending_no_faster_than_its_calibration():
    """A calibration that caught the machine busy while it timed the patch-dropout steps, and no longer while it
    timed the steps on every patch: the first run at 0.7x their calibrated time, the ending at 1.0x. Expecting the
    ending at 0.7x too planned a run that ended 25 s past its 30 minutes."""
    plan = Plan("warmup_cosine", total_steps=1000, warmup_steps=50, img_size=32, all_patches_steps=100,
                all_patches_lr=0.1)
    dropout, every = (32, False), (32, True)
    calibration = Calibration(budget=1000.0, step_seconds={dropout: 0.1, every: 0.4}, eval_seconds=2.0,
                              save_seconds=1.0)
    new, slowdown = calibration.replan(plan, step=200, seconds_left=300.0, seconds_trained=14.0, first_step=0,
                                       eval_every=0, save_every=0)
    assert slowdown == pytest.approx(0.7)
    # as the run will really go: the patch-dropout steps at 0.7x, the ending, evaluation and save at 1.0x
    steps = new.phase_steps(200, new.total_steps)
    real = steps[dropout] * 0.07 + steps[every] * 0.4 + 2.0 + 1.0
    assert real <= 300.0 * 0.94 < real + 0.07  # fits the time less the 6% reserve; one more step would not
    # Slower than calibrated, the ending is expected as much slower: as before.
    slower, _ = calibration.replan(plan, step=200, seconds_left=300.0, seconds_trained=30.0, first_step=0,
                                   eval_every=0, save_every=0)
    steps = slower.phase_steps(200, slower.total_steps)
    assert steps[dropout] * 0.15 + steps[every] * 0.6 + 4.5 <= 300.0 * 0.94


def test_the_time_to_go_prices_each_phase_at_its_own_speed_the_steps_on_every_patch_too():
    plan = Plan("warmup_cosine", total_steps=1000, warmup_steps=50, img_size=32, all_patches_steps=100,
                all_patches_lr=0.1)
    dropout, every = (32, False), (32, True)
    calibrated = {dropout: 0.1, every: 0.4}
    # Half way, running 1.5x slower than calibrated: the ending is expected 1.5x slower than its calibration too.
    assert seconds_to_go(plan, 500, {dropout: 0.15}, calibrated) == pytest.approx(400 * 0.15 + 100 * 0.6)
    # Inside the ending, its own measured speed counts, whatever the calibration said.
    assert seconds_to_go(plan, 950, {dropout: 0.15, every: 0.5}, calibrated) == pytest.approx(50 * 0.5)
    # Running faster than calibrated says the calibration caught the machine busy: the ending, not timed since, is
    # expected at its calibrated speed, not faster.
    assert seconds_to_go(plan, 500, {dropout: 0.07}, calibrated) == pytest.approx(400 * 0.07 + 100 * 0.4)
    # A run without a calibration (--steps) knows no other speed than the one it runs at.
    assert seconds_to_go(plan, 500, {dropout: 0.15}, {}) == pytest.approx(500 * 0.15)
    assert seconds_to_go(plan, 1000, {dropout: 0.15}, calibrated) == 0


def test_durations_never_wrap_and_a_long_cpu_run_names_a_cpu_recipe():
    assert format_duration(27 * 3600 + 2 * 60 + 29) == "1 day 3:02:29"
    assert format_duration(3 * 86400 + 5) == "3 days 0:00:05"
    assert format_duration(59) == "0:00:59"
    line = duration_line(27 * 3600, torch.device("cpu"), steps=9700, steps_per_epoch=97)
    assert "1 day 3:00:00" in line and "100.0 epochs" in line and "cifar10_cpu --time-budget 10m" in line
    assert "cifar10_cpu" not in duration_line(27 * 3600, torch.device("cuda"), steps=9700, steps_per_epoch=97)


def test_a_budget_run_ends_within_its_budget_and_resumes_its_planned_schedule(tmp_path, capsys):
    settings = {**TINY, "schedule.steps": None, "time_budget": "6s", "schedule.warmup_fraction": 0.1,
                "eval_every": 0, "save_every": 50}
    settings.pop("schedule.steps")
    config = resolve_config({**settings, "output_dir": str(tmp_path), "name": "budget"})
    assert config.schedule.steps is None and config.schedule.epochs is None
    final = train(config)
    planned = json.loads((tmp_path / "budget" / "config.json").read_text())["schedule"]
    assert final["step"] == planned["steps"] > 20
    assert final["seconds"] <= 6.0 * 1.1  # within the budget, give or take a busy machine's jitter
    replanned = re.search(r"re-planned at step (\d+): .* so (\d+) steps rather than (\d+)", capsys.readouterr().out)
    first_plan = int(replanned[3])
    assert int(replanned[1]) == round(0.2 * first_plan)  # the first re-plan; later ones follow the machine
    assert planned["warmup_steps"] == round(0.1 * first_plan)  # the warm-up was over before the re-plan
    assert load_checkpoint(tmp_path / "budget")["config"]["schedule"]["steps"] == planned["steps"]

    # Resumed for more steps, it keeps the planned schedule's length unless told otherwise.
    resumed = resolve_config({"resume": str(tmp_path / "budget")})
    assert (resumed.schedule.steps, resumed.schedule.warmup_steps) == (planned["steps"], planned["warmup_steps"])
    with pytest.raises(UserError, match="keeps its length, the steps its time budget planned"):
        resolve_config({"resume": str(tmp_path / "budget"), "time_budget": "1h"})



def test_timing_the_steps_changes_nothing_in_the_run(tmp_path, monkeypatch):
    """Without the re-plan, a budget run is exactly the --steps run of its planned length: the calibration's steps
    are undone."""
    monkeypatch.setattr(vit_train.budget, "REPLAN_AT", 2.0)  # never comes
    settings = {key: value for key, value in TINY.items() if key != "schedule.steps"}
    settings.update({"time_budget": "4s", "schedule.warmup_fraction": 0.1, "eval_every": 0, "save_every": 50})
    final = train(resolve_config({**settings, "output_dir": str(tmp_path), "name": "budget"}))
    planned = json.loads((tmp_path / "budget" / "config.json").read_text())["schedule"]["steps"]
    again = run(tmp_path, "fixed", **{"schedule.steps": planned, "schedule.warmup_fraction": 0.1,
                                      "eval_every": 0, "save_every": 50})
    assert again["eval_loss"] == final["eval_loss"]
    a, b = load_checkpoint(tmp_path / "budget")["model"], load_checkpoint(tmp_path / "fixed")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_needs_a_length():
    with pytest.raises(UserError, match="give --steps, --epochs or --time-budget|time budget"):
        resolve_config({**TINY, "schedule.steps": None})


# ---------------------------------------------------------------------------------------------------------------
# Everything on, interrupted and resumed

@pytest.mark.parametrize("stop_at", [13, 26], ids=["at-low-resolution", "on-every-patch"])
def test_a_run_with_every_regulariser_resumes_bit_identically(stop_at, tmp_path, monkeypatch):
    straight = run(tmp_path, "straight", **ALL_ON)
    real_step, calls = vit_train.train.train_step, []

    def step(*args):
        calls.append(1)
        loss = real_step(*args)
        if len(calls) == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(vit_train.train, "train_step", step)
    stopped = run(tmp_path, "interrupted", **ALL_ON)
    monkeypatch.undo()
    assert stopped["step"] == stop_at and load_checkpoint(tmp_path / "interrupted")["ema"] is not None
    resumed = train(resolve_config({"resume": str(tmp_path / "interrupted")}))
    assert (resumed["eval_accuracy"], resumed["eval_ema_accuracy"], resumed["eval_loss"]) == (
        straight["eval_accuracy"], straight["eval_ema_accuracy"], straight["eval_loss"])
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "interrupted")
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert not math.isnan(resumed["eval_loss"])


def test_checkpoints_written_before_the_new_keys_resume_and_evaluate(tmp_path, capsys):
    """A checkpoint from before stochastic depth, EMA, repeated augmentation and random erasing existed."""
    run(tmp_path, "old", **{"schedule.steps": 10, "eval_every": 0, "save_every": 5})
    checkpoint = load_checkpoint(tmp_path / "old" / "last.pt")
    path = tmp_path / "old" / "before.pt"
    config = checkpoint["config"]
    del config["optim"]["ema_decay"], config["data"]["random_erasing"], config["data"]["repeated_augmentation"]
    del config["model"]["transformer"]["drop_path_rate"], config["model"]["patch_dropout"], checkpoint["ema"]
    for key in ("all_patches_fraction", "all_patches_steps", "all_patches_lr"):
        del config["schedule"][key]
    torch.save(checkpoint, path)
    assert eval_main(["--checkpoint", str(path), "--device", "cpu"]) == 0
    assert train(resolve_config({"resume": str(path), "schedule.steps": 12}))["step"] == 12
