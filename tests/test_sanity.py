"""evaluate.py --sanity (sanity.py): honest models (an adversarially trained small-cnn, the same behind an identity
wrapper, a foreign ResNet-18) pass; planted faults (a zero-gradient input step, saturating logits, a random forward
pass, softmax outputs, BatchNorm in training mode, adversarial examples outside the eps ball, partial gradient
masking: detached low-pass, checkerboard and colour-channel paths, replaced backward passes, random preprocessing) are
caught, each by the check meant for it; the statistics behind WARN and FAIL; the command line end to end. Synthetic
images, a narrow small-cnn, small n and attack budgets (about two minutes)."""

import copy
import json
import re
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate as ev
import sanity
import utils
from conftest import adversarially_trained_small_cnn, run_script

# Small budgets (the defaults: sweep 0..64, PGD-100 x 3 restarts, Square 1000 queries)
SMALL = sanity.SanitySettings(epsilons=(0.0, 4.0, 8.0, 32.0), long_steps=40, restarts=1, square_queries=100,
                          batch_size=128)
SMALL_FLAGS = ["--sanity-epsilons", "0,4,8,32", "--sanity-steps", "40", "--sanity-restarts", "1",
               "--sanity-square-queries", "100", "--batch-size", "128", "--device", "cpu"]
CHECKS = ["eval-mode", "deterministic", "logits", "gradients", "zero-coordinates", "finite-difference",
          "eps0-equals-clean", "eps-monotone", "large-eps-zero", "more-steps-restarts", "fgsm-vs-pgd", "margin-vs-ce",
          "square-vs-white-box", "robust-within-clean", "valid-examples", "worst-case-reported"]


def checkpoint(model, data):
    """A checkpoint in train_piat.py's format (PGD-AT, small-cnn of width 8)."""
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "arch": "small-cnn",
            "model_kwargs": {"width": 8}, "num_classes": 10, "mean": data.mean, "std": data.std,
            "image_shape": data.image_shape, "metrics": [], "epoch": 3, "script": "train_piat.py",
            "args": {"dataset": "synthetic", "data_dir": "./data", "image_size": None, "loss": "ce", "piat": False}}


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """(model, run folder): a small-cnn (width 8) adversarially trained for 3 epochs (PGD-AT, PGD-2 at 8/255) on
    2,000 synthetic images, about 45 % clean and 18 % PGD-20 accuracy; the run folder holds it as best.pt and
    final.pt (identical weights). About 20 s."""
    model, data = adversarially_trained_small_cnn(8 / 255, 5 / 255)
    run = tmp_path_factory.mktemp("pgdat")
    for name in ("best.pt", "final.pt"):
        utils.save_checkpoint(checkpoint(model, data), run / name)
    return model, run


@pytest.fixture(scope="module")
def images():
    """The 96 synthetic test images evaluate.py takes with --n-examples 96."""
    data = utils.load_dataset("synthetic", None)
    idx = utils.fixed_subset(len(data.x_test), 96).sort().values
    return utils.to_float(data.x_test[idx]), data.y_test[idx]


@pytest.fixture(scope="module")
def resnet():
    """A foreign ResNet-18: pyautoattack's published example model (CIFAR-10) when it ships one, else this project's
    ResNet-18 trained for 30 steps on synthetic images."""
    spec = find_spec("pyautoattack")
    path = Path(spec.origin).parent / "examples" / "model_test.pt" if spec else None
    if path is not None and path.is_file():
        return ev.load_model(path, ev.parse_args([str(path), "--arch", "resnet18"]))[0].eval()
    utils.seed_everything(0)
    data = utils.load_dataset("synthetic", None)
    model = utils.build_model("resnet18", 10, data.mean, data.std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(0, 30 * 32, 32):
        loss = F.cross_entropy(model(utils.to_float(data.x_train[i : i + 32])), data.y_train[i : i + 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def honest_results(honest, images):
    """The checklist on the honest model through its one entry point, sanity.run_sanity_checks (and a check that it
    leaves the model as it was)."""
    model, _ = honest
    weights = utils.state_fingerprint(model)
    results = sanity.run_sanity_checks(model, *images, SMALL)
    assert utils.state_fingerprint(model) == weights
    return by_name(results)


def by_name(results):
    assert [r["name"] for r in results] == CHECKS
    return {r["name"]: r for r in results}


class Wrapped(nn.Module):
    """The honest model behind one planted fault: outputs = after(model(before(x)))."""

    def __init__(self, model, before=lambda x: x, after=lambda z: z):
        super().__init__()
        self.model, self.before, self.after = model, before, after

    def forward(self, x):
        return self.after(self.model(self.before(x)))


def test_honest_model_passes_every_check(honest_results):
    results = honest_results
    assert {name: r["status"] for name, r in results.items()} == dict.fromkeys(CHECKS, "PASS")
    # the numbers behind the PASSes: a model worth checking, attacks that work, a sweep from clean to 0
    sweep = results["eps-monotone"]["numbers"]
    assert sweep["epsilons"] == [0.0, 4.0, 8.0, 32.0] and sweep["n"] == 96
    clean, eps4, eps8, eps32 = sweep["accuracy"]
    assert clean >= 0.35 and clean - 0.1 > eps4 > eps8 >= 0.08 and eps32 == 0.0
    assert results["eps0-equals-clean"]["numbers"]["eps0"] == clean
    strength = results["more-steps-restarts"]["numbers"]
    assert strength["pgd20"] == eps8 and 0 <= strength["gap"] <= 0.05 and len(strength["restarts"]) == 1
    assert results["fgsm-vs-pgd"]["numbers"]["fgsm"] >= eps8 - 0.02
    loss = results["margin-vs-ce"]["numbers"]
    assert loss["ce"] == eps8 and loss["cw"] < loss["ce"] and loss["gap"] <= 0.1
    assert 0 < results["worst-case-reported"]["numbers"]["worst_case"] <= loss["both"]
    gradients = results["gradients"]["numbers"]
    assert gradients["zero_ce"] == gradients["zero_margin"] == gradients["nonfinite"] == 0
    valid = results["valid-examples"]["numbers"]
    assert valid["examples"] > 4 * 96 and valid["attacks"]["pgd20"]["max_distance"] == pytest.approx(8, abs=1e-3)
    assert sorted(valid["attacks"]) == sorted(["pgd20", "cw20", "fgsm", "eps0", "pgd20@4", "pgd20@32", "pgd40#1",
                                               "square"])
    assert valid["attacks"]["square"]["attacked"] == round(96 * results["square-vs-white-box"]["numbers"]["white_box"])
    assert json.loads(json.dumps(list(results.values()))) == list(results.values())  # JSON as it is


def test_zero_gradient_input_step_fails_the_gradient_check(honest, images):
    """(a) Input quantisation to the 8-bit grid: torch.round has a zero gradient, so PGD never moves."""
    model, _ = honest
    x, y = images
    quantised = Wrapped(model, before=lambda x: torch.round(x * 255) / 255)
    results = by_name(sanity.run_sanity_checks(quantised, x, y, SMALL))
    assert results["gradients"]["status"] == "FAIL"
    assert results["gradients"]["numbers"]["zero_ce"] == results["gradients"]["numbers"]["zero_margin"] == 1.0
    assert "non-differentiable" in results["gradients"]["meaning"]
    # the masking shows from outside too: a plateau at 32/255, and the gradient-free Square succeeds
    assert results["large-eps-zero"]["status"] == results["square-vs-white-box"]["status"] == "FAIL"
    assert results["deterministic"]["status"] == results["logits"]["status"] == "PASS"


def test_saturating_logits_fail_the_loss_check(honest, images, honest_results):
    """(b) Logits times 1e4: softmax saturates, cross-entropy gradients are exactly 0 on correct examples, while
    the margin loss (scale-free under sign gradients) attacks as well as on the honest model."""
    model, _ = honest
    x, y = images
    results = by_name(sanity.run_sanity_checks(Wrapped(model, after=lambda z: 1e4 * z), x, y, SMALL))
    loss = results["margin-vs-ce"]
    assert loss["status"] == "FAIL", loss["detail"]
    assert loss["numbers"]["ce"] - loss["numbers"]["cw"] >= 0.2
    assert loss["numbers"]["cw"] == pytest.approx(honest_results["margin-vs-ce"]["numbers"]["cw"], abs=0.03)
    gradients = results["gradients"]["numbers"]
    assert gradients["zero_ce"] >= 0.3 and gradients["zero_margin"] == 0  # CE alone: the softmax saturates
    assert results["logits"]["status"] == results["square-vs-white-box"]["status"] == "PASS"
    # the gradient probe works on the margin: its derivative is right, however large the logits
    assert results["zero-coordinates"]["status"] == results["finite-difference"]["status"] == "PASS"


def test_random_forward_fails_the_determinism_check_and_gets_eot(honest, images, tmp_path):
    """(c) A model random at evaluation time: Gaussian noise (sd 0.03) on its input, a randomised defence. The
    checklist attacks it with EOT-PGD-20 too (on the examples correct when clean) and reports it beside PGD-20 and
    CW-20; the gradient probe, which holds the draws fixed, finds nothing to blame on the gradient."""
    model, _ = honest
    x, y = images
    results = by_name(sanity.run_sanity_checks(Wrapped(model, before=lambda x: x + 0.03 * torch.randn_like(x)), x, y,
                                               SMALL))
    deterministic = results["deterministic"]
    assert deterministic["status"] == "FAIL" and deterministic["numbers"]["difference"] > 1e-3
    assert "EOT" in deterministic["meaning"] and "--aa-version rand" in deterministic["meaning"]
    assert results["eval-mode"]["status"] == "PASS"  # noise is not mistaken for batch statistics
    assert results["zero-coordinates"]["status"] == results["finite-difference"]["status"] == "PASS"
    eot = results["valid-examples"]["numbers"]["attacks"]["eot-pgd"]
    clean = results["eps-monotone"]["numbers"]["accuracy"][0]
    assert eot["attacked"] == round(96 * clean) and eot["max_distance"] == pytest.approx(8, abs=1e-3)
    worst = results["worst-case-reported"]["numbers"]
    assert worst["eot_pgd"] == eot["accuracy"] < clean and worst["worst_case"] <= worst["eot_pgd"]
    assert "EOT-PGD-20 (8 draws)" in results["worst-case-reported"]["detail"]
    sanity.plot_sanity(list(results.values()), tmp_path / "random.png", "EOT-PGD-20 in the figure")
    assert (tmp_path / "random.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eot_pgd_with_one_draw_is_pgd(honest, images):
    """EOT-PGD follows the logits averaged over draws; with one draw of a deterministic model it is PGD, bit for
    bit; without autograd (the prediction that is counted) it is one pass of the model."""
    model, _ = honest
    x, y = images[0][:16], images[1][:16]
    eot = ev.pgd_attack(ev.ExpectedLogits(model, 1), x, y, 8 / 255, 2 / 255, 5,
                        generator=torch.Generator().manual_seed(1))
    pgd = ev.pgd_attack(model, x, y, 8 / 255, 2 / 255, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(eot, pgd) and not torch.equal(eot, x)
    calls = []
    counting = lambda z: calls.append(1) or model(z)  # noqa: E731
    ev.pgd_attack(ev.ExpectedLogits(counting, 3), x, y, 8 / 255, 2 / 255, 5)
    assert len(calls) == 3 * 5  # three draws at every step
    with torch.no_grad():
        ev.ExpectedLogits(counting, 3)(x)
    assert len(calls) == 3 * 5 + 1


# === Partial gradient masking: the gradient probe (autograd against finite differences, per image and coordinate)


def gradient_checks(model, x, y, settings=SMALL):
    """The checks of the model and its gradients, without the attacks: {name: result}."""
    model.eval()
    results = [sanity.check_eval_mode(model, x, settings), sanity.check_deterministic(model, x, settings),
               sanity.check_gradients(model, x, y, settings),
               *sanity.check_probe(sanity.gradient_probe(model, x, y, settings))]
    return {r["name"]: r for r in results}


def blur(x):
    """A 5x5 box blur."""
    return F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)


def checkerboard_detached(x):
    mask = torch.zeros_like(x[:1])
    mask[..., ::2, ::2] = mask[..., 1::2, 1::2] = 1
    return mask * x + (1 - mask) * x.detach()


def random_resize(x):
    """Resize to a random size in 28..36 and back (bilinear), a randomised input transform."""
    size = int(torch.randint(28, 37, ()))
    return F.interpolate(F.interpolate(x, size=size, mode="bilinear"), size=x.shape[-2:], mode="bilinear")


# Each planted fault computes the honest model's function, or nearly, with a wrong or partly missing gradient (or a
# random one), and the checks that must flag it. PGD on such a model overstates robustness.
FAULTS = {
    "low-pass detached": (lambda x: blur(x).detach() + (x - blur(x)), {"finite-difference"}),
    "checkerboard detached": (checkerboard_detached, {"zero-coordinates", "finite-difference"}),
    "two channels detached": (lambda x: torch.cat([x[:, :1], x[:, 1:].detach()], 1),
                              {"zero-coordinates", "finite-difference"}),
    "quantised": (lambda x: torch.round(x * 255) / 255, {"gradients", "zero-coordinates"}),
    "straight-through quantiser": (lambda x: x + (torch.round(x * 15) / 15 - x).detach(), {"finite-difference"}),
    "blur, identity backward": (lambda x: x + (blur(x) - x).detach(), {"finite-difference"}),
    "gamma 2, identity backward": (lambda x: x + (x**2 - x).detach(), {"finite-difference"}),
    "random noise": (lambda x: x + 0.03 * torch.randn_like(x), {"deterministic"}),
    "random shift": (lambda x: torch.roll(x, torch.randint(-2, 3, (2,)).tolist(), (2, 3)), {"deterministic"}),
    "random resize": (random_resize, {"deterministic"}),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_partial_gradient_masking_is_flagged(honest, images, fault):
    """Every planted fault draws a WARN or FAIL from exactly the checks meant for it, whose meaning names the
    attack that breaks it: BPDA (straight-through) for a detached or replaced gradient, EOT for randomness. A random
    model is probed one draw at a time: its gradient is right, its randomness the determinism check's."""
    model, _ = honest
    before, flagged = FAULTS[fault]
    results = gradient_checks(Wrapped(model, before=before), *images)
    assert {name for name, r in results.items() if r["status"] != "PASS"} == flagged, \
        {name: r["detail"] for name, r in results.items()}
    for name in flagged:
        assert ("EOT" if name == "deterministic" else "BPDA") in results[name]["meaning"]
    zero, fd = results["zero-coordinates"]["numbers"], results["finite-difference"]["numbers"]
    assert zero["n"] == fd["n"] == 96 and fd["precision"] == "float64"
    if "finite-difference" in flagged:
        assert fd["flagged"] >= 0.5 and fd["median_error"] > fd["threshold"]
    else:
        assert fd["flagged"] == 0 and fd["max_error"] < 0.01
    expected_zero = {"checkerboard detached": 0.5, "two channels detached": 2 / 3, "quantised": 1.0}.get(fault, 0.0)
    assert zero["zero_share"] == pytest.approx(expected_zero) and zero["flagged"] == (1.0 if expected_zero else 0.0)


def test_honest_models_pass_the_gradient_probe(honest, images, resnet):
    """No false alarm: the trained small-cnn in float64 and in float32 (a model whose float64 copy cannot run falls
    back to float32 and a larger step), under bf16 autocast (probed without it), the same ignoring a 2-pixel border
    (its zero coordinates do not move the output: nothing masked), and a foreign ResNet-18. Honest errors are orders
    of magnitude below the threshold."""
    model, _ = honest
    x, y = images
    kernel = torch.ones(3, 1, 1, 1)  # a float32 identity convolution: the float64 copy raises
    float32 = Wrapped(model, before=lambda x: F.conv2d(x, kernel, groups=3))
    border = Wrapped(model, before=lambda x: F.pad(x[..., 2:-2, 2:-2], (2, 2, 2, 2)))
    candidates = ((model, "float64", 0.0), (float32, "float32", 0.0), (sanity.Bf16Autocast(model), "float64", 0.0),
                  (border, "float64", 1 - 28**2 / 32**2))
    for candidate, precision, zero in candidates:
        results = gradient_checks(candidate, x, y)
        assert all(r["status"] == "PASS" for r in results.values()), {n: r["detail"] for n, r in results.items()}
        fd = results["finite-difference"]["numbers"]
        assert fd["precision"] == precision and fd["flagged"] == results["zero-coordinates"]["numbers"]["flagged"] == 0
        assert fd["max_error"] < (1e-3 if precision == "float64" else 0.2)
        zeros = results["zero-coordinates"]["numbers"]
        assert zeros["zero_share"] == pytest.approx(zero) and zeros["images_with_zeros"] == (1.0 if zero else 0.0)
    results = gradient_checks(resnet, x[:32], y[:32])
    assert all(r["status"] == "PASS" for r in results.values()), {n: r["detail"] for n, r in results.items()}
    assert results["finite-difference"]["numbers"]["max_error"] < 1e-2


class Bf16Inside(Wrapped):
    """A model that computes in bf16 (autocast inside its forward pass, as GPU-trained models are often evaluated),
    its logits returned in float32: the probe cannot use a float64 copy and runs in float32."""

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return super().forward(x).float()


class StraightThrough(nn.Module):
    """The model's function with the gradient of another: forward net(x), backward that of net(blur(x))."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        soft = self.model(blur(x))
        return soft + (self.model(x) - soft).detach()


def test_a_model_computing_in_bf16_or_fp16_passes_and_a_straight_through_estimator_does_not(honest, images):
    """Rounding is not a replaced gradient: a model under bf16 autocast, or with fp16 weights, passes the probe,
    judged at the larger steps at which its finite differences settle, and the line says the check was weaker; a
    straight-through estimator (soft = net(blur(x)); soft + (net(x) - soft).detach()) FAILs in float64, and under bf16
    is flagged on more images than the honest model."""
    model, _ = honest
    x, y = images
    fp16 = Wrapped(copy.deepcopy(model).half(), before=lambda x: x.half(), after=lambda z: z.float())
    flagged = {}
    for candidate in (Bf16Inside(model), fp16):
        results = gradient_checks(candidate, x, y)
        fd = results["finite-difference"]
        assert all(r["status"] == "PASS" for r in results.values()), {n: r["detail"] for n, r in results.items()}
        numbers = fd["numbers"]
        assert numbers["precision"] == "float32" and numbers["judged"] >= 20 and numbers["flagged"] < 0.1, fd["detail"]
        assert sum(k for step, k in numbers["steps"].items() if step != "0.0001") >= numbers["judged"] / 2
        assert fd["detail"].startswith("autograd's directional derivative (CW margin) differs from a central "
                                       "difference (float32, images per step: ")
        assert "judged at larger steps (the model rounds below float32, or kinks): a weaker check" in fd["detail"]
        flagged[type(candidate).__name__] = numbers["flagged"]
    fd = gradient_checks(StraightThrough(model), x, y)["finite-difference"]
    assert fd["status"] == "FAIL" and fd["numbers"]["precision"] == "float64" and fd["numbers"]["flagged"] > 0.5
    assert "judged at larger steps" not in fd["detail"]
    # in bf16 rounding hides most of it (the line says so): still flagged on several times the honest model's share
    fd = gradient_checks(Bf16Inside(StraightThrough(model)), x, y)["finite-difference"]
    assert fd["numbers"]["flagged"] >= max(0.05, 3 * flagged["Bf16Inside"]), (fd["detail"], flagged)


def test_identity_wrapper_changes_nothing(honest, images, honest_results):
    """The trained model behind an identity wrapper: the same function, the same gradient, the same checklist."""
    model, _ = honest
    results = by_name(sanity.run_sanity_checks(Wrapped(model), *images, SMALL))
    assert all(r["status"] == "PASS" for r in results.values())
    for name, r in results.items():
        if name != "valid-examples":  # its numbers hold the seconds each attack took
            assert r["numbers"] == honest_results[name]["numbers"], name


def test_softmax_outputs_fail_the_logits_check(honest, images):
    """(d) A model that returns probabilities."""
    model, _ = honest
    x, y = images
    results = by_name(sanity.run_sanity_checks(Wrapped(model, after=lambda z: F.softmax(z, dim=1)), x, y, SMALL))
    assert results["logits"]["status"] == "FAIL" and results["logits"]["numbers"]["probability_rows"] == 1.0
    assert results["deterministic"]["status"] == results["eval-mode"]["status"] == "PASS"


def test_batchnorm_in_training_mode_fails_the_eval_mode_check(honest, images):
    """A forward that puts the network back into training mode: batch statistics, running statistics updated."""
    model, _ = honest
    x, y = images
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    class TrainsItself(Wrapped):
        def forward(self, x):
            self.model.train()
            return self.model(x)

    faulty = TrainsItself(model)
    try:
        result = sanity.check_eval_mode(faulty, x, SMALL)
    finally:
        model.eval()
    assert result["status"] == "FAIL" and result["numbers"]["batch_dependence"] > 0.05
    numbers = result["numbers"]
    assert numbers["training_modules"] and any("running_mean" in k for k in numbers["changed_buffers"])
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())  # put back as it was


def test_adversarial_examples_outside_the_ball_fail_the_per_example_check(honest, images, monkeypatch):
    """(e) An attack that overshoots: its examples twice as far from x as PGD's, still inside [0, 1]."""
    model, _ = honest
    x, y = images
    real = sanity.pgd_attack

    def overshooting(model, x, *args, **kwargs):
        return (x + 2 * (real(model, x, *args, **kwargs) - x)).clamp(0, 1)

    monkeypatch.setattr(sanity, "pgd_attack", overshooting)
    results = by_name(sanity.run_sanity_checks(model, x, y, SMALL))
    valid = results["valid-examples"]
    assert valid["status"] == "FAIL" and valid["numbers"]["outside_ball"] > 96
    assert valid["numbers"]["outside_box"] == valid["numbers"]["nan"] == 0
    assert valid["numbers"]["attacks"]["pgd20"]["max_distance"] == pytest.approx(16, abs=1e-3)
    # each fault by itself, straight into the per-example test
    x4 = x[:4]
    eps = 8 / 255
    x_adv = (x4 + eps * torch.sign(torch.randn_like(x4))).clamp(0, 1)
    x_adv[0, 0, 0, 0] = x4[0, 0, 0, 0] + 9 / 255 if x4[0, 0, 0, 0] < 0.5 else x4[0, 0, 0, 0] - 9 / 255
    x_adv[1, 1, 2, 3] = -0.01
    x_adv[2, 2, 5, 5] = float("nan")
    with torch.no_grad():
        faults, distance = sanity.perturbation_faults(x4, x_adv, eps, model(x_adv))
    assert faults["outside_ball"].tolist() == [True, True, False, False]  # -0.01 is far outside the ball too
    assert faults["outside_box"].tolist() == [False, True, False, False]
    assert faults["nan"].tolist() == [False, False, True, False]
    assert distance == pytest.approx(x4[1, 1, 2, 3].item() + 0.01, abs=1e-6)  # the largest finite distance


def test_gaps_are_judged_against_their_noise():
    """paired_gap: the mean difference of per-example flags and its standard error; a gap WARNs or FAILs only
    when it exceeds its tolerance by two standard errors, so n decides how large a gap must be."""
    reference = torch.zeros(100, dtype=torch.bool)
    reference[:50] = True
    other = reference.clone()
    other[:10] = False  # 10 of 100 examples fooled in addition
    gap, se = sanity.paired_gap(reference, other)
    assert gap == pytest.approx(0.10) and se == pytest.approx((0.1 * 0.9 / 100) ** 0.5)
    assert sanity.gap_status(gap, se, "more-steps-restarts") == "WARN"  # 10 - 2 * 3 = 4 > 3 points
    assert sanity.gap_status(gap, se, "worst-case-reported") == "PASS"  # 4 points: within what honest tables show
    assert sanity.gap_status(0.30, 0.04, "worst-case-reported") == "FAIL"
    assert sanity.gap_status(0.02, 0.014, "square-vs-white-box") == "PASS"  # 2 points on 100 images: noise
    assert sanity.gap_status(0.02, 0.002, "square-vs-white-box") == "PASS"  # 2 points on 5,000: not above 2
    assert sanity.gap_status(0.04, 0.003, "square-vs-white-box") == "WARN"
    assert sanity.paired_gap(reference, reference) == (0.0, 0.0)


def flags(n, *ranges):
    """A bool tensor of n examples, True on the given index ranges."""
    out = torch.zeros(n, dtype=torch.bool)
    for start, stop in ranges:
        out[start:stop] = True
    return out


def test_margin_gap_is_judged_against_what_the_attacks_fool():
    """The CW-vs-CE gap is bounded by what the two attacks fool together. 500 images, 170 correct when clean:
    when CE fools 5 of them and CW 72 more, the CE attack is blind (a 14-point gap, but 94 % of what was fooled)
    and the check FAILs; when CE fools 110 and CW 20 more (4 points), or CE 70 and CW 40 more (8 points, 36 % of
    the fooled, 25 % after two standard errors), CE does its job and the check passes."""
    n, clean = 500, flags(500, (0, 170))

    def loss_check(ce_robust, cw_robust):
        return sanity.check_loss({"pgd20": {"robust": flags(n, ce_robust)}, "cw20": {"robust": flags(n, cw_robust)}},
                             clean)

    blind = loss_check((5, 170), (0, 98))  # CE-robust: 165 images, CW fools 72 of them
    assert blind["numbers"]["gap"] == pytest.approx(72 / 500) and blind["numbers"]["fooled"] == pytest.approx(77 / 500)
    assert blind["status"] == "FAIL" and blind["numbers"]["margin_only_share"] > 0.5
    honest = loss_check((0, 60), (20, 170))
    assert honest["numbers"]["gap"] == pytest.approx(20 / 500) and honest["status"] == "PASS"
    under_trained = loss_check((0, 100), (40, 170))
    assert under_trained["numbers"]["gap"] == pytest.approx(40 / 500)
    assert under_trained["numbers"]["margin_only_share"] == pytest.approx(0.25, abs=0.01)
    assert under_trained["status"] == "PASS"


def test_command_line_end_to_end(honest, tmp_path, capsys):
    """A run folder with --sanity beside the table's attacks: one line per check and checkpoint, a "sanity" entry
    per checkpoint in eval.json (best.pt checked once: final.pt has the same weights), the results and Table I
    as before, a PNG per checkpoint; the checklist's PGD-20 and CW-20 are the table's, example for example."""
    _, run = honest
    out = ev.main([str(run), "--sanity", "--attacks", "clean,pgd20,cw20", "--n-examples", "64", *SMALL_FLAGS])
    printed = capsys.readouterr().out.splitlines()
    for role in ("best", "final"):
        lines = [line for line in printed if line.startswith(f"  {role:10s} PASS  ")]
        assert [line.split()[2] for line in lines] == CHECKS, printed
    assert "  final      sanity: 16 PASS, 0 WARN, 0 FAIL" in printed
    saved = json.loads((run / "eval.json").read_text())
    assert sorted(saved) == ["landscapes", "results", "sanity", "script", "table"]
    best, final = saved["sanity"]
    assert (best["role"], final["role"]) == ("best", "final") and final["same_weights_as"] == str(run / "best.pt")
    assert best["n"] == 64 and best["counts"] == {"PASS": 16, "WARN": 0, "FAIL": 0} and best["cost_vs_pgd20"] > 1
    assert best["settings"]["square_queries"] == 100 and best["settings"]["epsilons"] == [0, 4, 8, 32]
    assert [c["name"] for c in final["checks"]] == CHECKS and final["checks"] == best["checks"]
    rows = {(r["role"], r["attack"]): r for r in saved["results"]}
    worst = {c["name"]: c["numbers"] for c in best["checks"]}["worst-case-reported"]
    assert worst["pgd20"] == rows["best", "pgd20"]["accuracy"] and worst["cw20"] == rows["best", "cw20"]["accuracy"]
    assert saved["table"][str(run)]["pgd20"]["best"] == worst["pgd20"]
    for role in ("best", "final"):
        png = (run / f"{role}.sanity.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert out["sanity"][0]["png"] == str(run / "best.sanity.png")
    # a plain evaluation afterwards keeps the sanity entries
    ev.main([str(run), "--attacks", "clean", "--n-examples", "16", "--device", "cpu"])
    assert len(json.loads((run / "eval.json").read_text())["sanity"]) == 2


def test_strict_exits_non_zero_on_a_fail(honest, tmp_path):
    """A checkpoint whose last layer is scaled by 1e4 (saturating logits): --sanity reports the FAIL and exits 0,
    --strict exits 1 with one line on stderr; flags that do not fit are refused."""
    model, run = honest
    saturated = utils.load_checkpoint(run / "final.pt")
    for key in ("linear.weight", "linear.bias"):
        saturated["model"][key] = saturated["model"][key] * 1e4
    utils.save_checkpoint(saturated, tmp_path / "saturated.pt")
    script, flags = ev.__file__, ["--sanity", "--n-examples", "96", *SMALL_FLAGS]
    strict = run_script(script, tmp_path / "saturated.pt", *flags, "--strict")
    assert strict.returncode == 1, strict.stderr
    assert re.fullmatch(r"evaluate.py: \d+ sanity checks FAILed \(--strict\)", strict.stderr.strip().splitlines()[-1])
    lines = [line for line in strict.stdout.splitlines() if line.startswith("  checkpoint ")]
    assert len(lines) == len(CHECKS) + 2  # a line per check, the counts, the figure
    assert any(line.split()[1:3] == ["FAIL", "margin-vs-ce"] for line in lines), strict.stdout
    saved = json.loads((tmp_path / "saturated.eval.json").read_text())
    assert saved["sanity"][0]["counts"]["FAIL"] >= 1 and saved["results"] == []
    assert (tmp_path / "saturated.sanity.png").is_file()
    # without --strict the same FAIL leaves the exit status alone: main returns
    lenient = ev.main([str(tmp_path / "saturated.pt"), *flags, "--out", str(tmp_path / "lenient.json")])
    assert lenient["sanity"][0]["counts"] == saved["sanity"][0]["counts"]
    with pytest.raises(utils.UserError, match="--strict goes with --sanity"):
        ev.main([str(run), "--strict"])
    with pytest.raises(utils.UserError, match="must be at least 4x --epsilon"):
        ev.main([str(run), "--sanity", "--sanity-epsilons", "0,4,16"])
    with pytest.raises(SystemExit) as exit_:  # argparse's one line, exit code 2
        ev.main([str(run), "--sanity", "--sanity-epsilons", "0,-4"])
    assert exit_.value.code == 2
