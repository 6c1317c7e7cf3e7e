"""The CFA and RAT baselines of train_piat.py (Table I): their formulas against direct computations on small
tensors, the class-wise margins in the attack, FAWA's update rule, RAT's randomised weights that only shape
the attack, and resume after SIGKILL. One synthetic epoch of each, with and without PIAT, is in test_train.py."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_piat as tp
import utils
from sweep import read_metrics
from conftest import TINY, kill_after_first_checkpoint, run_script


def cfa_args(**overrides):
    args = tp.parse_args([*TINY, "--loss", "cfa", "--epochs", "20", *overrides.pop("argv", [])])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def tiny_cnn(seed=0, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, classes))


# ------------------------------------------------------------------------------------------ CFA


def test_class_wise_margins_bound_each_example_by_its_own_eps():
    model = tiny_cnn().eval()
    torch.manual_seed(1)
    x, y = torch.rand(12, 3, 8, 8), torch.arange(12) % 3
    class_eps = torch.tensor([2.0, 5.0, 11.0]) / 255
    for start in ("uniform", "normal"):
        for loss in ("ce", "kl"):
            x_adv = tp.pgd_attack(model, x, y, class_eps[y], 1 / 255, 12, loss=loss, random_start=start)
            distance = (x_adv - x).abs().flatten(1).amax(dim=1)
            assert (distance <= class_eps[y] + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
            for k in range(3):  # every class really reaches its own radius, not the others'
                assert distance[y == k].max() == pytest.approx(float(class_eps[k]), abs=1e-6), (start, loss, k)


def test_calibration_is_eq_6_and_7_after_the_warm_up():
    args = cfa_args(argv=["--cfa-begin", "3"])
    assert (args.cfa_lambda1, args.cfa_lambda2, args.cfa_decay, args.cfa_threshold) == (0.3, 0.5, 0.85, 0.2)
    t = [0.1, 0.5, 0.9]
    eps, beta = tp.cfa_calibration(t, 2, args, 3)  # still warming up: every class gets eps and beta
    assert torch.allclose(eps, torch.full((3,), 8 / 255)) and torch.allclose(beta, torch.full((3,), 6.0))
    assert [v.tolist() for v in tp.cfa_calibration(None, 9, args, 3)] == [eps.tolist(), beta.tolist()]
    eps, beta = tp.cfa_calibration(t, 3, args, 3)
    assert torch.allclose(eps, (0.3 + torch.tensor(t)) * 8 / 255)
    assert torch.allclose(beta, (0.5 + torch.tensor(t)) * 6.0)
    eps, beta = tp.cfa_calibration(t, 3, cfa_args(argv=["--no-cfa-ccm", "--cfa-begin", "0"]), 3)
    assert torch.allclose(eps, torch.full((3,), 8 / 255)) and torch.allclose(beta, (0.5 + torch.tensor(t)) * 6.0)
    eps, beta = tp.cfa_calibration(t, 3, cfa_args(argv=["--no-cfa-ccr", "--cfa-begin", "0"]), 3)
    assert torch.allclose(beta, torch.full((3,), 6.0)) and not torch.allclose(eps, torch.full((3,), 8 / 255))
    # the official warm-up is 10 of 200 epochs and FAWA starts at 50 of 200: both scale with --epochs
    assert (cfa_args().cfa_begin, cfa_args().cfa_fawa_start) == (1, 5)
    at = tp.parse_args(["--loss", "cfa", "--cfa-base", "at", "--epochs", "200"])
    assert (at.cfa_lambda1, at.cfa_begin, at.cfa_fawa_start) == (0.5, 10, 50)


def test_cfa_trades_loss_against_the_direct_formula():
    torch.manual_seed(0)
    adv, clean, y = torch.randn(7, 3), torch.randn(7, 3), torch.randint(0, 3, (7,))
    class_beta = torch.tensor([2.0, 6.0, 9.0])
    total = 0.0
    for i in range(7):
        p, q = torch.softmax(clean[i], 0), torch.softmax(adv[i], 0)
        ce = -torch.log(p[y[i]])
        kl = (p * (p.log() - q.log())).sum()
        b = class_beta[y[i]]
        total += (ce + b * kl) / (1 + b)
    assert torch.allclose(tp.cfa_trades_loss(adv, clean, y, class_beta), total / 7, atol=1e-6)
    # with one beta for every class it is TRADES divided by 1 + beta (the official code's scale)
    trades = F.cross_entropy(clean, y) + 6 * tp.trades_kl(adv, clean)
    assert torch.allclose(tp.cfa_trades_loss(adv, clean, y, torch.full((3,), 6.0)), trades / 7, atol=1e-6)


def test_cfa_training_loss_attacks_each_example_within_its_class_eps(monkeypatch):
    model = tiny_cnn()
    x, y = torch.rand(9, 3, 8, 8), torch.arange(9) % 3
    seen = []
    real = tp.pgd_attack
    monkeypatch.setattr(tp, "pgd_attack", lambda *a, **k: seen.append((a[3], k)) or real(*a, **k))
    args = cfa_args(argv=["--pgd-steps", "2"])
    calibration = (torch.tensor([1.0, 4.0, 8.0]) / 255, torch.tensor([1.0, 2.0, 3.0]))
    x_adv = tp.baseline_attack(model.eval(), x, y, args, calibration)
    (eps, kwargs), = seen
    assert torch.equal(eps, calibration[0][y]) and kwargs == {"loss": "kl", "random_start": "normal", "norm": "linf"}
    adv = model.train()(x_adv)
    loss, clean = tp.baseline_loss(model, model, x, y, adv, args, 5, calibration)
    assert torch.allclose(loss, tp.cfa_trades_loss(adv, clean, y, calibration[1]))


def test_fawa_takes_an_epoch_only_when_the_worst_class_clears_the_threshold():
    model = tiny_cnn()
    model.train()
    model(torch.rand(4, 3, 8, 8))  # move the BatchNorm statistics
    args = cfa_args(argv=["--cfa-fawa-start", "3"])
    average = tp.make_average(model, args)
    assert tp.average_kind(args) == "fawa" and average.n_averaged == 0  # nothing averaged yet: the model reported

    def fawa_update_(worst_val_robust_acc, epoch):
        taken = tp.update_average_(average, model, {"val_worst_pgd20_acc": worst_val_robust_acc}, None, args, epoch)
        return taken["fawa_updated"]

    def shifted(delta):
        with torch.no_grad():
            for v in model.state_dict().values():
                if v.is_floating_point():
                    v.add_(delta)
        return {k: v.clone() for k, v in model.state_dict().items()}

    first = shifted(0.0)
    assert not fawa_update_(0.9, epoch=1)  # epoch 2 < --cfa-fawa-start 3
    assert not fawa_update_(0.19, epoch=2)  # worst class below 0.2
    assert average.n_averaged == 0
    assert fawa_update_(0.2, epoch=2)  # the first epoch it takes: a copy
    for k, v in average.module.state_dict().items():
        assert torch.equal(v, first[k]), k
    second = shifted(1.0)
    assert not fawa_update_(0.1, epoch=3)  # skipped: the average keeps `first`
    assert fawa_update_(0.5, epoch=4)
    for k, v in average.module.state_dict().items():
        if v.is_floating_point():  # parameters and BatchNorm statistics: 0.85 * average + 0.15 * weights
            assert torch.allclose(v, 0.85 * first[k] + 0.15 * second[k], atol=1e-6), k
    assert average.n_averaged == 2


def test_cfa_defaults_hold_out_two_percent_and_refuse_a_second_average(tmp_path, capsys):
    tp.main([*TINY, "--loss", "cfa", "--epochs", "1", "--pgd-steps", "1", "--out-dir", str(tmp_path / "run")])
    args = utils.load_checkpoint(tmp_path / "run" / "final.pt")["args"]
    assert args["val_size"] == 80 and args["rat_target_mass"] == 0.8  # 2% of the 4,000 synthetic training images
    assert json.loads((tmp_path / "run" / "args.json").read_text())["val_size"] == 80
    with pytest.raises(SystemExit):
        cfa_args(argv=["--ema", "0.99"])
    assert "--ema and CFA's FAWA are two weight averages" in capsys.readouterr().err
    assert cfa_args(argv=["--ema", "0.99", "--no-cfa-fawa"]).ema == 0.99


# ------------------------------------------------------------------------------------------ RAT


def test_rat_soft_targets():
    gap = torch.tensor([0.3, -0.1, 0.5, 0.1])
    targets = tp.rat_soft_targets(gap, 0.8)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    assert torch.allclose(targets.diagonal(), torch.full((4,), 0.2))
    shifted = gap - gap.min()
    for r in range(4):  # the other classes share 0.8 in proportion to their shifted gap
        others = [k for k in range(4) if k != r]
        assert torch.allclose(targets[r, others], 0.8 * shifted[others] / shifted[others].sum(), atol=1e-6)
    flat = tp.rat_soft_targets(torch.zeros(4), 0.8)  # a constant gap (where the official code divides by 0)
    assert torch.isfinite(flat).all() and torch.allclose(flat[0, 1:], torch.full((3,), 0.8 / 3))


def test_rat_taylor_terms_use_the_classifiers_gradient_row_sums():
    """s[k] = d mean CE / d W[k, :] summed over features = mean_i (p_ik - [y_i = k]) * sum_j h_ij for a linear
    classifier on features h; the targets come from |s_nat| - |s_adv| and s_adv^2 - s_nat^2."""
    torch.manual_seed(0)
    classifier = nn.Linear(5, 3)
    h_clean, h_adv, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 3, (6,))
    clean, adv = classifier(h_clean), classifier(h_adv)
    first, second = tp.rat_taylor_terms(adv, clean, y, classifier.weight, 0.8)

    def row_sums(h, logits):
        return ((torch.softmax(logits, 1) - F.one_hot(y, 3)) * h.sum(1, keepdim=True)).mean(0).detach()

    s_nat, s_adv = row_sums(h_clean, clean), row_sums(h_adv, adv)

    def kl(target, logits):
        t = target[y]  # 0 * log 0 = 0 where a class gets no mass
        return (torch.xlogy(t, t) - t * torch.log_softmax(logits, 1)).sum() / 6

    t1 = tp.rat_soft_targets(s_nat.abs() - s_adv.abs(), 0.8)
    t1_clean = tp.rat_soft_targets(s_adv.abs() - s_nat.abs(), 0.8)
    t2 = tp.rat_soft_targets(s_adv ** 2 - s_nat ** 2, 0.8)
    assert torch.allclose(first, (kl(t1, adv) + kl(t1_clean, clean)) / 2, atol=1e-5)
    assert torch.allclose(second, (kl(t2, adv) + kl(t2, clean)) / 2, atol=1e-5)
    assert first.requires_grad  # the terms train the logits; the gaps themselves are constants


def test_rat_noise_shapes_the_attack_only_and_the_step_is_sgd_on_its_objective(monkeypatch):
    """The attack runs on noisy convolution weights (its logits differ from the model's), and the step of the
    training loop equals plain SGD on the RAT objective computed at the clean weights for the same x': the
    noise is applied for the attack and gone for the update."""
    torch.manual_seed(0)
    model = utils.build_model("small-cnn", 10)
    twin = utils.build_model("small-cnn", 10)
    twin.load_state_dict(model.state_dict())
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    args = tp.parse_args([*TINY, "--loss", "rat", "--pgd-steps", "2"])
    args.rat_target_mass = 0.8
    attacks = []
    real = tp.pgd_attack

    def spy(victim, *a, **k):
        x_adv = real(victim, *a, **k)
        attacks.append((victim, x_adv))
        return x_adv

    monkeypatch.setattr(tp, "pgd_attack", spy)
    torch.manual_seed(3)
    x_adv = tp.baseline_attack(model.eval(), x, y, args)
    loss, _ = tp.baseline_loss(model, model, x, y, model.train()(x_adv), args, epoch=0)
    (victim, _), = attacks
    with torch.no_grad():
        model.eval()
        difference = (victim(x) - model(x)).abs().max()
        model.train()
    assert 0 < difference < 1e-2  # a small perturbation of the weights, not the weights themselves
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    # the objective at the clean weights, for the same x', by hand
    twin.train()
    clean, adv = twin(x), twin(x_adv)
    first, second = tp.rat_taylor_terms(adv, clean, y, twin.linear.weight, 0.8)
    objective = 0.8 * F.cross_entropy(clean, y) + 6 * tp.trades_kl(adv, clean) + 0.2 * first + 0.08 * second
    assert torch.allclose(objective, loss, atol=1e-6)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    twin_optimizer.zero_grad()
    objective.backward()
    twin_optimizer.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-7, rtol=0), name


# ------------------------------------------------------------------------------------------ runs


@pytest.mark.parametrize("loss,extra", [("cfa", ["--cfa-begin", "1", "--cfa-fawa-start", "1", "--cfa-threshold", "0"]),
                                        ("rat", [])])
def test_killed_run_resumes_to_the_same_state(tmp_path, loss, extra):
    flags = [*TINY, "--loss", loss, *extra, "--epochs", "3", "--train-size", "128", "--batch-size", "16", "--no-amp"]
    whole = tmp_path / "whole"
    tp.main([*flags, "--out-dir", str(whole)])
    killed = tmp_path / "killed"
    stopped_after = kill_after_first_checkpoint(tp.__file__, flags, killed)
    assert stopped_after < 3, "the run finished before it could be killed"
    result = run_script(tp.__file__, "--resume", killed)
    assert result.returncode == 0, result.stderr
    a, b = utils.load_checkpoint(whole / "final.pt"), utils.load_checkpoint(killed / "final.pt")
    assert b["epoch"] == 3 and a["weights"] == b["weights"] == ("fawa" if loss == "cfa" else "trained")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    if loss == "cfa":  # the trained weights, FAWA and the class-wise accuracies the calibration reads
        for part in ("model", "average"):
            for k, v in a["resume"][part].items():
                assert torch.equal(v, b["resume"][part][k]), (part, k)
        accuracies = [[m["train_class_robust_acc"] for m in ck["metrics"]] for ck in (a, b)]
        assert accuracies[0] == accuracies[1]
        assert [m["fawa_updated"] for m in a["metrics"]] == [1, 1, 1]
    rows = read_metrics(killed / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0 <= r["test_worst_pgd20_acc"] <= r["test_pgd20_acc"] <= 1
        assert 0 <= r["test_worst_clean_acc"] <= r["test_clean_acc"] <= 1


# ------------------------------------------------------------------------------------------ evaluate.py


def test_evaluate_reports_the_worst_class_beside_the_average_and_the_papers_rows(tmp_path, capsys):
    import evaluate as ev

    out = tmp_path / "cfa"
    tp.main([*TINY, "--loss", "cfa", "--no-piat", "--epochs", "1", "--out-dir", str(out)])
    rows = ev.main([str(out / "final.pt"), "--attacks", "clean,pgd20", "--n-examples", "64", "--device", "cpu"])["rows"]
    model = utils.build_model("small-cnn", 10, *(utils.load_checkpoint(out / "final.pt")[k] for k in ("mean", "std")))
    model.load_state_dict(utils.load_checkpoint(out / "final.pt")["model"])
    data = utils.load_dataset("synthetic", None)
    idx = utils.fixed_subset(len(data.x_test), 64).sort().values
    x, y = utils.to_float(data.x_test[idx]), data.y_test[idx]
    with torch.no_grad():
        correct = model.eval()(x).argmax(1) == y
    clean = next(r for r in rows if r["attack"] == "clean")
    per_class = {int(c): correct[y == c].float().mean().item() for c in torch.unique(y)}
    assert clean["class_accuracy"] == pytest.approx(per_class)
    assert clean["worst_class_accuracy"] == pytest.approx(min(per_class.values()))
    assert per_class[clean["worst_class"]] == pytest.approx(min(per_class.values())) and clean["method"] == "CFA"
    for row in rows:
        assert row["worst_class_accuracy"] <= row["accuracy"]
    capsys.readouterr()
    table = ev.main(["--table", str(out / "final.eval.json"), "--worst-class", "--paper", "cifar10"])["table"]
    threat, _, header, _, ours, paper = table.splitlines()
    assert threat == "**Threat model: L-inf eps 8/255**"
    assert "| PGD20 Best worst | PGD20 Final worst |" in header and header.count("worst") == 8
    assert f"{100 * clean['worst_class_accuracy']:.2f}" in ours
    assert paper.startswith("|  | paper (cifar10) | CFA | 82.80 | 83.88 | 1.08 | – | – | 53.24 | 51.69 | 1.55 |")
