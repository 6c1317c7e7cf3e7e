"""What evaluate.py writes for readers beyond eval.json: a model card and a RobustBench entry (--card), the robustness
curve and per-class figures (--curve), the model as a file any PyTorch loads without this code (--export), and
Fig. 8's loss landscape (--landscape). It imports utils.py only; evaluate.py loads it for those options, passes it
what it measured and keeps the bookkeeping (checkpoints, output names, eval.json)."""

import functools
import hashlib
import importlib.util
import json
import shlex
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

TITLES = {"clean": "Clean", "pgd20": "PGD-20", "cw20": "CW-20", "aa": "AutoAttack", "eot20": "EOT-PGD-20"}
ARCHITECTURES = {"resnet18": "ResNet-18", "wrn-32-10": "WideResNet-32-10", "small-cnn": "small CNN (4 conv layers)"}
TO_FILL = "TO FILL IN"  # what only the user knows: RobustBench's link, authors, venue
NOT_FLAGS = {"out_dir", "resume", "typed", "device", "track", "wandb_project", "wandb_entity"}  # no effect on weights


# === The attack (docs/method.md §2), written inline as in evaluate.py: the landscape attacks every perturbed model


def pgd_attack(model, x, y, epsilon, step_size, steps, loss="ce", random_start="uniform", generator=None,
               delta_mask=None, norm="linf"):
    """PGD maximising `loss` of `model` around x in the L-inf or the L2 ball (norm "linf", "l2"); returns x' with
    ||x' - x|| <= epsilon per example, in [0, 1]: each step (the gradient's sign, or the gradient over its L2 norm)
    is projected onto the ball, then into [0, 1]. epsilon: one radius, or one per example (a tensor (N,): CFA's
    class-wise margins). loss: "ce" cross-entropy, "cw" the Carlini-Wagner margin max_{j!=y} f_j - f_y, "kl"
    TRADES's KL(p(x) || p(x')). random_start: "uniform" in the ball (Madry et al.), "normal" 0.001 * N(0, 1) (the
    official TRADES and MART code) or None, drawn from `generator` (default: the global one). delta_mask: None, or
    a function returning a 0/1 mask (or None) that multiplies delta before every forward pass (PRM). A model that
    gives no gradient is not moved. The caller chooses the model's mode (BatchNorm in eval mode while attacking)."""
    x, per_example = x.detach(), (-1, *[1] * (x.dim() - 1))  # one number per example, broadcast over its image
    epsilon = epsilon.to(x.device, x.dtype).view(per_example) if torch.is_tensor(epsilon) else epsilon

    def l2(v):  # never 0: a zero vector divided by it stays zero
        return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(per_example)

    def project(delta):  # onto the ball (clamping into [0, 1] then only shortens delta)
        delta = delta.clamp(-epsilon, epsilon) if norm == "linf" else delta * (epsilon / l2(delta)).clamp(max=1)
        return (x + delta).clamp_(0, 1) - x

    if loss == "kl":
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
    if random_start == "uniform" and norm == "linf":  # U(-eps, eps) in every coordinate
        delta = torch.empty_like(x).uniform_(-1, 1, generator=generator) * epsilon
    elif random_start == "uniform":  # uniform in the L2 ball: a Gaussian's direction, radius eps * U^(1/dimensions)
        delta = torch.randn(x.shape, generator=generator, device=x.device)
        radius = torch.rand(len(x), generator=generator, device=x.device).pow(1 / x[0].numel()).view(per_example)
        delta = delta / l2(delta) * radius * epsilon
    elif random_start == "normal":
        delta = 0.001 * torch.randn(x.shape, generator=generator, device=x.device)
    else:
        delta = torch.zeros_like(x)
    delta = project(delta)
    for _ in range(steps):
        mask = delta_mask() if delta_mask is not None else None
        delta = (delta * mask if mask is not None else delta).requires_grad_(True)
        logits = model(x + delta)
        if loss == "ce":
            objective = F.cross_entropy(logits, y, reduction="sum")
        elif loss == "cw":
            objective = cw_margin(logits, y).sum()
        else:
            objective = F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")
        grad = torch.autograd.grad(objective, delta, allow_unused=True)[0] if objective.requires_grad else None
        grad = torch.zeros_like(x) if grad is None else grad
        delta = project(delta.detach() + step_size * (grad.sign() if norm == "linf" else grad / l2(grad)))
    return (x + delta).detach()


def cw_margin(logits, y):
    """max_{j != y} f_j - f_y per example: positive exactly when x is misclassified."""
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - logits.gather(1, y[:, None]).squeeze(1)


# === The loss landscape (Fig. 8; Li et al., "Visualizing the loss landscape of neural nets", 2018)


def filter_normalized_direction(model, generator):
    """A random Gaussian direction in weight space, each filter (a slice along the first dimension: a conv's output
    channel, a linear layer's row) rescaled to the norm of the same filter of the weights. One-dimensional
    parameters (biases, BatchNorm's scale and shift) get a zero direction (Li et al.'s ignore='biasbn')."""
    direction = {}
    for name, w in model.named_parameters():
        if w.dim() <= 1:
            direction[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator).to(w.device, w.dtype)
        scale = w.detach().flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-10)
        direction[name] = d * scale.view(-1, *[1] * (w.dim() - 1))
    return direction


def loss_landscape(model, x, y, epsilon, step_size, steps, coords, seed, batch_size, desc="landscape", norm="linf"):
    """(loss, accuracy) grids: loss[i, j] the mean CE on the fixed batch (x, y) of the model with the weights
    theta + coords[i]*d1 + coords[j]*d2, under PGD made against those weights from the same random start. The
    weights are passed in (torch.func.functional_call): the model's own are never touched."""
    model.eval()
    theta = {name: p.detach() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    d1, d2 = filter_normalized_direction(model, generator), filter_normalized_direction(model, generator)
    loss, accuracy = np.zeros((len(coords), len(coords))), np.zeros((len(coords), len(coords)))
    for i, j in utils.progress([(i, j) for i in range(len(coords)) for j in range(len(coords))], desc=desc):
        weights = {k: theta[k] + float(coords[i]) * d1[k] + float(coords[j]) * d2[k] for k in theta}
        perturbed = functools.partial(torch.func.functional_call, model, weights)  # perturbed(x): the logits
        utils.seed_everything(seed)  # the same random start at every grid point: a smoother surface
        total, correct = 0.0, 0
        for k in range(0, len(x), batch_size):
            xb, yb = x[k : k + batch_size], y[k : k + batch_size]
            x_adv = pgd_attack(perturbed, xb, yb, epsilon, step_size, steps, norm=norm)
            with torch.no_grad():
                logits = perturbed(x_adv)
            total += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += int((logits.argmax(1) == yb).sum())
        loss[i, j], accuracy[i, j] = total / len(x), correct / len(x)
    return loss, accuracy


def landscape_for(model, x, y, args, device, common, stem):
    """Compute and describe one checkpoint's loss landscape; saved as stem.npz and drawn as a surface in stem.png."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    start, n = time.time(), min(args.landscape_batch, len(x))
    xb, yb = utils.to_float(x[:n].to(device)), y[:n].to(device)
    coords = np.linspace(-args.landscape_range, args.landscape_range, args.landscape_steps)
    loss, accuracy = loss_landscape(model, xb, yb, *utils.radii(args), args.landscape_pgd_steps, coords, args.seed,
                                    args.batch_size, desc=f"{common['role']} landscape", norm=args.norm)
    npz, png = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".png")
    utils.atomic_write(npz, lambda f: np.savez(f, a=coords, b=coords, loss=loss, accuracy=accuracy,
                                               epsilon=utils.radii(args)[0], norm=args.norm,
                                               pgd_steps=args.landscape_pgd_steps, n=n))
    fig = Figure(figsize=(6.5, 5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(*np.meshgrid(coords, coords, indexing="ij"), loss, cmap="viridis", linewidth=0, antialiased=True)
    ax.set(xlabel="a (direction d1)", ylabel="b (direction d2)", zlabel="adversarial CE",
           title=f"{common['method']} ({common['role']}): PGD-{args.landscape_pgd_steps} CE, "
                 f"{utils.threat_model(args.norm, args.epsilon)}, {n} images")
    fig.tight_layout()
    utils.atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110))
    center = len(coords) // 2
    entry = {**common, "npz": str(npz), "png": str(png), "steps": args.landscape_steps, "range": args.landscape_range,
             "batch": n, "pgd_steps": args.landscape_pgd_steps, "norm": args.norm, "epsilon": utils.radii(args)[0],
             "loss_min": float(loss.min()), "loss_max": float(loss.max()),
             "loss_center": float(loss[center, center]) if len(coords) % 2 else None, "seconds": time.time() - start}
    print(f"  landscape {args.landscape_steps}x{args.landscape_steps} in [-{args.landscape_range:g}, "
          f"{args.landscape_range:g}]^2: loss {entry['loss_min']:.3f}..{entry['loss_max']:.3f}, wrote {npz} and {png} "
          f"({entry['seconds']:.1f} s)")
    return entry


def plot_landscapes(run_dirs):
    """Fig. 8 of sweep.py's report: the final.landscape.npz surfaces landscape_for saved, of {method: run folder}."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    surfaces = {name: np.load(Path(d) / "final.landscape.npz") for name, d in run_dirs.items()}
    zmax = max(float(s["loss"].max()) for s in surfaces.values())
    fig = Figure(figsize=(11, 4.5))
    for i, (name, s) in enumerate(surfaces.items()):
        ax = fig.add_subplot(1, len(surfaces), i + 1, projection="3d")
        a, b = np.meshgrid(s["a"], s["b"], indexing="ij")
        ax.plot_surface(a, b, s["loss"], cmap="viridis", vmin=0, vmax=zmax)
        ax.set(title=f"{name}: min {s['loss'].min():.2f}, max {s['loss'].max():.2f}", xlabel="a", ylabel="b",
               zlabel="adversarial CE", zlim=(0, zmax))
    fig.suptitle("Fig. 8: loss landscape under PGD")
    return fig


# === Is a difference real? Paired over the same images, and over seeds


def p_text(p, digits=2):
    """A p-value as text, "*" below 0.05, with the digits it needs not to print a p below 0.05 as 0.05."""
    text = f"{p:.{digits}g}"
    while p < 0.05 <= float(text):
        digits += 1
        text = f"{p:.{digits}g}"
    return text + " *" * (p < 0.05)


def compare_flags(reference, other, resamples=10_000, seed=0):
    """Two methods' per-image correctness on the same images, (seeds, images) 0/1 arrays (each row one run): the
    difference of their accuracies (other - reference), its 95 % interval by a paired bootstrap over the images
    (of the per-image mean over seeds), a 95 % t-interval over seeds (paired by seed when both have as many, else
    Welch's; None with one seed each), and the exact McNemar p-value: the two-sided binomial test of the images one
    gets right and the other wrong (summed over the seeds paired in order)."""
    import scipy.stats

    a, b = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
    d = b.mean(0) - a.mean(0)
    rng = np.random.default_rng(seed)
    boots = np.concatenate([d[rng.integers(0, len(d), (min(1000, resamples - i), len(d)))].mean(1)
                            for i in range(0, resamples, 1000)])  # in chunks of 1000 resamples
    pairs = min(len(a), len(b))
    only_a, only_b = int((a[:pairs] > b[:pairs]).sum()), int((b[:pairs] > a[:pairs]).sum())
    p = scipy.stats.binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
    t_low = t_high = None
    per_seed_a, per_seed_b = a.mean(1), b.mean(1)
    if len(a) > 1 and len(b) > 1:
        with warnings.catch_warnings():  # scipy's notice when every seed differs by the same amount
            warnings.simplefilter("ignore", RuntimeWarning)
            t = (scipy.stats.ttest_rel(per_seed_b, per_seed_a) if len(a) == len(b) else
                 scipy.stats.ttest_ind(per_seed_b, per_seed_a, equal_var=False)).confidence_interval(0.95)
        t_low, t_high = float(t.low), float(t.high)
    return {"reference_accuracy": float(a.mean()), "accuracy": float(b.mean()), "diff": float(d.mean()),
            "ci_low": float(np.percentile(boots, 2.5)), "ci_high": float(np.percentile(boots, 97.5)),
            "t_low": t_low, "t_high": t_high, "p_value": float(p), "only_reference": only_a, "only_other": only_b,
            "seeds": [len(a), len(b)], "n": len(d)}


COMPARED = {"dataset": "data set", "indices": "images", "norm": "norm", "epsilon_255": "eps (1/255)", "epsilon": "eps",
            "steps": "steps", "step_size_255": "step size", "draws": "EOT draws", "aa_version": "AutoAttack version",
            "aa_attacks": "AutoAttack attacks", "amp": "precision (--amp)"}  # what makes two results comparable


def compare(rows, titles, out=None):
    """--compare: each configuration of the given runs' results against the first one's, per checkpoint role and
    attack; printed as a table and, with --out, written as JSON. Runs whose flags differ only in --seed are seeds of
    one configuration, paired in the order given with another's; the flags that differ name the configurations of
    one method ("PIAT + NMSE (lam=1)"). Results not measured alike (COMPARED) are refused. titles: each attack's
    column title, in table order."""
    out = out and utils.check_output(out, "--out", lambda path: path.read_bytes().startswith(  # what it writes
        b'{\n  "script": "evaluate.py --compare"'))
    groups = {}  # configuration -> {run: {(role, attack, threat model): row}}
    for row in rows:  # every run's result rows
        if "per_image" not in row:
            raise utils.UserError(f"{row['run']} was evaluated before results kept per-image correctness; "
                                  "evaluate it again")
        role = row["role"] if row["role"] in ("best", "final") else "checkpoint"
        config = json.dumps(row.get("flags") or {"method": row["method"]}, sort_keys=True, default=str)
        groups.setdefault(config, {}).setdefault(row["run"], {})[(role, row["attack"], utils.threat_of(row))] = row
    names = configuration_names({c: next(iter(next(iter(r.values())).values()))["method"] for c, r in groups.items()})
    if len(groups) < 2:
        raise utils.UserError(f"--compare needs results of at least two configurations; the "
                              f"{len({r['run'] for r in rows})} given are seeds of one ({next(iter(names.values()))})")
    (reference, reference_runs), *others = groups.items()
    results, lines = [], ["| Method | vs | Checkpoint | Attack | Accuracy | Reference | Diff | 95 % CI (images) | "
                          "95 % CI (seeds) | McNemar p |", "|---|---|---|---|---|---|---|---|---|---|"]
    for config, runs in others:
        everyone = (*reference_runs.values(), *runs.values())
        cells = sorted(set.intersection(*(set(r) for r in everyone)),
                       key=lambda c: (c[2] or "", c[0], list(titles).index(c[1])))
        for role, attack in sorted(set.intersection(*({c[:2] for c in r} for r in everyone)) - {c[:2] for c in cells},
                                   key=lambda c: (c[0], list(titles).index(c[1]))):
            measured_alike([next(v for c, v in r.items() if c[:2] == (role, attack)) for r in everyone], role, attack)
        for role, attack, threat in cells:  # never two threat models (or radii) compared with each other
            measured_alike([r[(role, attack, threat)] for r in everyone], role, attack)
            stats = compare_flags([r[(role, attack, threat)]["per_image"] for r in reference_runs.values()],
                                  [r[(role, attack, threat)]["per_image"] for r in runs.values()])
            results.append({"method": names[config], "reference": names[reference], "role": role, "attack": attack,
                            "threat": threat, **stats})
            t = f"[{100 * stats['t_low']:+.1f}, {100 * stats['t_high']:+.1f}]" if stats["t_low"] is not None else "–"
            lines.append(f"| {names[config]} | {names[reference]} | {role} | {titles[attack]}"
                         f"{f' ({threat})' if threat else ''} | {100 * stats['accuracy']:.2f} | "
                         f"{100 * stats['reference_accuracy']:.2f} | {100 * stats['diff']:+.2f} | "
                         f"[{100 * stats['ci_low']:+.1f}, {100 * stats['ci_high']:+.1f}] | {t} | "
                         f"{p_text(stats['p_value'], 3)} |")
    if not results:
        raise utils.UserError("no attack was measured on the same checkpoints of every run")
    table = "\n".join(lines) + (f"\n\nin %; seeds: {', '.join(f'{names[c]} {len(r)}' for c, r in groups.items())}; "
                                "* p < 0.05 (exact McNemar on the images one gets right and the other wrong)\n")
    print(table, end="")
    if out:
        utils.save_json({"script": "evaluate.py --compare", "reference": names[reference], "configurations": {
            names[c]: list(r) for c, r in groups.items()}, "comparisons": results}, out)
        print(f"wrote {out}")
    return {"comparisons": results, "table": table}


def measured_alike(rows, role, attack):
    """One UserError unless the result rows of one cell were measured alike (COMPARED): the same data set, images,
    threat model, attack settings and precision."""
    for key, what in COMPARED.items():
        setting = [r.get(key, "linf" if key == "norm" else None) for r in rows]
        odd = next((i for i, v in enumerate(setting) if v != setting[0]), None)
        if odd is not None:
            shown = "" if key == "indices" else f": {setting[odd]} vs {setting[0]}"
            raise utils.UserError(f"{rows[odd]['run']} and {rows[0]['run']} were not evaluated on the same {what} "
                                  f"({attack}, {role}{shown}); evaluate both with the same settings")


def configuration_names(methods):
    """{configuration (JSON of its flags): its name}: the method's, and the flags in which it differs from other
    configurations of that method, e.g. "PIAT + NMSE (lam=1)"."""
    names = {}
    for config, method in methods.items():
        alike, flags = [json.loads(c) for c, m in methods.items() if m == method], json.loads(config)
        differ = [f"{k}={flags.get(k):g}" if isinstance(flags.get(k), float) else f"{k}={flags.get(k)}"
                  for k in sorted(set().union(*alike)) if len({json.dumps(a.get(k)) for a in alike}) > 1]
        names[config] = method + (f" ({', '.join(differ)})" if differ else "")
    return names


# === The model card and the RobustBench entry (--card): every number from eval.json's "card" entry


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wilson(correct, n, z=1.96):
    """The 95 % Wilson score interval of an accuracy correct/n (sound near 0 and 1, unlike the normal one)."""
    p, z2 = correct / n, z * z / n
    center, half = (p + z2 / 2) / (1 + z2), z * np.sqrt(p * (1 - p) / n + z2 / (4 * n)) / (1 + z2)
    return max(0.0, float(center - half)), min(1.0, float(center + half))


def robustbench_threat(rows):
    """(norm, eps as RobustBench writes it) of result rows: "8/255" under L-inf, "0.5" under L2 (rows without a
    "norm" are L-inf)."""
    row = next((r for r in rows if r["attack"] != "clean"), None)
    if row is None:
        return "linf", None
    norm = row.get("norm") or "linf"
    return norm, f"{row['epsilon_255']:g}/255" if norm == "linf" else f"{row['epsilon']:g}"


def cell(row, cls=None):
    """An accuracy with its interval and n, in %: of a whole row, or of one class (cls) among its images."""
    if cls is None:
        correct, n = row["correct"], row["n"]
    else:
        n = row["class_n"][str(cls)]
        correct = round(row["class_accuracy"][str(cls)] * n)
    low, high = wilson(correct, n)
    return {"accuracy": round(100 * correct / n, 2), "ci_low": round(100 * low, 2), "ci_high": round(100 * high, 2),
            "correct": correct, "n": n, **({"class": cls} if cls is not None else {})}


def card_entry(rows, reported, checkpoint, script, training_args, defaults, sanity, export, evaluated_on):
    """What MODEL_CARD.md and robustbench.json show, kept in eval.json as its "card": per checkpoint (best, final)
    and attack the accuracy, its 95 % interval and n (in %, two decimals), the worst class under PGD-20, and what
    the card says about the model, its training, its checks and its files."""
    results = {}
    for row in rows:
        results.setdefault(row["role"], {})[row["attack"]] = cell(row)
        if row["attack"] == "pgd20" and "class_n" in row:  # rows of older versions lack the classes' counts
            results[row["role"]]["worst_class"] = cell(row, row["worst_class"])
    first = next(r for r in rows if r["role"] == reported)
    norm, eps = robustbench_threat(rows)
    aa = next((r for r in rows if r["role"] == reported and r["attack"] == "aa"), None)
    return {"run": first["run"], "reported": reported, "method": first["method"], "arch": first["arch"],
            "dataset": first["dataset"], "epoch": first["epoch"], "epochs": training_args.get("epochs"),
            "seed": training_args.get("seed"), "subset": first["subset"], "norm": norm, "eps": eps,
            "checkpoint": checkpoint,
            "sha256": sha256(checkpoint), "script": script,
            "train_command": train_command(script, training_args, defaults) if training_args else None,
            "eval_command": eval_command(first["run"], rows), "evaluated_on": evaluated_on,
            "aa": aa and {"version": aa.get("aa_version"), "attacks": aa.get("aa_attacks")},
            "sanity": sanity, "export": export, "results": results}


def script_defaults(script):
    """The defaults of a training script's flags: its parse_args([]), the script loaded from beside this file (not
    imported by name: no script depends on another); {} when it is not there."""
    path = Path(__file__).with_name(script)
    if not path.is_file():
        return {}
    loader = importlib.util.spec_from_file_location(f"defaults_of_{path.stem}", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return {"source": path.read_text(), **vars(module.parse_args([]))}


def train_command(script, saved, defaults):
    """The command that trains the run again: the script and every flag whose value differs from its default."""
    words = ["python", script]
    for key, value in saved.items():
        flag = "--" + key.replace("_", "-")
        if key in NOT_FLAGS or f'"{flag}"' not in defaults.get("source", f'"{flag}"') or value == defaults.get(key):
            continue  # not a flag of the script (a derived value), or its default
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            words += [flag, *(map(str, value) if isinstance(value, list) else
                              [json.dumps(value) if isinstance(value, dict) else str(value)])]
    return shlex.join(words)


def eval_command(run, rows):
    """The evaluate.py command that measures these rows again, from what the rows record."""
    attacks = ",".join(dict.fromkeys(r["attack"] for r in rows))
    first, norm = rows[0], robustbench_threat(rows)[0]
    words = ["python", "evaluate.py", run, "--attacks", attacks]
    if first["subset"] != "all":
        words += ["--n-examples", str(first["n"]), "--subset", first["subset"]]
    robust = next((r for r in rows if r["attack"] != "clean"), None)
    if robust is not None:
        words += (["--epsilon", f"{robust['epsilon_255']:g}"] if norm == "linf" else
                  ["--norm", norm, "--epsilon", f"{robust['epsilon']:g}"])
    aa = next((r for r in rows if r["attack"] == "aa"), None)
    if aa is not None and aa.get("aa_version") != "standard":
        words += ["--aa-version", aa["aa_version"]] + (["--aa-attacks", ",".join(aa["aa_attacks"])] if
                                                         aa["aa_version"] == "custom" else [])
    return shlex.join(words + ["--seed", str(first["seed"])])


def robustbench_entry(card):
    """RobustBench's model_info fields, from the card: what the run knows filled in, what only the user knows left
    as TO_FILL. autoattack_acc holds AutoAttack standard's number only; the footnote says why it is empty, on how
    many images it was measured, and which checkpoint the entry describes."""
    ours = card["results"][card["reported"]]
    aa = ours.get("aa") if card["aa"] and card["aa"]["version"] == "standard" else None
    notes = [f"The {card['reported']} checkpoint" + (f" (epoch {card['epoch']} of {card['epochs']})" if card["epoch"]
                                                     else "") + f", SHA-256 {card['sha256'][:16]}..."]
    if ours.get("aa") and not aa:
        notes.append(f"AutoAttack ran as version {card['aa']['version']} ({', '.join(card['aa']['attacks'])}), not "
                     "standard: autoattack_acc stays empty")
    elif not aa:
        notes.append("AutoAttack was not run: autoattack_acc stays empty (evaluate.py --attacks aa)")
    if card["subset"] != "all":
        notes.append(f"evaluated on {ours['clean']['n']} test images ({card['subset']} subset), not the whole test set")
    return {"link": TO_FILL, "name": f"{card['method']} ({ARCHITECTURES.get(card['arch'], card['arch'])})",
            "authors": TO_FILL, "additional_data": False, "number_forward_passes": 1, "dataset": card["dataset"],
            "venue": TO_FILL, "architecture": ARCHITECTURES.get(card["arch"], card["arch"]), "eps": card["eps"],
            "clean_acc": f"{ours['clean']['accuracy']:.2f}" if "clean" in ours else "",
            "reported": f"{aa['accuracy']:.2f}" if aa else "", "autoattack_acc": f"{aa['accuracy']:.2f}" if aa else "",
            "footnote": "; ".join(notes) + "."}


def card_markdown(card, entry):
    """MODEL_CARD.md: the model, its training, its results (Best and Final, intervals and n), its checks, its files."""
    eps = f"L-inf, eps = {card['eps']}" if card["norm"] == "linf" else f"L2, eps = {card['eps']}"
    res = card["results"]
    rows = [a for a in (*TITLES, "worst_class") if any(a in res[r] for r in res)]

    def show(c):
        if c is None:
            return "not measured"
        cls = f"class {c['class']}: " if "class" in c else ""
        return f"{cls}{c['accuracy']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}] (n = {c['n']})"

    table = ["| | " + " | ".join(r.capitalize() for r in res) + " |", "|---" * (len(res) + 1) + "|"]
    table += [f"| {TITLES.get(a, 'Worst class (PGD-20)')} | " + " | ".join(show(res[r].get(a)) for r in res) + " |"
              for a in rows]
    sanity = card["sanity"] or "not run (evaluate.py RUN --sanity)"
    export = (f"`{card['export']['file']}` (torch.export; SHA-256 `{card['export']['sha256']}`): "
              "`torch.export.load(FILE).module()` maps [0, 1] images to logits" if card["export"] else "none")
    return "\n".join([
        f"# Model card: {card['method']}", "",
        "## The model", "",
        f"- Architecture: {ARCHITECTURES.get(card['arch'], card['arch'])} (`{card['arch']}`); it normalises its input "
        "itself: images in [0, 1] in, logits out",
        f"- Data: `{card['dataset']}`", f"- Threat model: {eps}",
        f"- Checkpoint: `{card['checkpoint']}` ({card['reported']}), SHA-256 `{card['sha256']}`",
        f"- Exported: {export}", "",
        "## Training", "",
        *([f"- Script: `{card['script']}`, {card['epochs']} epochs, seed {card['seed']}; this checkpoint holds "
           f"epoch {card['epoch']}", f"- Command (every flag that differs from its default): `{card['train_command']}`"]
          if card["train_command"] else [f"- Not a run of this project's training scripts ({card['script']})"]),
        f"- Evaluated on: {card['evaluated_on']} (the run folder does not record the machine it was trained on)", "",
        "## Results", "",
        "Accuracy in %, with its 95 % interval (Wilson) and the number of test images n; every number from "
        "eval.json's `card` entry.", "", *table, "",
        f"- Sanity checklist (`--sanity`): {sanity}",
        f"- Reproduce the evaluation: `{card['eval_command']}`", "",
        "## RobustBench entry (robustbench.json)", "",
        f"Describes the {card['reported']} checkpoint. Fields marked {TO_FILL} are yours to fill: link, authors, "
        f"venue. Footnote: {entry['footnote']}", ""])


def sanity_verdict(entries, role):
    """One line of the --sanity entry of a checkpoint: its counts and the checks that did not PASS, or None."""
    entry = next((e for e in entries if e["role"] == role), None)
    if entry is None:
        return None
    odd = [f"{c['name']} {c['status']}" for c in entry["checks"] if c["status"] != "PASS"]
    counts = ", ".join(f"{entry['counts'][s]} {s}" for s in ("PASS", "WARN", "FAIL"))
    return f"{counts} on {entry['n']} images" + (f" ({'; '.join(odd)})" if odd else "")



def write_card(rows, sanity, role, checkpoint, kind, export, device, card_path, robustbench_path):
    """MODEL_CARD.md and robustbench.json of one checkpoint from its run's result rows (and --sanity entries);
    returns what they show, for eval.json's "cards"."""
    if not any(r["role"] == role for r in rows):
        raise utils.UserError(f"no results of {checkpoint} to write a card from; evaluate it first (--attacks "
                              "clean,pgd20,cw20,aa)")
    trained = utils.load_checkpoint(checkpoint, mmap=True) if kind.startswith("train_") else {}
    script = trained.get("script", kind)
    machine = utils.cpu_name() + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    card = card_entry(rows, role, str(checkpoint), script, trained.get("args") or {},
                      script_defaults(script) if trained else {},
                      sanity_verdict([e for e in sanity if e["run"] == rows[0]["run"]], role), export,
                      f"{machine}, torch {torch.__version__}")
    entry = robustbench_entry(card)
    utils.atomic_write(card_path, lambda f: f.write(card_markdown(card, entry).encode()))
    utils.save_json(entry, robustbench_path)
    print(f"wrote {card_path} and {robustbench_path} ({role} checkpoint)")
    return {**card, "robustbench": entry}

# === Figures (--curve): accuracy against eps, and per class


def plot_robustness_curve(curves, path, title):
    """robustness_curve.png: accuracy against eps (in the norm's unit), one line per checkpoint and attack of each
    run, with +-1 standard error."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for c in curves:
        acc = np.array(c["accuracy"])
        ax.errorbar(c["epsilons"], 100 * acc, yerr=100 * np.sqrt(acc * (1 - acc) / c["n"]), marker="o", capsize=3,
                    label=f"{c['method']} ({c['role']}), {TITLES[c['attack']]}")
    unit = "eps (1/255, L-inf)" if curves[0]["norm"] == "linf" else "eps (L2, [0, 1] pixel units)"
    ax.set(xlabel=unit, ylabel="accuracy (%)", ylim=(-2, 102), title=f"{title}: accuracy against eps")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the lines, never on them
    fig.tight_layout()
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    print(f"wrote {path}")


def plot_class_accuracy(rows, path, title):
    """class_accuracy.png: each class's accuracy, clean and under every attack measured, one panel per checkpoint."""
    from matplotlib.figure import Figure

    roles = list(dict.fromkeys(r["role"] for r in rows))
    fig = Figure(figsize=(7, 2.6 * len(roles)))
    for k, role in enumerate(roles):
        ax = fig.add_subplot(len(roles), 1, k + 1)
        mine = [r for r in rows if r["role"] == role]
        classes = sorted({c for r in mine for c in r["class_accuracy"]}, key=int)  # attacks may see other images
        width = 0.8 / len(mine)
        for j, row in enumerate(mine):
            ax.bar(np.arange(len(classes)) + (j - (len(mine) - 1) / 2) * width,
                   [100 * row["class_accuracy"].get(c, np.nan) for c in classes], width,
                   label=f"{TITLES[row['attack']]} (n = {row['n']})")
        ax.set(xticks=range(len(classes)), xticklabels=classes, ylabel="accuracy (%)", ylim=(0, 100),
               title=f"{title}: {role}")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.axes[-1].set_xlabel("class")
    fig.tight_layout()
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    print(f"wrote {path}")


# === A model anyone can load (--export): torch.export with its normalisation inside, [0, 1] images in, logits out


def export_model(model, image_shape, path, meta):
    """Write `model` (eval mode) as a torch.export program with any batch size, and `meta` (what it is) beside its
    graph as extra_files["piat.json"]: torch.export.load(path).module()(x) gives its logits without this project.
    Returns the file's name and SHA-256."""
    example = torch.rand(2, *image_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(model.eval().cpu(), (example,), dynamic_shapes=({0: batch},))
    utils.atomic_write(path, lambda f: torch.export.save(program, f, extra_files={"piat.json": json.dumps(meta)}))
    print(f"wrote {path} (torch.export of the {meta['checkpoint']} checkpoint)")
    return {"file": str(path), "sha256": sha256(path)}


class ExportedModel(nn.Module):
    """A model --export wrote, read back (evaluate.py --model FILE.pt2). Its graph was traced in eval mode and cannot
    switch (its own .eval() raises), so train() and eval() here change nothing."""

    def __init__(self, path):
        super().__init__()
        extra = {"piat.json": ""}
        self.graph = torch.export.load(path, extra_files=extra).module()
        self.meta = json.loads(extra["piat.json"] or "{}")

    def train(self, mode=True):
        self.training = mode
        return self

    def forward(self, x):
        return self.graph(x)
