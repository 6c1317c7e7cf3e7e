"""train_vit.py on a tiny timm ViT (2 blocks, width 32, 8x8 patches of 4x4 pixels) on CPU: ARD's hooks,
PRM's masks, the 32x32 adaptation of pretrained weights, end-to-end runs read by evaluate.py, resume,
bf16 autocast, torchrun, and the message when the weights cannot be downloaded."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train_piat as tp
import train_vit as tv
import utils
from sweep import read_metrics
from conftest import one_line_error, run_script, stub_bf16_probe

TINY_KWARGS = {"depth": 2, "embed_dim": 32, "num_heads": 2}
TINY_VIT = ["--dataset", "synthetic", "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY_KWARGS),
            "--no-pretrained", "--train-size", "64", "--eval-size", "32", "--batch-size", "32", "--pgd-steps", "2",
            "--eval-pgd-steps", "2", "--device", "cpu"]
OUTPUTS = ["args.json", "best.pt", "curves.png", "final.pt", "metrics.csv", "tensorboard"]


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return utils.build_model("vit_tiny_patch16_224", 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), img_size=32,
                             patch_size=4, **TINY_KWARGS)


def batch(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return 0.25 + 0.5 * torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def input_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)[0]


def hook_count(model):
    return sum(len(m._backward_pre_hooks) + len(m._backward_hooks) + len(m._forward_hooks) for m in model.modules())


def step_args(**overrides):
    args = tv.parse_args(TINY_VIT + ["--epochs", "4", "--ard", "--prm", "--ap-warmup-epochs", "4"])
    args.img_size = 32
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------------ ARD


def test_ard_zeroes_the_attention_branch_gradient_and_removes_its_hooks():
    model = tiny_vit().eval()
    x, y = batch()
    attns = tv.attention_modules(model)
    assert len(attns) == 2 and hook_count(model) == 0
    plain = input_grad(model, x, y)
    with tv.attention_gradient_drop(model, 1.0) as hooks:
        assert len(hooks) == 2
        dropped = input_grad(model, x, y)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        # the attention parameters get nothing: their only path to the loss is the dropped branch
        assert all(p.grad is None or not p.grad.any() for a in attns for p in a.parameters())
        assert all(b.mlp.fc1.weight.grad.abs().sum() > 0 for b in model.net.blocks)
    assert hook_count(model) == 0
    # the reference: the same network with each attention output detached (same forward values)
    handles = [a.register_forward_hook(lambda m, i, out: out.detach()) for a in attns]
    reference = input_grad(model, x, y)
    for h in handles:
        h.remove()
    assert not torch.allclose(dropped, plain, atol=1e-6)
    torch.testing.assert_close(dropped, reference, rtol=1e-5, atol=1e-7)
    with tv.attention_gradient_drop(model, 0.0) as hooks:  # after the warm-up: no hooks at all
        assert hooks == []
        torch.testing.assert_close(input_grad(model, x, y), plain)
    with pytest.raises(RuntimeError), tv.attention_gradient_drop(model, 1.0):
        raise RuntimeError("the attack failed")
    assert hook_count(model) == 0  # removed even then


def test_ard_drops_each_block_independently_with_probability_p(monkeypatch):
    model = tiny_vit().eval()
    x, y = batch()
    draws = iter([0.2, 0.9])  # random.random() per block and backward pass: block 2 first (backward order)
    monkeypatch.setattr(tv.random, "random", lambda: next(draws))
    with tv.attention_gradient_drop(model, 0.5):
        got = input_grad(model, x, y)
    # block 2 (0.2 < 0.5) dropped, block 1 (0.9) kept
    handle = model.net.blocks[1].attn.register_forward_hook(lambda m, i, out: out.detach())
    reference = input_grad(model, x, y)
    handle.remove()
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-7)


def test_each_loss_attacks_with_its_papers_objective_and_ard_runs_eagerly(monkeypatch):
    """ap_attack: CE from a uniform start (ce, nmse), TRADES's KL and MART's CE from 0.001 N(0, 1); while ARD's hooks
    are on, through model.forward (the eager forward: a compiled model's call would not be the hooked modules')."""
    model = tiny_vit().eval()
    x, y = batch()
    calls = []
    real = tv.pgd_attack
    monkeypatch.setattr(tv, "pgd_attack", lambda victim, *a, **k: (calls.append((victim, k)), real(victim, *a, **k))[1])
    expected = {"ce": ("ce", "uniform"), "nmse": ("ce", "uniform"), "trades": ("kl", "normal"),
                "mart": ("ce", "normal")}
    for loss, (objective, start) in expected.items():
        calls.clear()
        x_adv = tv.ap_attack(model, x, y, step_args(loss=loss, pgd_steps=2), progress=1.0)
        ((victim, kwargs),) = calls
        assert (kwargs["loss"], kwargs["random_start"]) == (objective, start), loss
        assert victim == model.forward and hook_count(model) == 0  # ARD's hooks: on during the attack, then gone
        assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    calls.clear()
    tv.ap_attack(model, x, y, step_args(), progress=4.0)  # after the warm-up: no hooks, the model's own call
    assert calls[0][0] is model and calls[0][1]["delta_mask"] is None


def test_training_step_after_the_attack_has_complete_gradients(tmp_path, monkeypatch):
    """One real training step per loss, ARD at p = 0.99 in its attack: when the loss is backpropagated the hooks are
    gone and every parameter, the attention branches' included, has a gradient."""
    seen, models, complete = [], [], []
    real_drop, real_clip = tv.attention_gradient_drop, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(tv, "attention_gradient_drop", lambda m, p: (seen.append(p), models.append(m),
                                                                     real_drop(m, p))[2])

    def clip(parameters, max_norm):  # called between loss.backward() and optimizer.step()
        parameters, model = list(parameters), models[-1]
        complete.append(model.training and hook_count(model) == 0 and len(parameters) == len(list(model.parameters()))
                        and all(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters))
        return real_clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    for loss in tv.LOSSES:
        tv.main([*TINY_VIT, "--epochs", "1", "--train-size", "32", "--eval-size", "8", "--ard", "--ap-warmup-epochs",
                 "100", "--loss", loss, "--out-dir", str(tmp_path / loss)])
    assert complete == [True] * len(tv.LOSSES)
    assert seen == [pytest.approx(1 - 1 / 100)] * len(tv.LOSSES)  # p(t) = 1 - t/warmup at the step's end, t = 1
    assert tv.ap_strength(4.0, 4) == 0 == tv.ap_strength(7.5, 4) and tv.ap_strength(1, 4) == 0.75


# ------------------------------------------------------------------------------------------ PRM


def test_patch_mask_zeroes_whole_patches_in_the_right_number():
    for fraction, expected in ((1.0, 64), (0.75, 48), (0.3, 19), (0.01, 0)):
        mask = tv.patch_mask((32, 32), 4, fraction, "cpu")
        if expected == 0:
            assert mask is None
            continue
        patches = mask.view(8, 4, 8, 4).permute(0, 2, 1, 3).reshape(64, 16)
        assert ((patches == 0).all(1) | (patches == 1).all(1)).all()  # whole patches only
        assert int((patches[:, 0] == 0).sum()) == expected


def test_prm_masks_delta_before_every_forward_and_keeps_it_in_the_ball(monkeypatch):
    model = tiny_vit().eval()
    x, y = batch()
    inputs, masks = [], []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda inp: (inputs.append(inp.detach().clone()), real_forward(inp))[1])
    real_mask = tv.patch_mask
    monkeypatch.setattr(tv, "patch_mask", lambda *a: (masks.append(real_mask(*a)), masks[-1])[1])
    args = step_args(loss="ce", pgd_steps=4, ard=False)
    x_adv = tv.ap_attack(model, x, y, args, progress=1.0)  # fraction 1 - 1/4
    assert len(inputs) == 4  # one forward per attack step
    assert len(masks) == 4 and len({tuple(m.flatten().tolist()) for m in masks}) == 4  # redrawn every step
    eps = 8 / 255
    for k, (inp, mask) in enumerate(zip(inputs, masks)):
        delta = inp - x
        zero = (mask == 0).expand_as(delta)
        assert int((mask.view(8, 4, 8, 4)[:, 0, :, 0] == 0).sum()) == 48
        assert (delta[zero] == 0).all(), k  # exactly zero on the masked patches, for every image and channel
        if k == 0:  # the uniform start is nonzero everywhere else
            assert (delta[~zero] != 0).all()
        assert delta.abs().max() <= eps + 1e-6 and inp.min() >= 0 and inp.max() <= 1
    # the returned x' (its last update, not masked again, as Mo et al.) stays in the ball and in [0, 1]
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert ((x_adv - x) != 0).any() and not torch.equal(x_adv, inputs[-1])
    # after the warm-up there is no mask
    masks.clear()
    tv.ap_attack(model, x, y, args, progress=4.0)
    assert masks == []


# ------------------------------------------------------------------------------------------ shared definitions


def test_losses_attack_and_interpolation_match_train_piat():
    gen = torch.Generator().manual_seed(0)
    adv, clean, y = torch.randn(16, 10, generator=gen), torch.randn(16, 10, generator=gen), torch.arange(16) % 10
    assert torch.equal(tv.nmse_loss(adv, clean, y), tp.nmse_loss(adv, clean, y))
    assert torch.equal(tv.trades_kl(adv, clean), tp.trades_kl(adv, clean))
    assert torch.equal(tv.mart_loss(adv, clean, y, 6.0), tp.mart_loss(adv, clean, y, 6.0))
    assert [tv.piat_alpha(t) for t in (0, 10, 100)] == [tp.piat_alpha(t) for t in (0, 10, 100)]
    model = tiny_vit().eval()
    x, yb = batch()
    for loss, start in (("ce", "uniform"), ("kl", "normal")):
        torch.manual_seed(1)
        a = tv.pgd_attack(model, x, yb, 8 / 255, 2 / 255, 2, loss, start)
        torch.manual_seed(1)
        b = tp.pgd_attack(model, x, yb, 8 / 255, 2 / 255, 2, loss, start)
        assert torch.equal(a, b)
    other, prev = tiny_vit(1), tiny_vit(2).state_dict()
    copy = tiny_vit(1)
    tv.interpolate_(other, prev, 0.3)
    tp.interpolate_(copy, prev, 0.3)
    for k, v in other.state_dict().items():
        assert torch.equal(v, copy.state_dict()[k])


def test_lr_schedule_and_defaults():
    args = tv.parse_args(["--no-pretrained"])
    assert (args.epochs, args.lr, args.weight_decay, args.momentum, args.grad_clip, args.batch_size) == (
        40, 0.1, 1e-4, 0.9, 1.0, 64)
    assert args.lr_milestones == [36, 38] and args.ap_warmup_epochs == 10 and args.model == "vit_base_patch16_224"
    assert (args.loss, args.lam, args.piat, args.ard, args.prm) == ("ce", 0.0, True, False, False)
    assert tv.parse_args(["--loss", "nmse"]).lam == 4.0
    assert tv.parse_args(["--epochs", "20"]).lr_milestones == [18.5, 19.5]
    assert tv.parse_args(["--epochs", "20"]).ap_warmup_epochs == 5
    lrs = [tv.step_lr_at(t, 0.1, [36, 38]) for t in (0, 34.99, 35, 36.99, 37, 39.9)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])  # epochs 1-35, 36-37, 38-40
    assert tv.parse_args([]).pretrained_weights == "vit_base_patch16_224.orig_in21k_ft_in1k"  # Mo et al.'s ViT-B
    assert tv.parse_args(["--model", "convit_base"]).pretrained_weights == "convit_base.fb_in1k"
    assert tv.parse_args(["--model", "deit_small_patch16_224.fb_in22k_ft_in1k"]).pretrained_weights == \
        "deit_small_patch16_224.fb_in22k_ft_in1k"  # NAME.TAG picks other weights
    assert tv.parse_args(["--no-pretrained"]).pretrained_weights is None
    assert tv.parse_args(["--pretrained-file", "w.pth"]).pretrained_weights == "w.pth"
    # the Table IV row label evaluate.py shows
    assert utils.method_name(tv.parse_args(["--model", "deit_small_patch16_224", "--loss", "trades", "--ard",
                                            "--prm"]), tv.SCRIPT) == "deit_small_patch16_224: PIAT + TRADES + A&P"
    assert utils.method_name(tv.parse_args(["--no-piat", "--prm"]), tv.SCRIPT) == "vit_base_patch16_224: PGD-AT + PRM"


# ------------------------------------------------------------------------------------------ 32x32 adaptation


def test_pooled_patch_kernel_on_the_small_image_equals_the_original_on_the_upsampled_one():
    gen = torch.Generator().manual_seed(0)
    kernel = torch.randn(8, 3, 16, 16, generator=gen)  # any kernel: the image is constant on 4x4 blocks
    small = torch.rand(2, 3, 32, 32, generator=gen)
    big = small.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 128x128
    pooled = tv.pool_patch_kernel(kernel, 4)
    assert pooled.shape == (8, 3, 4, 4)
    torch.testing.assert_close(F.conv2d(small, pooled, stride=4), F.conv2d(big, kernel, stride=16),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled.sum(dim=(2, 3)), kernel.sum(dim=(2, 3)), rtol=1e-5, atol=1e-4)
    odd = tv.pool_patch_kernel(kernel, 5)  # sizes that do not divide: split by overlap, the sum kept
    assert odd.shape == (8, 3, 5, 5)
    torch.testing.assert_close(odd.sum(dim=(2, 3)), kernel.sum(dim=(2, 3)), rtol=1e-5, atol=1e-4)
    flat = tv.pool_patch_kernel(torch.ones(1, 1, 16, 16), 5)
    torch.testing.assert_close(flat, torch.full((1, 1, 5, 5), 16 * 16 / 25))  # a flat kernel stays flat


@pytest.mark.parametrize("name,kwargs,prefix,suffix", [
    ("vit_tiny_patch16_224", TINY_KWARGS, 1, ".safetensors"),  # a class token in pos_embed (ViT, DeiT)
    ("convit_tiny", {"depth": 2, "embed_dim": 8, "num_heads": 2, "local_up_to_layer": 1}, 0, ".pth"),  # none
])
def test_adapt_pretrained_state_of_a_224_model(tmp_path, name, kwargs, prefix, suffix):
    import timm

    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False, **kwargs).state_dict()  # the "pretrained" 224x224 model
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.items()}, path)
    loaded = tv.pretrained_state(name, kwargs, str(path))  # --pretrained-file goes through timm's loader
    assert all(torch.equal(loaded[k], v) for k, v in source.items())
    target = utils.build_model(name, 10, img_size=32, patch_size=4, **kwargs).net
    own = {k: v.clone() for k, v in target.state_dict().items()}
    adapted = tv.adapt_pretrained_state(loaded, target)
    target.load_state_dict(adapted)  # strict: every key, every shape
    assert source["pos_embed"].shape[1] == prefix + 196 and adapted["pos_embed"].shape[1] == prefix + 64
    assert torch.equal(adapted["pos_embed"][:, :prefix], source["pos_embed"][:, :prefix])  # class token kept
    grid = source["pos_embed"][0, prefix:].reshape(14, 14, -1).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    expected = expected[0].permute(1, 2, 0).reshape(64, -1)
    torch.testing.assert_close(adapted["pos_embed"][0, prefix:], expected)
    pooled = tv.pool_patch_kernel(source["patch_embed.proj.weight"], 4)
    torch.testing.assert_close(adapted["patch_embed.proj.weight"], pooled)
    for key in ("head.weight", "head.bias"):  # a new head, as the 32x32 model initialised it
        assert torch.equal(adapted[key], own[key]) and source[key].shape[0] == 1000
    for key, value in adapted.items():  # everything else copied unchanged
        if key not in ("pos_embed", "patch_embed.proj.weight", "head.weight", "head.bias"):
            assert torch.equal(value, source[key]), key
    with torch.no_grad():
        assert target(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_a_run_starts_from_the_adapted_pretrained_file(tmp_path):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_KWARGS).state_dict()
    torch.save(source, tmp_path / "weights.pth")
    flags = [arg for arg in TINY_VIT if arg != "--no-pretrained"]
    args = tv.parse_args([*flags, "--pretrained-file", str(tmp_path / "weights.pth"), "--img-size", "32"])
    data = utils.load_dataset("synthetic", None)
    model, model_kwargs = tv.build_vit(args, data, pretrained=True)
    assert model_kwargs == {"img_size": 32, "patch_size": 4, **TINY_KWARGS}
    adapted = tv.adapt_pretrained_state(source, model.net)
    assert all(torch.equal(v, adapted[k]) for k, v in model.net.state_dict().items())


# ------------------------------------------------------------------------------------------ end to end


def test_one_epoch_with_ard_prm_piat_writes_every_output_and_evaluate_reads_it(tmp_path, root, monkeypatch):
    probed = stub_bf16_probe(monkeypatch, tmp_path, 0.5)
    out = tmp_path / "run"
    tv.main([*TINY_VIT, "--epochs", "1", "--ard", "--prm", "--piat", "--out-dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    (row,) = read_metrics(out / "metrics.csv")
    # train_piat.py's columns, without those of its weight averages
    assert list(row) == tv.METRIC_FIELDS == [c for c in tp.METRIC_FIELDS if not c.startswith("raw_") and
                                             c != "fawa_updated"]
    assert row["alpha"] == pytest.approx(0.1) and 0 <= row["test_pgd20_acc"] <= row["test_clean_acc"] <= 1
    args = json.loads((out / "args.json").read_text())
    assert args["ard"] and args["prm"] and args["piat"] and args["model_kwargs"] == TINY_KWARGS
    assert args["amp"] is False  # the default, measured on the ViT's own input (NCHW, as it trains) before args.json
    assert [tuple(x.shape) for x in probed] == [(utils.PROBE_IMAGES, 3, 32, 32)] and probed[0].is_contiguous()
    assert utils.method_name(args, tv.SCRIPT) == "vit_tiny_patch16_224: PIAT + A&P"
    assert args["pretrained_weights"] is None
    final = utils.load_checkpoint(out / "final.pt")
    assert final["script"] == "train_vit.py" and final["arch"] == "vit_tiny_patch16_224" and "resume" in final
    assert final["model_kwargs"] == {"img_size": 32, "patch_size": 4, **TINY_KWARGS}
    model = utils.build_model(final["arch"], final["num_classes"], final["mean"], final["std"], **final["model_kwargs"])
    model.load_state_dict(final["model"])
    data = utils.load_dataset("synthetic", None)
    idx = utils.fixed_subset(len(data.x_test), 32)
    with torch.no_grad():
        correct = model.eval()(utils.to_float(data.x_test[idx])).argmax(1) == data.y_test[idx]
    assert correct.float().mean().item() == pytest.approx(row["test_clean_acc"], abs=1e-6)
    assert final["per_image"]["indices"] == idx.tolist() and final["per_image"]["clean"] == correct.tolist()
    assert sum(final["per_image"]["pgd20"]) == round(32 * row["test_pgd20_acc"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = run_script(root / "evaluate.py", out, "--attacks", "clean,pgd20", "--n-examples", "16", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "eval.json").read_text())["results"]
    got = {(r["role"], r["attack"]): r["accuracy"] for r in results}
    assert set(got) == {(role, attack) for role in ("best", "final") for attack in ("clean", "pgd20")}
    assert all(0 <= got[(role, "pgd20")] <= got[(role, "clean")] <= 1 for role in ("best", "final"))
    assert {r["method"] for r in results} == {"vit_tiny_patch16_224: PIAT + A&P"}  # the Table IV row label


def test_interrupted_run_resumes_to_the_same_final_weights(tmp_path, monkeypatch):
    flags = [*TINY_VIT, "--epochs", "2", "--ard", "--prm", "--ap-warmup-epochs", "2", "--loss", "trades", "--no-amp"]
    whole = tmp_path / "whole"
    tv.main([*flags, "--out-dir", str(whole)])

    class Crash(Exception):
        pass

    real = utils.save_epoch

    def save_then_crash(*args, **kwargs):  # the process dies right after epoch 1's checkpoint and log row
        real(*args, **kwargs)
        raise Crash

    killed = tmp_path / "killed"
    monkeypatch.setattr(utils, "save_epoch", save_then_crash)
    with pytest.raises(Crash):
        tv.main([*flags, "--out-dir", str(killed)])
    monkeypatch.undo()
    assert utils.load_checkpoint(killed / "final.pt")["epoch"] == 1
    torch.manual_seed(123)  # resuming must not depend on the state of the process
    tv.main(["--resume", str(killed)])
    a, b = utils.load_checkpoint(whole / "final.pt"), utils.load_checkpoint(killed / "final.pt")
    assert b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [r["train_loss"] for r in read_metrics(whole / "metrics.csv")] == \
        [r["train_loss"] for r in read_metrics(killed / "metrics.csv")]


def test_amp_runs_the_attack_and_training_in_bf16_and_the_losses_in_fp32(tmp_path, monkeypatch):
    attack, losses, checked = [], [], []
    real_attack, real_nmse, real_check = tv.ap_attack, tv.nmse_loss, utils.check_finite

    def spy_attack(*args, **kwargs):
        attack.append(torch.is_autocast_enabled("cpu"))
        return real_attack(*args, **kwargs)

    def spy_nmse(logits_adv, logits_clean, y):
        losses.append((torch.is_autocast_enabled("cpu"), logits_adv.dtype, logits_clean.dtype))
        return real_nmse(logits_adv, logits_clean, y)

    def spy_check(epoch, step, **values):
        checked.append(values["training_loss"].dtype)
        return real_check(epoch, step, **values)

    monkeypatch.setattr(tv, "ap_attack", spy_attack)
    monkeypatch.setattr(tv, "nmse_loss", spy_nmse)
    monkeypatch.setattr(utils, "check_finite", spy_check)
    out = tmp_path / "run"
    tv.main([*TINY_VIT, "--epochs", "1", "--amp", "--ard", "--prm", "--loss", "nmse", "--out-dir", str(out)])
    assert attack == [True, True]  # two steps, each attacked under autocast
    assert losses == [(True, torch.float32, torch.float32)] * 2 and checked == [torch.float32] * 2
    row = read_metrics(out / "metrics.csv")[0]
    assert 0 < row["train_loss"] < 20 and utils.load_checkpoint(out / "final.pt")["args"]["amp"] is True


def test_torchrun_two_gloo_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", tv.__file__,
               *TINY_VIT, "--epochs", "1", "--ard", "--prm", "--eval-size", "33", "--out-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("weights: identical on all 2 ranks") == 1
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    (row,) = read_metrics(out / "metrics.csv")
    assert abs(row["test_clean_acc"] * 33 - round(row["test_clean_acc"] * 33)) < 1e-3  # counts summed over ranks


# ------------------------------------------------------------------------------------------ bad input


def test_no_network_gives_one_line_naming_the_way_out(tmp_path):
    proxy = "http://127.0.0.1:9"
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "https_proxy": proxy, "HTTPS_PROXY": proxy,
               "http_proxy": proxy, "HTTP_PROXY": proxy}
    result = run_script(tv.__file__, "--dataset", "synthetic", "--model", "vit_tiny_patch16_224", "--model-kwargs",
                        json.dumps(TINY_KWARGS), "--out-dir", tmp_path / "out", env=offline)
    line = one_line_error(result, "train_vit.py")
    assert "vit_tiny_patch16_224" in line and "could not be downloaded" in line
    assert "--pretrained-file PATH" in line and "--no-pretrained" in line and result.returncode == 1
    assert not (tmp_path / "out").exists()  # nothing written, nothing trained from scratch


@pytest.mark.parametrize("flags,status,message", [
    (["--model", "no_such_vit"], 2, "--model no_such_vit: timm has no model 'no_such_vit'"),
    (["--model-kwargs", "{depth: 2}"], 2, "--model-kwargs is not JSON"),
    (["--model-kwargs", '{"patch_size": 2}'], 2, "--model-kwargs must be a JSON object without img_size"),
    (["--pretrained-file", "w.pth"], 2, "--pretrained-file and --no-pretrained contradict each other"),
    (["--no-piat", "--alpha-fixed", "0.9"], 2, "--alpha-fixed needs --piat"),
    (["--patch-size", "5"], 1, "--patch-size 5 does not divide --img-size 32"),
    (["--img-size", "64"], 1, "--img-size 64 but the synthetic images are 32x32"),
    (["--pretrained-file", "missing.pth", "--pretrained"], 1, "--pretrained-file missing.pth: no such file"),
])
def test_bad_flags_stop_before_any_work(tmp_path, capsys, flags, status, message):
    argv = [*TINY_VIT, "--out-dir", str(tmp_path / "out"), *flags]
    if status == 2:  # refused by parse_args: one line, exit status 2
        with pytest.raises(SystemExit) as stopped:
            tv.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    else:  # refused once the data is there, before the run folder: a UserError (one line, exit status 1)
        with pytest.raises(utils.UserError, match=re.escape(message)):
            tv.main(argv)
    assert not (tmp_path / "out").exists()


def test_script_runs_when_copied_alone_with_utils_into_an_empty_folder(tmp_path, root):
    for name in ("train_vit.py", "utils.py"):
        shutil.copy(root / name, tmp_path / name)
    result = run_script(tmp_path / "train_vit.py", *TINY_VIT, "--epochs", "1", "--train-size", "32", "--prm",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("synthetic__train_vit__0__") and sorted(p.name for p in run_dir.iterdir()) == OUTPUTS
