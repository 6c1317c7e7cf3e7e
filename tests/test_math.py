"""The named functions of train_piat.py against the formulas of docs/method.md, computed here directly."""

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train_piat as tp
import utils


@pytest.fixture(scope="module")
def trained_model():
    """A small CNN trained (clean) on the synthetic set until it classifies it well."""
    torch.manual_seed(0)
    data = utils.load_dataset("synthetic", None)
    model = utils.build_model("small-cnn", data.num_classes, data.mean, data.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = utils.to_float(data.x_train[:1024]), data.y_train[:1024]
    model.train()
    for _ in range(4):
        for i in range(0, len(x), 32):
            loss = F.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x_test, y_test = utils.to_float(data.x_test[:128]), data.y_test[:128]
    with torch.no_grad():
        assert (model(x_test).argmax(1) == y_test).float().mean() > 0.8
    return model, x_test, y_test


# ------------------------------------------------------------------------------------------ PGD


@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
@pytest.mark.parametrize("start", ["uniform", "normal", None])
def test_pgd_stays_in_the_ball_and_the_box(trained_model, loss, start):
    model, x, y = trained_model
    x = x[:32].clone()
    x[:, :, :4] = 0.0  # pixels on the box's edges must stay inside it
    x[:, :, -4:] = 1.0
    eps = 8 / 255
    x_adv = tp.pgd_attack(model, x, y[:32], eps, 2 / 255, 5, loss=loss, random_start=start)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0.5 * eps  # it moved


def test_pgd_raises_the_loss_of_a_trained_model(trained_model):
    model, x, y = trained_model
    torch.manual_seed(1)
    x_adv = tp.pgd_attack(model, x, y, 8 / 255, 2 / 255, 10)
    with torch.no_grad():
        clean_loss, adv_loss = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
        noise = (x + torch.empty_like(x).uniform_(-8 / 255, 8 / 255)).clamp(0, 1)
        noise_loss = F.cross_entropy(model(noise), y)
    assert adv_loss > 2 * clean_loss + 0.5
    assert adv_loss > 2 * noise_loss  # not just any perturbation: the gradient's direction matters


def test_pgd_one_step_is_eq3(trained_model):
    """Without a random start, one step is clip_[0,1](clip_ball(x + eta * sign grad_x CE))."""
    model, x, y = trained_model
    x, y = x[:16], y[:16]
    eps, eta = 8 / 255, 3 / 255
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_req), y, reduction="sum"), x_req)
    expected = torch.min(torch.max(x + eta * grad.sign(), x - eps), x + eps).clamp(0, 1)
    got = tp.pgd_attack(model, x, y, eps, eta, 1, random_start=None)
    assert torch.allclose(got, expected, atol=1e-6)


def test_random_starts_come_from_the_generator_given(trained_model):
    """The per-epoch evaluation attacks from a generator of its own: the same seed gives the same x', and the global
    generator is neither used nor moved."""
    model, x, y = trained_model
    before = torch.get_rng_state()
    runs = [tp.pgd_attack(model, x[:8], y[:8], 8 / 255, 2 / 255, 2, generator=torch.Generator().manual_seed(5))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(torch.get_rng_state(), before)


def test_a_model_without_input_gradient_is_left_where_the_start_put_it():
    """A defence whose output ignores the input's gradient (here: detached) gets no step, and no crash."""
    class Detached(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x.detach().mean((1, 2, 3)), -x.detach().mean((1, 2, 3))], 1)

    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    assert torch.equal(tp.pgd_attack(Detached(), x, y, 8 / 255, 2 / 255, 3, random_start=None), x)


def test_cw_attack_raises_the_margin(trained_model):
    model, x, y = trained_model
    x_adv = tp.pgd_attack(model, x, y, 8 / 255, 2 / 255, 10, loss="cw")
    with torch.no_grad():
        assert tp.cw_margin(model(x_adv), y).mean() > tp.cw_margin(model(x), y).mean() + 1.0


def test_cw_margin_formula():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    y = torch.tensor([0, 2])
    assert torch.allclose(tp.cw_margin(logits, y), torch.tensor([2.0 - 3.0, 5.0 - (-1.0)]))


# ------------------------------------------------------------------------------------------ NMSE


def nmse_direct(adv, clean, y):
    total = 0.0
    for i in range(len(y)):
        a = adv[i] / adv[i].norm()
        c = clean[i] / clean[i].norm()
        weight = 1 - torch.softmax(clean[i], 0)[y[i]]
        total += weight * ((a - c) ** 2).sum()
    return total / len(y)


def test_nmse_equals_the_formula():
    torch.manual_seed(0)
    adv, clean, y = torch.randn(7, 10), torch.randn(7, 10), torch.randint(0, 10, (7,))
    assert torch.allclose(tp.nmse_loss(adv, clean, y), nmse_direct(adv, clean, y), atol=1e-6)


def test_nmse_is_zero_for_positive_multiples():
    torch.manual_seed(0)
    clean, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    scale = torch.rand(6, 1) * 5 + 0.1  # a different positive factor per example
    assert tp.nmse_loss(clean * scale, clean, y).abs() < 1e-6
    assert tp.nmse_loss(-clean, clean, y) > 0.5  # a negative multiple is as far as it gets


def test_nmse_weighs_by_clean_vulnerability():
    torch.manual_seed(0)
    adv = torch.randn(2, 5)
    clean = torch.tensor([[8.0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0]])  # confident and correct / uniform
    y = torch.tensor([0, 0])
    per_example = [tp.nmse_loss(adv[i : i + 1], clean[i : i + 1], y[i : i + 1]) for i in range(2)]
    distances = [((F.normalize(adv[i], dim=0) - F.normalize(clean[i], dim=0)) ** 2).sum() for i in range(2)]
    p_y = torch.softmax(clean, 1)[:, 0]
    for i in range(2):
        assert torch.allclose(per_example[i], (1 - p_y[i]) * distances[i], atol=1e-6)
    assert per_example[0] / distances[0] < 0.01 and per_example[1] / distances[1] == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------ baselines


def test_alp_is_the_mean_squared_logit_distance():
    torch.manual_seed(0)
    adv, clean = torch.randn(5, 10), torch.randn(5, 10)
    direct = sum(((adv[i] - clean[i]) ** 2).sum() for i in range(5)) / 5
    assert torch.allclose(tp.alp_loss(adv, clean), direct)


def test_trades_kl_is_batch_mean_kl_clean_to_adv():
    torch.manual_seed(0)
    adv, clean = torch.randn(5, 10), torch.randn(5, 10)
    p, q = torch.softmax(clean, 1), torch.softmax(adv, 1)
    direct = (p * (p.log() - q.log())).sum() / 5
    assert torch.allclose(tp.trades_kl(adv, clean), direct, atol=1e-6)
    assert tp.trades_kl(clean, clean).abs() < 1e-6


def test_mart_loss_matches_its_paper():
    torch.manual_seed(0)
    adv, clean, y, beta = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,)), 6.0
    total = 0.0
    for i in range(6):
        p_adv, p_clean = torch.softmax(adv[i], 0), torch.softmax(clean[i], 0)
        wrong = torch.cat([p_adv[: y[i]], p_adv[y[i] + 1 :]]).max()
        bce = -torch.log(p_adv[y[i]]) - torch.log(1.0001 - wrong + 1e-12)
        kl = (p_clean * (torch.log(p_clean + 1e-12) - torch.log(p_adv + 1e-12))).sum()
        total += bce + beta * kl * (1.0000001 - p_clean[y[i]])
    assert torch.allclose(tp.mart_loss(adv, clean, y, beta), total / 6, atol=1e-5)


def test_mail_weights_and_loss():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4]]))
    y = torch.tensor([0, 0, 2])
    margins = torch.tensor([0.7 - 0.2, 0.1 - 0.5, 0.4 - 0.3])
    bias, slope = -1.5, 2.0
    weights = 3 * torch.sigmoid(slope * (bias - margins))
    assert torch.allclose(tp.mail_weights(logits, y, bias, slope), weights, atol=1e-6)
    assert weights[1] > weights[2] > weights[0]  # the misclassified example weighs most
    ce = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(tp.mail_loss(logits, y, bias, slope), (weights * ce).mean(), atol=1e-6)
    assert not tp.mail_weights(logits.requires_grad_(True), y).requires_grad  # a weight, not trained


# ------------------------------------------------------------------------------------------ PIAT


def test_piat_alpha_schedule():
    assert tp.piat_alpha(0) == pytest.approx(0.1)
    assert tp.piat_alpha(10) == pytest.approx(0.55)
    assert tp.piat_alpha(100) == pytest.approx(101 / 110)
    assert tp.piat_alpha(10_000) == pytest.approx(0.99)  # capped at alpha_max
    assert tp.piat_alpha(3, alpha_max=0.5, a=2, b=4) == pytest.approx(0.5)
    values = [tp.piat_alpha(t) for t in range(120)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_interpolate_covers_parameters_and_batchnorm_statistics():
    torch.manual_seed(0)
    model, other = utils.build_model("small-cnn", 10), utils.build_model("small-cnn", 10)
    model.train()
    model(torch.rand(8, 3, 32, 32))  # move the running statistics and num_batches_tracked
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.zeros(8, dtype=torch.long)).backward()
    opt.step()
    momentum_before = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}
    prev = {k: v.clone() for k, v in other.state_dict().items()}
    for k, v in prev.items():
        if v.is_floating_point():
            v.add_(torch.randn_like(v))  # distinguishable from the model's values
        else:
            v.fill_(12345)
    current = {k: v.clone() for k, v in model.state_dict().items()}
    tp.interpolate_(model, prev, 0.3)
    after = model.state_dict()
    kinds = {"weight": 0, "running_mean": 0, "running_var": 0, "num_batches_tracked": 0}
    for k, v in after.items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.3 * prev[k] + 0.7 * current[k], atol=1e-6), k
        else:
            assert torch.equal(v, current[k]), k  # integer buffers keep the current value
        for kind in kinds:
            kinds[kind] += k.endswith(kind)
    assert all(kinds.values()), kinds  # each kind of tensor was really checked
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], momentum_before[k])  # optimizer state left alone


def test_interpolate_extremes():
    model = utils.build_model("small-cnn", 10)
    prev = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tp.interpolate_(model, prev, 0.0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    tp.interpolate_(model, prev, 1.0)
    assert all(v.abs().max() == 0 for v in model.state_dict().values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------ schedule, dispatch


def test_lr_schedule_is_the_papers():
    for epoch, expected in ((0, 0.01), (60, 0.01), (75, 0.0055), (90, 0.001), (105, 0.00055), (120, 0.0001)):
        assert tp.lr_at(epoch, 0.01, 120) == pytest.approx(expected)
    for epoch, expected in ((90, 0.1), (135, 0.01), (180, 0.001)):  # WRN-32-10
        assert tp.lr_at(epoch, 0.1, 180) == pytest.approx(expected)


def attack_spy(monkeypatch):
    """Record (loss, random start, the attacked model in training mode, generator given) of every pgd_attack call."""
    calls, real = [], tp.pgd_attack

    def spy(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append((bound.arguments["loss"], bound.arguments["random_start"], bound.arguments["model"].training,
                      bound.arguments["generator"] is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(tp, "pgd_attack", spy)
    return calls


@pytest.mark.parametrize("loss,attack,start", [("alp", "ce", "uniform"), ("trades", "kl", "normal"),
                                               ("mart", "ce", "normal"), ("mail", "ce", "normal")])
def test_each_baseline_uses_its_papers_attack_and_formula(monkeypatch, trained_model, loss, attack, start):
    model, x, y = trained_model
    x, y = x[:16], y[:16]
    calls = attack_spy(monkeypatch)
    args = SimpleNamespace(loss=loss, norm="linf", epsilon=8, step_size=2, pgd_steps=3, lam=2.0, beta=6.0,
                           mail_bias=-1.5, mail_slope=1.0, mail_burn_in=5)
    torch.manual_seed(0)
    model.eval()
    x_adv = tp.baseline_attack(model, x, y, args)
    assert calls == [(attack, start, False, False)]  # BatchNorm in eval mode while attacking
    model.train()
    logits_adv = model(x_adv)
    value, logits_clean = tp.baseline_loss(model, model, x, y, logits_adv, args, epoch=7)
    expected = {
        "alp": lambda: F.cross_entropy(logits_adv, y) + 2.0 * tp.alp_loss(logits_adv, logits_clean),
        "trades": lambda: F.cross_entropy(logits_clean, y) + 6.0 * tp.trades_kl(logits_adv, logits_clean),
        "mart": lambda: tp.mart_loss(logits_adv, logits_clean, y, 6.0),
        "mail": lambda: tp.mail_loss(logits_adv, y, -1.5, 1.0),
    }[loss]()
    assert torch.allclose(value, expected) and value.requires_grad and model.training
    if loss == "mail":  # during the burn-in, plain adversarial CE
        value, _ = tp.baseline_loss(model, model, x, y, logits_adv, args, epoch=4)
        assert torch.allclose(value, F.cross_entropy(logits_adv, y))
    model.eval()


@pytest.mark.parametrize("loss", ["ce", "nmse"])
def test_pgd_at_and_nmse_train_on_pgd_from_a_uniform_start_with_batchnorm_frozen(monkeypatch, tmp_path, loss):
    """The paper's own losses in train(): the training attack is PGD on CE from a uniform start with the model in
    eval mode (global generator); the evaluation's attacks draw from their own generator; the loss is
    CE(f(x'), y) + lam * NMSE(f(x'), f(x), y) (nmse) or CE(f(x'), y) (ce)."""
    nmse_calls, real_nmse = [], tp.nmse_loss
    monkeypatch.setattr(tp, "nmse_loss", lambda *a: nmse_calls.append(a) or real_nmse(*a))
    calls = attack_spy(monkeypatch)
    tp.main(["--dataset", "synthetic", "--arch", "small-cnn", "--train-size", "64", "--eval-size", "16",
             "--batch-size", "32", "--pgd-steps", "2", "--eval-pgd-steps", "2", "--epochs", "1", "--loss", loss,
             "--device", "cpu", "--out-dir", str(tmp_path / "run")])
    assert calls == [("ce", "uniform", False, False)] * 2 + [("ce", "uniform", False, True)]
    assert len(nmse_calls) == (2 if loss == "nmse" else 0)


def test_mail_burn_in_scales_with_epochs():
    assert tp.parse_args(["--loss", "mail", "--epochs", "120"]).mail_burn_in == 76
    assert tp.parse_args(["--loss", "mail", "--epochs", "60"]).mail_burn_in == 38
    assert tp.parse_args(["--loss", "mail", "--epochs", "60", "--mail-burn-in", "3"]).mail_burn_in == 3


def test_arch_and_loss_defaults():
    args = tp.parse_args([])
    defaults = (args.arch, args.epochs, args.lr, args.weight_decay, args.loss, args.lam)
    assert defaults == ("resnet18", 120, 0.01, 3.5e-3, "nmse", 4.0)
    args = tp.parse_args(["--arch", "wrn-32-10", "--loss", "alp"])
    assert (args.epochs, args.lr, args.weight_decay, args.lam) == (180, 0.1, 7e-4, 0.5)
    # RAT's second-order weight as its official scripts set it, in this project's terms (two KLs averaged)
    assert tp.parse_args(["--loss", "rat"]).rat_second_weight == 0.08
    assert tp.parse_args(["--loss", "rat", "--arch", "small-cnn"]).rat_second_weight == 0.08
    assert args.rat_second_weight == 0.1
    assert args.piat and tp.parse_args(["--no-piat"]).piat is False
    assert math.isclose(tp.parse_args(["--lr", "0.2"]).lr, 0.2)
