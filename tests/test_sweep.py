"""sweep.py: the grids, the local launcher (parallel jobs, a killed run, a preempted job, each run's progress), the
Slurm submission (a stand-in sbatch on PATH), --dry-run's checks, --status, --report with each method against PGD-AT;
and the TensorBoard / W&B tracking of utils."""

import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import report
import sweep
import utils
from sweep import read_metrics
from conftest import TINY, kill_after_first_checkpoint, one_line_error, run_script

EPOCHS = 4
# the tiny grid: table5 (ALP and NMSE, no PIAT) x 2 seeds, small-cnn on 64 synthetic images, 4 short epochs
GRID_FLAGS = ["table5", "--profile", "quick", "--seeds", "2", "--attacks", "clean,pgd20", "--n-examples", "16",
              *TINY[2:], "--train-size", "64", "--eval-size", "16", "--epochs", str(EPOCHS)]


def processes(marker):
    """{pid: argv} of the live processes whose command line holds `marker`."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and any(marker in a for a in argv):
            found[int(entry.name)] = argv
    return found


def parent_pid(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def report_cells(markdown, method):
    """The cells of `method`'s row in a markdown table."""
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {method} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def key(run_dir):
    return "/".join(Path(run_dir).parts[-3:])


def mean_std_text(values):
    percent = [100 * v for v in values]
    return f"{statistics.fmean(percent):.2f} ± {statistics.stdev(percent):.2f}"


def test_grids_hold_the_papers_runs_once_each():
    plan = sweep.plan(["paper", "averaging"], seeds=2, sweep_dir="/sweep")
    assert set(sweep.ALIASES["paper"]) | {"averaging", "ema"} == set(sweep.GRIDS)
    table1 = plan.tables["table1", "cifar10"]
    assert list(table1) == ["PGD-AT", "ALP", "TRADES", "MART", "MAIL", "CFA", "RAT", "PIAT + NMSE"]
    assert {ds for grid, ds in plan.tables if grid == "table1"} == {"cifar10", "cifar100", "svhn"}
    cfa = plan.runs[table1["CFA"][1]]
    assert cfa.flags == ("--dataset", "cifar10", "--arch", "resnet18", "--loss", "cfa", "--no-piat")
    assert cfa.run_dir == Path("/sweep/cifar10/cfa-nopiat/seed1") and cfa.seed == 1
    # PIAT + NMSE is one run shared by Table I, Figs. 6, 7 (the default lambda), 9 and the RDAT comparison,
    # evaluated for all of them in one evaluate.py call
    nmse = table1["PIAT + NMSE"]
    for grid, row in (("fig6", "PIAT + NMSE"), ("fig7", 4), ("fig9", "dynamic"), ("rdat", "PIAT + NMSE")):
        assert plan.tables[grid, "cifar10"][row] == nmse, grid
    assert plan.runs[nmse[0]].steps == (sweep.Step(("clean", "pgd20", "cw20", "aa")),)
    assert len({(r.script, r.flags, r.seed) for r in plan.runs.values()}) == len(plan.runs)
    # WRN-32-10 runs are their own; the ViT grid is train_vit.py's
    assert plan.runs[plan.tables["table2", "cifar100"]["PGD-AT"][0]].flags[2:4] == ("--arch", "wrn-32-10")
    assert len(plan.tables["table4", "cifar10"]) == 27
    averaging = {k: plan.runs[v[0]].flags[4:] for k, v in plan.tables["averaging", "cifar10"].items()}
    assert averaging == {"PGD-AT": ("--loss", "ce", "--no-piat"),
                         "PGD-AT + EMA": ("--loss", "ce", "--no-piat", "--ema", "0.999"),
                         "PGD-AT + SWA": ("--loss", "ce", "--no-piat", "--swa-start", "90"),  # 3/4 of 120 epochs
                         "PIAT": ("--loss", "ce", "--piat"), "PIAT + EMA": ("--loss", "ce", "--piat", "--ema", "0.999")}
    # quick mode: the notebook's 22 runs on synthetic data; extra flags reach every training command
    quick = sweep.plan(["paper"], profile="quick", extra=["--epochs", "2"], sweep_dir="/q")
    assert len(quick.runs) == 22 and all(r.flags[-2:] == ("--epochs", "2") for r in quick.runs.values())
    averaging = sweep.plan(["averaging"], extra=["--epochs", "40"])
    swa = averaging.runs[averaging.tables["averaging", "cifar10"]["PGD-AT + SWA"][0]]
    assert swa.flags[-4:] == ("--swa-start", "30", "--epochs", "40")  # 3/4 of the epochs asked for


def test_the_ema_grid_reads_pgd_at_from_the_trained_weights_of_its_ema_run(tmp_path):
    """PGD-AT and PIAT + NMSE are the RUN/trained views of their EMA runs: three runs a seed for five methods, each
    view evaluated in its own folder, its curves from the run's raw_* columns."""
    plan = sweep.plan(["ema"], profile="cpu", datasets=["synthetic"], seeds=2, sweep_dir=tmp_path)
    table = plan.tables["ema", "synthetic"]
    assert list(table) == ["PGD-AT", "PGD-AT + EMA", "PIAT", "PIAT + NMSE", "PIAT + NMSE + EMA"]
    assert len(plan.runs) == 6 and table["PGD-AT"] == [d / "trained" for d in table["PGD-AT + EMA"]]
    run = plan.runs[table["PGD-AT + EMA"][0]]
    assert run.flags == ("--dataset", "synthetic", "--arch", "small-cnn", "--loss", "ce", "--no-piat", "--ema", "0.98")
    assert {step.view for step in run.steps} == {"", "trained"}
    evaluated = [c[2] for c in sweep.next_commands(run) if c[1].endswith("evaluate.py")]
    assert sorted(set(evaluated)) == [str(run.run_dir), str(run.run_dir / "trained")]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "metrics.csv").write_text("epoch,test_pgd20_acc,raw_test_pgd20_acc\n1,0.25,0.5\n2,0.3,\n")
    assert [r["test_pgd20_acc"] for r in sweep.run_metrics(run.run_dir / "trained")] == [0.5, 0.3]
    assert [r["test_pgd20_acc"] for r in sweep.run_metrics(run.run_dir)] == [0.25, 0.3]


def test_dry_run_status_and_bad_input(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    assert sweep.main([*GRID_FLAGS, "--sweep-dir", str(sweep_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    run = sweep_dir.absolute() / "synthetic" / "alp-nopiat" / "seed1"
    assert f"{Path(sys.executable)} {sweep.ROOT / 'train_piat.py'} --dataset synthetic" in out
    assert f"--epochs {EPOCHS} --seed 1 --out-dir {run}\n" in out
    assert f"evaluate.py {run} --attacks clean,pgd20 --n-examples 16\n" in out
    assert "# to do    synthetic/alp-nopiat/seed1" in out  # the output runs as a shell script
    assert "4 of 4 runs to launch" in out and not sweep_dir.exists()  # nothing run, nothing written
    # a run whose job ended with the training script's exit status 3 diverged: a failure that is not retried
    diverged = sweep_dir.absolute() / "synthetic" / "nmse-nopiat" / "seed0"
    diverged.mkdir(parents=True)
    (diverged / "args.json").write_text(json.dumps({"script": "train_piat.py"}))
    run = sweep.plan_from_args(*sweep.parse_args([*GRID_FLAGS, "--sweep-dir", str(sweep_dir)])).runs[diverged]
    (tmp_path / "train_piat.py").write_text("import sys\nsys.exit(3)\n")  # what a diverging run exits with
    with pytest.raises(RuntimeError) as stopped:
        sweep.RunJob(run)._run([sys.executable, str(tmp_path / "train_piat.py")])
    assert "train_piat.py stopped with exit code 3 (it diverged)" in str(stopped.value)
    logs, record = sweep_dir.absolute() / "logs", sweep.record_path(sweep_dir.absolute() / "logs", run)
    record.parent.mkdir(parents=True)
    with open(logs / "result.pkl", "wb") as f:
        pickle.dump(("error", f"Traceback ...\nRuntimeError: {stopped.value}"), f)
    (logs / "job.err").write_text("train_piat.py: diverged: the training loss is nan at epoch 2, step 1\n")
    record.write_text(json.dumps({"launcher": "local", "job_id": "1", "host": "here", "stdout": "",
                                  "result": str(logs / "result.pkl"), "stderr": str(logs / "job.err")}))
    assert sweep.main([*GRID_FLAGS, "--sweep-dir", str(sweep_dir), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("failed   synthetic/nmse-nopiat/seed0"))
    assert lines[at].endswith("diverged (no epoch saved); delete its folder to train it again")
    assert lines[at + 1] == "    | train_piat.py: diverged: the training loss is nan at epoch 2, step 1"
    assert lines[-1] == "4 runs: 0 done, 0 running, 1 failed, 3 to do"
    # so is a folder holding a run of other settings: it never passes for this sweep's
    other = sweep_dir / "synthetic" / "alp-nopiat" / "seed1"
    other.mkdir(parents=True)
    (other / "args.json").write_text(json.dumps({"epochs": 30, "seed": 1}))
    assert sweep.main([*GRID_FLAGS, "--sweep-dir", str(sweep_dir), "--status"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "alp-nopiat/seed1" in line)
    assert line.startswith("failed   ") and line.endswith(f"its args.json has epochs 30, this sweep {EPOCHS}: "
                                                         "another sweep's run; use another --sweep-dir or delete it")
    # a started run (its folder holds args.json) continues with --resume; a fresh one gets an empty --out-dir
    started = sweep_dir.absolute() / "synthetic" / "nmse-nopiat" / "seed1"
    started.mkdir(parents=True)
    (started / "args.json").write_text(json.dumps({"script": "train_piat.py", "epochs": EPOCHS}))
    assert sweep.main([*GRID_FLAGS, "--sweep-dir", str(sweep_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"--seed 1 --out-dir {started} --resume {started}\n" in out and "2 of 4 runs to launch" in out
    assert f"--seed 0 --out-dir {sweep_dir.absolute() / 'synthetic' / 'alp-nopiat' / 'seed0'}\n" in out
    # bad input: one line, before anything is printed or started; --dry-run checks what a launch checks
    for flags, message in ((["--no-such-flag"], "train_piat.py refuses the flags of synthetic/alp-nopiat/seed0: "
                                                "unrecognized arguments: --no-such-flag"),
                           (["--lr", "abc"], "argument --lr: invalid float value: 'abc'")):
        for action in ([], ["--dry-run"]):
            with pytest.raises(SystemExit) as refused:  # as a flag of sweep.py's own: exit status 2
                sweep.main([*GRID_FLAGS, "--sweep-dir", str(sweep_dir), *flags, *action])
            captured = capsys.readouterr()
            assert refused.value.code == 2 and captured.out == "" and message in captured.err
    for argv, message in ((["table9"], "unknown 'table9'"), (["table5", "--seed", "3"], "--seed is set by sweep.py"),
                          (["table5", "--datasets", "mnist", "--dry-run"], "argument --datasets: unknown 'mnist'"),
                          (["table5", "--seeds", "1000000000", "--dry-run"], "argument --seeds: must be a finite "
                                                                             "number in [1, 100], got 1000000000")):
        with pytest.raises(SystemExit) as refused:
            sweep.main(argv)
        captured = capsys.readouterr()
        assert refused.value.code == 2 and message in captured.err and captured.out == ""
    assert sorted(p.name for p in logs.rglob("*")) == ["job.err", "jobs", "result.pkl", record.name]  # no launch


def test_a_file_where_a_folder_belongs_gets_one_line(tmp_path, root):
    file = tmp_path / "file"
    file.write_text("not a folder")
    for flags, flag in ((["--sweep-dir", file], "--sweep-dir"),  # a launch: refused before anything starts
                        (["--sweep-dir", file / "sweep", "--dry-run"], "--sweep-dir"),
                        (["--sweep-dir", file, "--status"], "--sweep-dir"),
                        (["--sweep-dir", tmp_path / "run", "--report", "--report-dir", file / "r"], "--report-dir")):
        result = run_script(root / "sweep.py", *GRID_FLAGS, *flags)
        line = one_line_error(result, "sweep.py")
        assert result.returncode == 1 and result.stdout == "", flags
        assert line.startswith(f"sweep.py: error: {flag} ") and line.endswith(f"{file} is a file, not a folder"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_submitit_is_imported_only_to_launch_and_bad_input_is_one_line(tmp_path, root):
    # paper.ipynb's quick mode plans and runs without submitit installed: importing sweep does not import it
    code = "import sys, sweep; print('submitit' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True).stdout == "False\n"
    code = ("import sys; sys.modules['submitit'] = None; import sweep; "  # `import submitit` raises ImportError
            f"sys.exit(sweep.main({[*GRID_FLAGS, '--sweep-dir', str(tmp_path / 'sweep')]!r} + sys.argv[1:]))")
    for action in ("--dry-run", "--status"):
        result = subprocess.run([sys.executable, "-c", code, action], cwd=root, capture_output=True, text=True)
        assert result.returncode == 0 and "4 run" in result.stdout, result.stderr
    result = run_script(root / "sweep.py", *GRID_FLAGS, "--sweep-dir", tmp_path / "sweep", "--no-such-flag")
    assert result.returncode == 2 and one_line_error(result, "sweep.py").endswith("unrecognized arguments: "
                                                                                 "--no-such-flag")
    result = run_script(root / "sweep.py", *GRID_FLAGS, "--sweep-dir", tmp_path / "sweep", "--epochs", "0")
    assert result.returncode == 2 and one_line_error(result, "sweep.py") == (
        "sweep.py: error: train_piat.py refuses the flags of synthetic/alp-nopiat/seed0: argument --epochs: must be a "
        "finite number in (0, inf), got 0")
    assert not (tmp_path / "sweep").exists()


def in_the_middle(run_dirs):
    """The run folders whose training has a checkpoint but at least two epochs to go."""
    return [d for d in run_dirs if (d / "final.pt").exists()
            and len((d / "metrics.csv").read_text().splitlines()) - 1 <= EPOCHS - 2]


def test_local_sweep_runs_jobs_in_parallel_and_survives_a_kill_and_a_preemption(tmp_path, root, capsys):
    sweep_dir = tmp_path / "sweep"
    argv = [*GRID_FLAGS, "--jobs", "2", "--sweep-dir", str(sweep_dir)]
    proc = subprocess.Popen([sys.executable, str(root / "sweep.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    killed = preempted = None
    most_at_once, deadline = 0, time.time() + 400
    while proc.poll() is None and time.time() < deadline:
        candidates = in_the_middle(d for d in sweep_dir.glob("synthetic/*/seed*") if d not in (killed, preempted))
        if candidates and not (killed and preempted):
            trainings = {Path(argv[argv.index("--out-dir") + 1]): pid for pid, argv in processes(str(sweep_dir)).items()
                         if any(a.endswith("train_piat.py") for a in argv)}
            most_at_once = max(most_at_once, len(trainings))
            for run_dir in set(candidates) & set(trainings):
                if killed is None:
                    os.kill(trainings[run_dir], signal.SIGKILL)  # the run dies: its job fails
                    killed = run_dir
                elif preempted is None:
                    os.kill(parent_pid(trainings[run_dir]), signal.SIGUSR2)  # Slurm's warning before preempting
                    preempted = run_dir
        time.sleep(0.1)
    out = proc.communicate(timeout=60)[0]
    assert killed and preempted, out
    assert most_at_once == 2, out  # two runs trained at the same time
    assert proc.returncode == 1, out
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert f"4 run(s), 2 at a time on this machine, no GPU, {threads} CPU thread(s) each" in out
    # each run says where it stands: when it starts, and its training's epochs as they end
    starts = [line for line in out.splitlines() if line.startswith("run ")]
    assert [line.split(":")[0] for line in starts] == [f"run {i}/4" for i in range(1, 5)], out
    assert all("(not started; trains; job " in line for line in starts), starts
    for run_dir in sweep_dir.glob("synthetic/*/seed*"):
        assert f"    {key(run_dir)}: epoch   1  lr" in out, out
    # the killed run is listed as failed, with the tail of its log; the others are not stopped by it
    assert f"FAILED   {key(killed)}: epoch " in out, out
    assert ": RuntimeError: train_piat.py stopped with signal SIGKILL" in out, out
    assert "    | " in out and "3 run(s) finished, 1 failed (above)" in out, out
    # the preempted job stopped its training, requeued itself and continued from its last epoch
    assert f"finished {key(preempted)}" in out
    record = json.loads((sweep_dir / "logs" / "jobs" / f"{key(preempted).replace('/', '.')}.json").read_text())
    log = Path(record["stdout"]).read_text()
    assert f"--resume {preempted}" in log, log
    assert [log.count(f"epoch {epoch:3d}  lr") for epoch in range(1, EPOCHS + 1)] == [1] * EPOCHS, log  # none twice
    assert [r["epoch"] for r in read_metrics(preempted / "metrics.csv")] == list(range(1, EPOCHS + 1))

    # the same command again continues the killed run and leaves the finished ones alone
    finished = [p for p in sweep_dir.glob("synthetic/*/seed*") if p != killed]
    stamps = {p: ((p / "final.pt").stat().st_mtime_ns, (p / "eval.json").stat().st_mtime_ns) for p in finished}
    capsys.readouterr()
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("run 1/1: ") == 1 and f"run 1/1: {key(killed)} (epoch " in out, out
    assert "continues with --resume" in out and "1 run(s) finished, 0 failed" in out, out
    assert {p: ((p / "final.pt").stat().st_mtime_ns, (p / "eval.json").stat().st_mtime_ns) for p in finished} == stamps
    assert [r["epoch"] for r in read_metrics(killed / "metrics.csv")] == list(range(1, EPOCHS + 1))
    assert utils.load_checkpoint(killed / "final.pt")["epoch"] == EPOCHS
    assert sweep.main([*argv, "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "4 runs: 4 done, 0 running, 0 failed, 0 to do"

    # the report: mean ± std over the two seeds of each method, as in the runs' eval.json
    assert sweep.main([*argv, "--report"]) == 0
    markdown = (sweep_dir / "report" / "table5.md").read_text()
    body, signature = markdown.rsplit("<!-- ", 1)  # the file ends in a line that tells it from a file of the user's
    assert body in capsys.readouterr().out and signature.startswith("written by sweep.py --report; sha256 ")
    for method, loss in (("ALP", "alp"), ("NMSE", "nmse")):
        results = [json.loads((sweep_dir / "synthetic" / f"{loss}-nopiat" / f"seed{s}" / "eval.json").read_text())
                   for s in (0, 1)]
        best = {a: [next(r["accuracy"] for r in res["results"] if (r["role"], r["attack"]) == ("best", a))
                    for res in results] for a in ("clean", "pgd20")}
        assert report_cells(markdown, method)[:6] == [method, "ours", mean_std_text(best["clean"]),
                                                      mean_std_text(best["pgd20"]), "–", "2"]


def test_report_marks_each_difference_to_pgd_at(tmp_path):
    """Table I and the averaging table: under each method its difference to PGD-AT (report.compare_flags on the
    per-image results, seeds paired in order), * where p < 0.05, – for a run evaluated without per-image results."""
    argv = ["table1,averaging", "--profile", "quick", "--seeds", "3", "--sweep-dir", str(tmp_path)]
    plan = sweep.plan_from_args(*sweep.parse_args(argv))
    cells, indices, flags = sweep.BEST_FINAL_DIFF, list(range(0, 400, 2)), {}
    for run in plan.runs.values():  # eval.json as evaluate.py writes it; PIAT and PIAT + NMSE right more often
        accuracy, rows = 0.75 if run.name in ("ce-piat", "nmse-piat") else 0.5, []
        for i, (role, attack) in enumerate((role, attack) for role, attack in cells if role != "diff"):
            rng = np.random.default_rng([run.seed, i, int(100 * accuracy)])  # the same for runs of one accuracy
            flags[run.run_dir, role, attack] = (rng.random(len(indices)) < accuracy).astype(int).tolist()
            rows.append({"role": role, "attack": attack, "accuracy": float(np.mean(flags[run.run_dir, role, attack])),
                         "dataset": "synthetic", "indices": indices, "per_image": flags[run.run_dir, role, attack]})
            if run.name == "mail-nopiat":  # evaluated by an older evaluate.py
                del rows[-1]["per_image"]
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "eval.json").write_text(json.dumps({"results": rows}))
    assert sweep.main([*argv, "--report"]) == 0
    for grid, method in (("table1", "PIAT + NMSE"), ("table1", "ALP"), ("table1", "MAIL"), ("averaging", "PIAT"),
                         ("averaging", "PGD-AT + SWA")):
        table, lines = plan.tables[grid, "synthetic"], (tmp_path / "report" / f"{grid}.md").read_text().splitlines()
        at = lines.index(next(line for line in lines if line.startswith(f"| {method} | ours |")))
        delta = [cell.strip() for cell in lines[at + 1].strip("|").split("|")]
        assert delta[:2] == ["", "Δ vs PGD-AT"] and len(delta) == len(cells) + 3, lines[at + 1]
        for (role, attack), cell in zip(cells, delta[2:]):
            if role == "diff" or method == "MAIL":
                assert cell == ("" if role == "diff" else "–"), (method, role, attack)
                continue
            s = report.compare_flags(*([flags[d, role, attack] for d in table[m]] for m in ("PGD-AT", method)))
            assert cell == (f"{100 * s['diff']:+.2f} [{100 * s['ci_low']:+.1f}, {100 * s['ci_high']:+.1f}] "
                            f"p={report.p_text(s['p_value'])}"), (method, role, attack)
            significant = method in ("PIAT + NMSE", "PIAT")  # 75 % against 50 % on 3 x 200 images; else the same
            assert cell.endswith(" *") == significant and (s["diff"] > 0.15 if significant else cell == "+0.00 "
                                                           "[+0.0, +0.0] p=1"), (method, role, attack, cell)
        assert lines[at + 2].startswith("| | paper (cifar10) |" if grid == "table1" else "| ")
        reference = lines.index(next(line for line in lines if line.startswith("| PGD-AT | ours |")))
        assert "Δ" not in lines[reference + 1]  # PGD-AT is not compared with itself
        assert any(line.startswith("Δ vs PGD-AT: accuracy minus PGD-AT's (points) [95 % interval") for line in lines)
    assert (tmp_path / "report" / "synthetic" / "averaging.png").exists()
    # its own files are written again; a report edited since, or a file of the user's, never: nothing is written
    assert sweep.main([*argv, "--report"]) == 0
    edited = tmp_path / "report" / "table1.md"
    edited.write_text(edited.read_text() + "my comment on the table\n")
    before = {path: path.read_bytes() for path in (tmp_path / "report").rglob("*") if path.is_file()}
    with pytest.raises(utils.UserError, match=f"{edited} holds a file this command did not write \\(or one edited"):
        sweep.main([*argv, "--report"])
    assert {path: path.read_bytes() for path in (tmp_path / "report").rglob("*") if path.is_file()} == before
    edited.unlink()
    (tmp_path / "report" / "synthetic" / "averaging.png").write_bytes(b"my own figure")
    with pytest.raises(utils.UserError, match="averaging.png holds a file this command did not write"):
        sweep.main([*argv, "--report"])
    assert not edited.exists()
    # a sweep folder without results (a typo): one line, no report folder made
    with pytest.raises(utils.UserError, match="no run of table1, averaging has results yet: nothing to report"):
        sweep.main([*argv[:-1], str(tmp_path / "typo"), "--report"])
    assert not (tmp_path / "typo").exists()


def test_a_run_evaluated_with_other_settings_is_evaluated_again(tmp_path, capsys):
    """eval.json rows of another --n-examples, or of another eps, do not count as this sweep's evaluation."""
    argv = [*GRID_FLAGS, "--seeds", "1", "--sweep-dir", str(tmp_path)]
    plan = sweep.plan_from_args(*sweep.parse_args(argv))
    for run in plan.runs.values():  # trained to the end, evaluated on 16 images
        run.run_dir.mkdir(parents=True)
        torch.save({"model": {}, "arch": "small-cnn", "num_classes": 10, "mean": (0.5,) * 3, "std": (0.25,) * 3,
                    "args": {"epochs": EPOCHS}, "metrics": [], "epoch": EPOCHS}, run.run_dir / "final.pt")
        rows = [{"role": role, "attack": attack, "n": 16, "subset": "fixed", "seed": 0, "amp": False,
                 "epsilon_255": 8.0 if attack == "pgd20" else 0.0, "step_size_255": 2.0}
                for role in ("best", "final") for attack in ("clean", "pgd20")]
        (run.run_dir / "eval.json").write_text(json.dumps({"results": rows}))
    assert sweep.main([*argv, "--status"]) == 0 and capsys.readouterr().out.endswith("2 runs: 2 done, 0 running, "
                                                                                     "0 failed, 0 to do\n")
    for more, to_do in ((["--n-examples", "32"], "clean,pgd20"), (["--attacks", "pgd20", "--n-examples", "32"],
                                                                  "pgd20")):
        assert sweep.main([*argv, *more, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "2 of 2 runs to launch" in out and f"trained; evaluates {to_do}" in out
        assert f"evaluate.py {next(iter(plan.runs))} --attacks {to_do} --n-examples 32" in out
    rows[1]["epsilon_255"] = 4.0  # its PGD-20 at another eps
    (run.run_dir / "eval.json").write_text(json.dumps({"results": rows}))
    assert sweep.main([*argv, "--status"]) == 0
    assert f"to do    {run.key:44s} trained; evaluates pgd20" in capsys.readouterr().out


def test_a_run_that_diverged_in_this_process_is_reported_as_failed(tmp_path, capsys):
    argv = [*GRID_FLAGS, "--seeds", "1", "--sweep-dir", str(tmp_path), "--lr", "1e38"]
    assert sweep.main([*argv, "--launcher", "inline"]) == 1
    assert "0 run(s) finished, 2 failed (above)" in capsys.readouterr().out
    assert sweep.main([*argv, "--status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:2]] == ["failed", "failed"] and out[-1].endswith("2 failed, 0 to do")
    assert all(line.endswith("diverged (no epoch saved); delete its folder to train it again") for line in out[:2])
    assert sweep.main([*argv, "--launcher", "inline"]) == 1  # not retried
    assert "0 of 2 runs to launch: nothing to do" in capsys.readouterr().out


def test_ema_report_gives_the_oscillation_and_intervals_over_seeds(tmp_path):
    """The ema grid's table: the oscillation from metrics.csv (RUN/trained from the raw_* columns), and under each
    method its difference to PGD-AT over the seeds with a 95 % t-interval, beside the per-image McNemar row."""
    argv = ["ema", "--profile", "quick", "--seeds", "3", "--sweep-dir", str(tmp_path)]
    plan = sweep.plan_from_args(*sweep.parse_args(argv))
    curves = {}
    for run in plan.runs.values():  # PGD-AT (the trained weights) zig-zags by 0.1; its EMA and the rest by 0.02
        zigzag = [0.3 + (0.1 if "ema" in run.name else 0.02) * (e % 2) + 0.01 * run.seed for e in range(8)]
        smooth = [0.3 + 0.02 * (e % 2) + 0.01 * run.seed for e in range(8)]
        run.run_dir.mkdir(parents=True)
        lines = ["epoch,test_clean_acc,test_pgd20_acc,raw_test_pgd20_acc"] + [
            f"{e + 1},0.5,{a},{b if 'ema' in run.name else ''}" for e, (a, b) in enumerate(zip(smooth, zigzag))]
        (run.run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
        curves[run.run_dir / "trained"], curves[run.run_dir] = zigzag, smooth
    assert sweep.main([*argv, "--report"]) == 0
    lines = (tmp_path / "report" / "ema.md").read_text().splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| Method |")).strip("|").split("|")]
    column = header.index("PGD20 oscillation")
    for method, expected in (("PGD-AT", 10.0), ("PGD-AT + EMA", 2.0), ("PIAT + NMSE", 10.0)):
        row = next(line for line in lines if line.startswith(f"| {method} |"))
        assert row.split("|")[1 + column].strip() == f"{expected:.2f} ± 0.00", row  # 6 changes of 0.1 (or 0.02)
    run_dir = plan.tables["ema", "synthetic"]["PIAT"][0]  # the first quarter of the epochs is left out
    (run_dir / "metrics.csv").write_text("epoch,test_pgd20_acc\n1,0.1\n2,0.9\n3,0.2\n4,0.4\n5,0.3\n")
    values = sweep.seed_values({run_dir: {"eval": {}, "metrics": sweep.run_metrics(run_dir)}}, [run_dir],
                               "oscillation", "pgd20")
    assert values == [pytest.approx((0.7 + 0.2 + 0.1) / 3)]
    at = lines.index(next(line for line in lines if line.startswith("| PGD-AT + EMA |")))
    seeds = [c.strip() for c in lines[at + 2].strip("|").split("|")]
    assert seeds[1] == "Δ over seeds" and seeds[column] == "-8.00 [-8.0, -8.0]", lines[at + 2]
    assert any(line.startswith("Δ over seeds: the mean over seeds of the difference") for line in lines)
    tidy = (tmp_path / "report" / "synthetic" / "ema_curves.csv").read_text().splitlines()
    assert tidy[0] == "method,seed,epoch,test_clean_acc,test_pgd20_acc" and len(tidy) == 1 + 5 * 3 * 8
    assert [float(line.split(",")[-1]) for line in tidy if line.startswith('"PGD-AT",1,')] == pytest.approx(
        curves[plan.tables["ema", "synthetic"]["PGD-AT"][1]])
    table, results = sweep.curves_from_csv("\n".join(tidy))  # the figure again, from the saved numbers alone
    assert list(table) == list(plan.tables["ema", "synthetic"]) and all(len(keys) == 3 for keys in table.values())
    assert [row["test_pgd20_acc"] for row in results[table["PGD-AT"][1]]["metrics"]] == pytest.approx(
        curves[plan.tables["ema", "synthetic"]["PGD-AT"][1]])
    assert sweep.plot_mean_curves(table, results, "again").axes[0].lines[0].get_ydata() == pytest.approx(
        [100 * sum(curves[d][e] for d in plan.tables["ema", "synthetic"]["PGD-AT"]) / 3 for e in range(8)])


FAKE_SBATCH = """#!{python}
import os, shutil, sys
from pathlib import Path
log = Path(os.environ["FAKE_SLURM_LOG"]); log.mkdir(exist_ok=True)
n = 1000 + len(list(log.glob("script_*.sh"))) + 1
shutil.copy(sys.argv[-1], log / f"script_{{n}}.sh")  # copied now: submitit renames it afterwards
(log / f"args_{{n}}.txt").write_text(" ".join(sys.argv[1:]))
print(f"Submitted batch job {{n}}")
"""
FAKE_SRUN = "#!{python}\n"  # submitit looks for srun to detect Slurm
FAKE_SACCT = """#!{python}
import os
from pathlib import Path
states = Path(os.environ["FAKE_SLURM_LOG"]) / "sacct.txt"  # what the test makes Slurm say; nothing at first
print("JobID|State|NodeList\\n" + states.read_text() if states.exists() else "", end="")
"""


def test_slurm_submits_one_job_per_run_with_the_exact_command(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("sacct", FAKE_SACCT)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "slurm"))
    monkeypatch.chdir(tmp_path)
    argv = ["table5", "--datasets", "cifar10,cifar100", "--sweep-dir", str(tmp_path / "sweep"), "--launcher", "slurm",
            "--partition", "gpu", "--time", "2-00:00:00", "--gpus-per-job", "1", "--cpus-per-job", "8", "--mem", "64G",
            "--account", "proj123", "--qos", "normal", "--slurm-setup", "module load cuda",
            "--slurm-extra", "constraint=a100", "--epochs", "90"]
    assert sweep.main(argv) == 0
    plan = sweep.plan(["table5"], datasets=["cifar10", "cifar100"], extra=["--epochs", "90"],
                      sweep_dir=tmp_path / "sweep")
    scripts = sorted((tmp_path / "slurm").glob("script_*.sh"))
    assert len(scripts) == len(plan.runs) == 4
    logs = tmp_path / "sweep" / "logs"
    for script, run in zip(scripts, plan.runs.values()):
        text = script.read_text()
        lines = text.splitlines()
        for line in ("#SBATCH --partition=gpu", "#SBATCH --time=2880", "#SBATCH --gpus-per-node=1",
                     "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64G", "#SBATCH --account=proj123",
                     "#SBATCH --qos=normal", "#SBATCH --constraint=a100", "#SBATCH --requeue", "#SBATCH --nodes=1",
                     "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=USR2@120", f"#SBATCH --chdir={tmp_path}",
                     f"#SBATCH --job-name={run.dataset}-{run.name}-seed0", f"#SBATCH --output={logs}/%j_0_log.out",
                     "module load cuda"):
            assert line in lines, (line, text)
        assert "wckey" not in text
        train = [sys.executable, str(sweep.ROOT / "train_piat.py"), "--dataset", run.dataset, "--arch", "resnet18",
                 "--loss", run.name.split("-")[0], "--no-piat", "--epochs", "90", "--seed", "0",
                 "--out-dir", str(run.run_dir)]
        evaluate = [sys.executable, str(sweep.ROOT / "evaluate.py"), str(run.run_dir), "--attacks", "clean,pgd20,aa"]
        assert f"# {' '.join(train)}" in lines and f"# {' '.join(evaluate)}" in lines
        assert lines[-1].startswith("srun --unbuffered --output") and "submitit.core._submit" in lines[-1]
    assert "submitted cifar10/alp-nopiat/seed0: Slurm job 1001" in capsys.readouterr().out
    submitted = (tmp_path / "slurm" / "args_1001.txt").read_text()  # sbatch was given the script alone
    assert submitted.startswith(f"{logs}/.submission_file_") and submitted.endswith(".sh")
    # the jobs are recorded; sacct cannot tell their state, so a second sweep submits nothing twice
    assert sweep.main(argv) == 0
    assert len(list((tmp_path / "slurm").glob("script_*.sh"))) == 4
    assert sweep.main([*argv, "--status"]) == 0
    assert "4 runs: 0 done, 4 running, 0 failed, 0 to do" in capsys.readouterr().out
    # what sacct says counts: job 1001 failed once but Slurm requeued it, job 1002 failed for good
    for job_id in ("1001", "1002"):
        with open(logs / f"{job_id}_0_result.pkl", "wb") as f:
            pickle.dump(("error", "Traceback ...\nRuntimeError: train_piat.py stopped with exit code 1"), f)
    (tmp_path / "slurm" / "sacct.txt").write_text("1001|PENDING|\n1002|FAILED|n7\n1003|RUNNING|n1\n1004|RUNNING|n2\n")
    assert sweep.main([*argv, "--status"]) == 0
    out = capsys.readouterr().out
    assert "4 runs: 0 done, 3 running, 1 failed, 0 to do" in out
    assert "RuntimeError: train_piat.py stopped with exit code 1" in next(
        line for line in out.splitlines() if line.startswith("failed   cifar10/nmse-nopiat/seed0"))
    assert sweep.main(argv) == 0  # the failed run is submitted again, and only it
    assert "submitted cifar10/nmse-nopiat/seed0: Slurm job 1005" in capsys.readouterr().out
    assert len(list((tmp_path / "slurm").glob("script_*.sh"))) == 5


def read_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def wandb_history(path):
    """The logged rows of an offline W&B run file (LevelDB-log framed protobuf records)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, position, buffer, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:
            position += left
            continue
        _, size, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and size == 0:
            position += left
            continue
        chunk, position = data[position + 7:position + 7 + size], position + 7 + size
        buffer = chunk if kind in (1, 2) else buffer + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buffer)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_tensorboard_and_offline_wandb_hold_metrics_csv_across_a_resume(tmp_path, root, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    trained = kill_after_first_checkpoint(root / "train_piat.py", [*TINY, "--epochs", "3", "--track"], run_dir)
    assert 1 <= trained < 3
    resumed = run_script(root / "train_piat.py", "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_metrics(run_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # TensorBoard: every metrics.csv column but the epoch (the step), each epoch once despite the kill
    scalars = read_scalars(run_dir / "tensorboard")
    columns = [c for c in rows[0] if c != "epoch" and rows[0][c] is not None]  # empty cells read as None
    assert sorted(scalars) == sorted(columns)
    for column in columns:
        assert [step for step, _ in scalars[column]] == [r["epoch"] for r in rows], column
        assert [value for _, value in scalars[column]] == pytest.approx([r[column] for r in rows], rel=1e-5), column
    # W&B offline: one local run folder per process, both under the run id the checkpoints' args keep; together
    # they hold every epoch, the resumed process logging again only the last epoch it restored (a SIGKILL can
    # lose what is still in W&B's buffer)
    checkpoint = utils.load_checkpoint(run_dir / "final.pt")
    wandb_id = checkpoint["args"]["wandb_id"]
    assert checkpoint["epoch"] == 3 and wandb_id == utils.load_checkpoint(run_dir / "best.pt")["args"]["wandb_id"]
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{wandb_id}.wandb" for f in files)
    assert [row["_step"] for row in wandb_history(files[1])] == list(range(trained, 4))
    history = [row for f in files for row in wandb_history(f)]
    assert sorted({row["_step"] for row in history}) == [1, 2, 3] and len(history) <= 4
    for row in history:
        expected = rows[row["_step"] - 1]
        assert {c: row[c] for c in columns} == pytest.approx({c: expected[c] for c in columns}, rel=1e-5)
